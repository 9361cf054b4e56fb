"""Metrics sinks: JSON lines, CSV, TensorBoard (no TensorFlow), W&B, fan-out.

Every writer takes the loop's per-round records (flat dicts with an integer
``round`` key) through one interface: ``write(record)``, ``flush()``,
``truncate_after(last_round)`` and ``close()``. Writes are flushed at once, so
a crash loses nothing already written.

Resuming from a checkpoint taken after round ``R``: open each sink with
``resume_after=R`` (or call ``truncate_after(R)`` before the first write).
Afterwards readers see every record with ``round <= R`` from before and none
with ``round > R`` (the resumed run writes those again):

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

TensorBoard and W&B tags group the record's keys (see :func:`scalar_tag`):
``eval_<m>`` -> ``eval/<m>``, ``train_eval_<m>`` -> ``train_eval/<m>``,
``train_<m>`` -> ``train/<m>``, DP keys (``epsilon``, ``clip_norm``,
``noise_multiplier``, ``dp_*``, ...) -> ``privacy/<key>``, bookkeeping
(``seconds``, padded sizes, ``params_finite``) -> ``system/<key>``, every other
numeric key -> ``round/<key>``; a key that already holds a ``/`` is kept.
The step is the round. Non-numeric values are not written there.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import re
import socket
import time
import uuid
from typing import Any, Mapping, Protocol, Sequence

from fedjax_lab.training import metrics_io
from fedjax_lab.training.tfevents import (SESSION_LOG_START, encode_event,
                                          event_step, read_tfrecords,
                                          scalar_summary, tfrecord)

STEP_KEY = "round"
PRIVACY_KEYS = frozenset({
    "epsilon", "delta", "noise_multiplier", "clip_norm", "signal_to_noise",
    "fraction_clipped", "clipped_sum_norm", "unclipped_fraction_noisy",
    "update_noise_multiplier", "accounted_cohort_size", "tree_step"})
SYSTEM_KEYS = frozenset({"seconds", "cohort_padded_size",
                         "local_steps_padded", "params_finite"})


class MetricsWriter(Protocol):
  """What every sink implements (records are flat dicts with ``round``)."""

  def write(self, record: Mapping[str, Any]) -> None: ...
  def flush(self) -> None: ...
  def truncate_after(self, last_round: int) -> None: ...
  def close(self) -> None: ...


def scalar_tag(key: str) -> str:
  """The TensorBoard / W&B tag of a record key (grouping in the docstring)."""
  if "/" in key:
    return key
  for prefix in ("train_eval", "eval", "train"):
    if key.startswith(prefix + "_"):
      return f"{prefix}/{key[len(prefix) + 1:]}"
  if key in PRIVACY_KEYS or key.startswith("dp_"):
    return f"privacy/{key}"
  if key in SYSTEM_KEYS:
    return f"system/{key}"
  return f"round/{key}"


def numeric_items(record: Mapping[str, Any]) -> list[tuple[str, float]]:
  """``(key, float value)`` of the record's real numbers, ``round`` excluded."""
  return [(key, float(value)) for key, value in record.items()
          if key != STEP_KEY and isinstance(value, numbers.Real)]


def _replace_file(path: str, text: str) -> None:
  tmp = f"{path}.tmp"
  with open(tmp, "w", newline="") as f:
    f.write(text)
  os.replace(tmp, path)


def _round_of(value: Any) -> float:
  """A stored round number (``""`` or missing -> -inf, i.e. always kept)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return -math.inf


class JsonlWriter(metrics_io.JsonlWriter):
  """``metrics.jsonl`` (one JSON object a line) with resume truncation.

  Without ``resume_after`` the file starts empty (as every sink here does).
  """

  def __init__(self, path: str, resume_after: int | None = None):
    if resume_after is None and os.path.exists(path):
      os.remove(path)  # a fresh run starts a fresh file
    super().__init__(path)
    if resume_after is not None:
      self.truncate_after(resume_after)

  def flush(self) -> None:
    """Records are flushed as they are written; kept for the interface."""
    self._file.flush()

  def truncate_after(self, last_round: int) -> None:
    """Rewrites the file without the records whose round is > last_round."""
    self._file.close()
    with open(self.path) as f:
      lines = [line for line in f if line.strip()]
    if lines and not lines[-1].endswith("\n"):
      lines.pop()  # a line torn by a crash
    kept = [line for line in lines
            if _round_of(json.loads(line).get(STEP_KEY)) <= last_round]
    _replace_file(self.path, "".join(kept))
    self._file = open(self.path, "a")


def _csv_cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, (dict, list, tuple)):
    return json.dumps(value, sort_keys=True)
  return str(value)  # floats: the shortest repr that reads back exactly


class CsvWriter:
  """A CSV file whose columns are the union of the keys seen so far.

  ``round`` is the first column, the others in order of first appearance;
  a cell is empty where a record lacks the key. When a record brings a new
  key the file is rewritten with the widened header (from the rows kept in
  memory: one short row a round), so the file is always a valid CSV that
  ``csv.DictReader`` reads. Floats are written as their shortest exact repr.
  """

  def __init__(self, path: str, resume_after: int | None = None):
    self.path = path
    self._columns: list[str] = []
    self._rows: list[dict[str, str]] = []
    self._file = None
    if resume_after is not None and os.path.exists(path):
      with open(path, newline="") as f:
        reader = csv.DictReader(f)
        self._rows = list(reader)
        self._columns = list(reader.fieldnames or [])
    self._rewrite()
    if resume_after is not None:
      self.truncate_after(resume_after)

  def _rewrite(self) -> None:
    text = io.StringIO()
    if self._columns:
      writer = csv.DictWriter(text, self._columns, restval="")
      writer.writeheader()
      writer.writerows(self._rows)
    if self._file is not None:
      self._file.close()
    _replace_file(self.path, text.getvalue())
    self._file = open(self.path, "a", newline="")

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one row (rewriting the file first if a key is new)."""
    row = {k: _csv_cell(v) for k, v in record.items()}
    self._rows.append(row)
    new_keys = [k for k in row if k not in self._columns]
    if new_keys:
      columns = self._columns + new_keys
      self._columns = sorted(columns, key=lambda c: c != STEP_KEY)  # stable
      self._rewrite()
    else:
      csv.DictWriter(self._file, self._columns, restval="").writerow(row)
      self._file.flush()

  def flush(self) -> None:
    """Rows are flushed as they are written; kept for the interface."""
    self._file.flush()

  def truncate_after(self, last_round: int) -> None:
    """Rewrites the file without the rows whose round is > last_round."""
    self._rows = [r for r in self._rows
                  if _round_of(r.get(STEP_KEY)) <= last_round]
    self._rewrite()

  def close(self) -> None:
    """Closes the file."""
    self._file.close()


_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


class TensorBoardWriter:
  """Scalar TensorBoard event files, written without TensorFlow.

  Each writer starts a new ``events.out.tfevents.<seconds>.<host>`` file in
  ``logdir``; ``<seconds>`` is bumped past any file already there so that
  readers, which take a run's files in name order, read it last. Each
  record becomes one Event at step ``record["round"]`` holding every numeric
  key as a ``simple_value`` (float32) under :func:`scalar_tag`'s tag.
  """

  def __init__(self, logdir: str, resume_after: int | None = None):
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    stamps = [int(m.group(1)) for name in os.listdir(logdir)
              if (m := _EVENT_FILE.match(name))]
    stamp = max([int(time.time())] + [s + 1 for s in stamps])
    self.path = os.path.join(
        logdir, f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}")
    self._file = open(self.path, "xb")
    self._append(encode_event(time.time(), 0, file_version="brain.Event:2"))
    if resume_after is not None:
      self.truncate_after(resume_after)

  def _append(self, event: bytes) -> None:
    self._file.write(tfrecord(event))
    self._file.flush()

  def write(self, record: Mapping[str, Any]) -> None:
    """Writes the record's numeric values at step ``record["round"]``."""
    scalars = [(scalar_tag(k), v) for k, v in numeric_items(record)]
    if scalars:
      self._append(encode_event(time.time(), int(record[STEP_KEY]),
                                summary=scalar_summary(scalars)))

  def flush(self) -> None:
    """Events are flushed as they are written; kept for the interface."""
    self._file.flush()

  def truncate_after(self, last_round: int) -> None:
    """Drops every event at a step > last_round from the logdir's files.

    The files are rewritten (for readers without restart logic, such as the
    Rust data server or third-party parsers), and a SessionLog START at step
    ``last_round + 1`` is appended so that a TensorBoard that already loaded
    the old values purges them (``EventAccumulator`` restart logic).
    """
    self._file.close()
    for name in sorted(os.listdir(self.logdir)):
      if _EVENT_FILE.match(name):
        path = os.path.join(self.logdir, name)
        events = read_tfrecords(path)
        kept = [e for e in events if event_step(e) <= last_round]
        if len(kept) < len(events) or os.path.getsize(path) != sum(
            len(e) + 16 for e in events):
          tmp = os.path.join(self.logdir, ".truncating")  # readers skip it
          with open(tmp, "wb") as f:
            f.write(b"".join(tfrecord(e) for e in kept))
          os.replace(tmp, path)
    self._file = open(self.path, "ab")
    self._append(encode_event(time.time(), last_round + 1,
                              session_log_status=SESSION_LOG_START))

  def close(self) -> None:
    """Closes the event file."""
    self._file.close()


class WandbWriter:
  """Logs records to Weights & Biases (needs ``wandb``; it is optional).

  ``run_id`` names the W&B run so that a resumed training run continues it;
  with ``resume_after=R`` the W&B run is rewound to keep steps <= R.
  """

  def __init__(self, project: str, config: Mapping[str, Any] | None = None, *,
               run_id: str | None = None, resume_after: int | None = None,
               **init_kwargs: Any):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "the wandb metrics sink needs the `wandb` package, which is not "
          "installed (pip install wandb); or drop 'wandb' from the sinks"
      ) from e
    if resume_after is not None:
      if run_id is None:
        raise ValueError("resuming a W&B run needs its run_id")
      init_kwargs["resume_from"] = f"{run_id}?_step={resume_after + 1}"
    elif run_id is not None:
      init_kwargs["id"] = run_id
    self._run = wandb.init(project=project, config=dict(config or {}),
                           **init_kwargs)

  def write(self, record: Mapping[str, Any]) -> None:
    """Logs the record's numeric values at step ``record["round"]``."""
    self._run.log({scalar_tag(k): v for k, v in numeric_items(record)},
                  step=int(record[STEP_KEY]))

  def flush(self) -> None:
    """W&B sends in the background; nothing to do."""

  def truncate_after(self, last_round: int) -> None:
    """Not possible inside a W&B run: pass ``resume_after`` instead."""
    raise NotImplementedError(
        "W&B history cannot be truncated from inside a run; construct the "
        f"WandbWriter with resume_after={last_round} (W&B run rewind)")

  def close(self) -> None:
    """Finishes the W&B run."""
    self._run.finish()


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

  def truncate_after(self, last_round: int) -> None:
    """Truncates every writer after ``last_round``."""
    for writer in self.writers:
      writer.truncate_after(last_round)

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
  ``resume_after=R`` reopens them, keeping only rounds <= R.
  """
  unknown = [s for s in sinks if s not in SINK_NAMES]
  if unknown:
    raise ValueError(f"unknown metrics sinks {unknown}; known: {SINK_NAMES}")
  writers: list[MetricsWriter] = []
  try:
    for name in dict.fromkeys(sinks):
      if name == "jsonl":
        writers.append(JsonlWriter(os.path.join(workdir, "metrics.jsonl"),
                                   resume_after))
      elif name == "csv":
        writers.append(CsvWriter(os.path.join(workdir, "metrics.csv"),
                                 resume_after))
      elif name == "tensorboard":
        writers.append(TensorBoardWriter(
            os.path.join(workdir, "tensorboard"), resume_after))
      else:
        writers.append(_wandb_writer(workdir, wandb_project, config,
                                     resume_after))
  except Exception:
    MultiWriter(writers).close()
    raise
  return MultiWriter(writers)


def _wandb_writer(workdir: str, project: str,
                  config: Mapping[str, Any] | None,
                  resume_after: int | None) -> WandbWriter:
  """A W&B writer whose run id is kept in ``workdir`` for resuming."""
  id_path = os.path.join(workdir, WANDB_RUN_ID_FILE)
  if resume_after is not None and os.path.exists(id_path):
    with open(id_path) as f:
      return WandbWriter(project, config, run_id=f.read().strip(),
                         resume_after=resume_after)
  run_id = uuid.uuid4().hex[:16]
  writer = WandbWriter(project, config, run_id=run_id)
  with open(id_path, "w") as f:
    f.write(run_id + "\n")
  return writer
