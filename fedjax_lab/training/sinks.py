"""Metrics sinks: their interface, fan-out, opening them for a workdir.

Every writer takes the loop's per-round records (flat dicts with an integer
``round`` key) through one interface: ``write(record)``, ``flush()``,
``truncate_after(last_round, history)`` and ``close()``. Writes are flushed
at once, so a crash loses nothing already written.

Resuming from a checkpoint taken after round ``R``: open each sink with
``resume_after=R`` (or call ``truncate_after(R, history)`` before the first
write). Afterwards readers see every record with ``round <= R`` from before
and none with ``round > R`` (the resumed run writes those again). With a
``history`` (the records of rounds ``1..R``; :func:`open_writers` reads them
from ``metrics.jsonl``) every sink ends up holding exactly those rounds: a
sink keeps its leading records while their rounds match the history's and
writes the rest from the history, so a sink whose last record was torn by a
crash, or that was switched on only now, agrees with an uninterrupted run.
Without a history each sink keeps what it holds up to round ``R``:

* JSON lines and CSV: the file is rewritten without the later rows.
* TensorBoard: the logdir's event files are rewritten without the events at
  steps > R, which is what readers without restart logic see (the Rust data
  server behind ``--load_fast``, third-party parsers); the new event file
  opens with ``file_version="brain.Event:2"`` and a ``SessionLog(START)`` at
  step R + 1, so that a TensorBoard that had already loaded the old values
  purges them too (``EventAccumulator`` drops every value at a step >= that of
  a START event read before it, for all tags).
* W&B: its history cannot be cut from inside a run; ``WandbWriter`` rewinds
  the run at construction (``resume_from="<id>?_step=R+1"``, W&B's rewind
  feature, wandb >= 0.17.1).

The writers live in :mod:`fedjax_lab.training.file_sinks` (JSON lines, CSV)
and :mod:`fedjax_lab.training.dashboard_sinks` (TensorBoard, W&B, and how
record keys become their tags); this module holds their interface, the
fan-out :class:`MultiWriter` and :func:`open_writers`, which opens the sinks a
config names in a workdir.
"""

from __future__ import annotations

import os
import uuid
from typing import Any, Mapping, Protocol, Sequence

from fedjax_lab.training import metrics_io
from fedjax_lab.training.dashboard_sinks import TensorBoardWriter, WandbWriter
from fedjax_lab.training.file_sinks import (STEP_KEY, CsvWriter, JsonlWriter,
                                            round_of)


class MetricsWriter(Protocol):
  """What every sink implements (records are flat dicts with ``round``)."""

  def write(self, record: Mapping[str, Any]) -> None: ...
  def flush(self) -> None: ...
  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None: ...
  def close(self) -> None: ...


class MultiWriter:
  """Fans every call out to several writers (in order)."""

  def __init__(self, writers: Sequence[MetricsWriter]):
    self.writers = list(writers)

  def write(self, record: Mapping[str, Any]) -> None:
    """Writes ``record`` to every writer."""
    for writer in self.writers:
      writer.write(record)

  def flush(self) -> None:
    """Flushes every writer."""
    for writer in self.writers:
      writer.flush()

  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None:
    """Truncates every writer after ``last_round`` (see the module
    docstring for ``history``)."""
    for writer in self.writers:
      writer.truncate_after(last_round, history)

  def close(self) -> None:
    """Closes every writer, even if one fails (the first error is raised)."""
    error = None
    for writer in self.writers:
      try:
        writer.close()
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    if error is not None:
      raise error


SINK_NAMES = ("jsonl", "csv", "tensorboard", "wandb")
WANDB_RUN_ID_FILE = "wandb_run_id.txt"


def open_writers(workdir: str, sinks: Sequence[str], *,
                 config: Mapping[str, Any] | None = None,
                 resume_after: int | None = None,
                 wandb_project: str = "fedjax_lab") -> MultiWriter:
  """The sinks named in ``sinks`` (from :data:`SINK_NAMES`) for ``workdir``.

  Files: ``metrics.jsonl``, ``metrics.csv``, ``tensorboard/`` (event files),
  and for W&B ``wandb_run_id.txt`` (the run id a resumed run continues).
  ``resume_after=R`` reopens them, keeping only rounds <= R; the records of
  those rounds in ``metrics.jsonl`` (when it is there) are the history every
  sink is completed from (see the module docstring).

  Raises:
    metrics_io.MetricsFileError: resuming, and a line of ``metrics.jsonl``
      before its last is not a record (nothing was changed).
  """
  unknown = [s for s in sinks if s not in SINK_NAMES]
  if unknown:
    raise ValueError(f"unknown metrics sinks {unknown}; known: {SINK_NAMES}")
  jsonl_path = os.path.join(workdir, "metrics.jsonl")
  history = None
  if resume_after is not None and os.path.exists(jsonl_path):
    history = [r for r in metrics_io.read_jsonl(jsonl_path,
                                                allow_torn_tail=True)
               if round_of(r.get(STEP_KEY)) <= resume_after]
  writers: list[MetricsWriter] = []
  try:
    for name in dict.fromkeys(sinks):
      if name == "jsonl":
        writers.append(JsonlWriter(jsonl_path, resume_after, history))
      elif name == "csv":
        writers.append(CsvWriter(os.path.join(workdir, "metrics.csv"),
                                 resume_after, history))
      elif name == "tensorboard":
        writers.append(TensorBoardWriter(
            os.path.join(workdir, "tensorboard"), resume_after, history))
      else:
        writers.append(_wandb_writer(workdir, wandb_project, config,
                                     resume_after, history))
  except Exception:
    MultiWriter(writers).close()
    raise
  return MultiWriter(writers)


def _wandb_writer(workdir: str, project: str,
                  config: Mapping[str, Any] | None,
                  resume_after: int | None,
                  history: Sequence[Mapping[str, Any]] | None = None
                  ) -> WandbWriter:
  """A W&B writer whose run id is kept in ``workdir`` for resuming (a run
  started while resuming first logs the ``history``)."""
  id_path = os.path.join(workdir, WANDB_RUN_ID_FILE)
  if resume_after is not None and os.path.exists(id_path):
    with open(id_path) as f:
      return WandbWriter(project, config, run_id=f.read().strip(),
                         resume_after=resume_after)
  run_id = uuid.uuid4().hex[:16]
  writer = WandbWriter(project, config, run_id=run_id)
  with open(id_path, "w") as f:
    f.write(run_id + "\n")
  for record in history or ():
    writer.write(record)
  return writer
