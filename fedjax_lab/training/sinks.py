"""Metrics sinks: JSON lines, CSV, TensorBoard (no TensorFlow), W&B, fan-out.

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
                                          event_has_summary, event_step,
                                          read_tfrecords, scalar_summary,
                                          tfrecord)

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
  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None: ...
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
  """Replaces ``path``'s content atomically; on failure (e.g. a full disk)
  the old file is left as it was and the temporary file removed."""
  tmp = f"{path}.tmp"
  try:
    with open(tmp, "w", newline="") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _round_of(value: Any) -> float:
  """A stored round number (``""`` or missing -> -inf, i.e. always kept)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return -math.inf


def _matching_prefix(rounds: Sequence[float],
                     history: Sequence[Mapping[str, Any]]) -> int:
  """How many leading ``rounds`` (a sink's, in file order) are the rounds of
  ``history``'s leading records, in the same order."""
  n = 0
  while (n < min(len(rounds), len(history)) and
         rounds[n] == _round_of(history[n].get(STEP_KEY))):
    n += 1
  return n


class JsonlWriter(metrics_io.JsonlWriter):
  """``metrics.jsonl`` (one JSON object a line) with resume truncation.

  Without ``resume_after`` the file starts empty (as every sink here does).
  """

  def __init__(self, path: str, resume_after: int | None = None,
               history: Sequence[Mapping[str, Any]] | None = None):
    if resume_after is None and os.path.exists(path):
      os.remove(path)  # a fresh run starts a fresh file
    super().__init__(path)
    if resume_after is not None:
      self.truncate_after(resume_after, history)

  def flush(self) -> None:
    """Records are flushed as they are written; kept for the interface."""
    self._file.flush()

  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None:
    """Rewrites the file without the records whose round is > last_round
    (and without a last line torn by a crash); with ``history``, as exactly
    its records (see the module docstring).

    Raises:
      metrics_io.MetricsFileError: a line before the last is not a record.
    """
    self._file.close()
    entries = metrics_io.read_jsonl_lines(self.path, allow_torn_tail=True)
    if history is None:
      kept = [line for _, line, record in entries
              if _round_of(record.get(STEP_KEY)) <= last_round]
    else:
      history = [r for r in history if _round_of(r.get(STEP_KEY)) <= last_round]
      n = _matching_prefix(
          [_round_of(record.get(STEP_KEY)) for _, _, record in entries],
          history)
      kept = ([line for _, line, _ in entries[:n]] +
              [metrics_io.record_line(dict(r)) for r in history[n:]])
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

  def __init__(self, path: str, resume_after: int | None = None,
               history: Sequence[Mapping[str, Any]] | None = None):
    self.path = path
    self._columns: list[str] = []
    self._rows: list[dict[str, str]] = []
    self._file = None
    if resume_after is not None and os.path.exists(path):
      self._columns, self._rows = _read_csv(path)
    self._rewrite()
    if resume_after is not None:
      self.truncate_after(resume_after, history)

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

  def _add_row(self, record: Mapping[str, Any]) -> dict[str, str]:
    """Adds a row to the ones in memory; returns it, or None if the header
    widened (then the file must be rewritten)."""
    row = {k: _csv_cell(v) for k, v in record.items()}
    self._rows.append(row)
    new_keys = [k for k in row if k not in self._columns]
    if new_keys:
      columns = self._columns + new_keys
      self._columns = sorted(columns, key=lambda c: c != STEP_KEY)  # stable
      return None
    return row

  def write(self, record: Mapping[str, Any]) -> None:
    """Appends one row (rewriting the file first if a key is new)."""
    row = self._add_row(record)
    if row is None:
      self._rewrite()
    else:
      csv.DictWriter(self._file, self._columns, restval="").writerow(row)
      self._file.flush()

  def flush(self) -> None:
    """Rows are flushed as they are written; kept for the interface."""
    self._file.flush()

  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None:
    """Rewrites the file without the rows whose round is > last_round; with
    ``history``, as exactly its rounds (see the module docstring)."""
    if history is None:
      self._rows = [r for r in self._rows
                    if _round_of(r.get(STEP_KEY)) <= last_round]
    else:
      history = [r for r in history if _round_of(r.get(STEP_KEY)) <= last_round]
      n = _matching_prefix([_round_of(r.get(STEP_KEY)) for r in self._rows],
                           history)
      del self._rows[n:]
      for record in history[n:]:
        self._add_row(record)
    self._rewrite()

  def close(self) -> None:
    """Closes the file."""
    self._file.close()


def _read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
  """``(columns, rows)`` of a CSV file this writer wrote; a last row torn by a
  crash (no newline) is dropped, and an unreadable file gives no rows (the
  history then rewrites them)."""
  with open(path, newline="") as f:
    text = f.read()
  if not text.endswith("\n"):
    text = text[:text.rfind("\n") + 1]  # drop a torn last row
  try:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    rows = [{k: v or "" for k, v in row.items() if k is not None}
            for row in reader]
    return list(reader.fieldnames or []), rows
  except csv.Error:
    return [], []


_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


class TensorBoardWriter:
  """Scalar TensorBoard event files, written without TensorFlow.

  Each writer starts a new ``events.out.tfevents.<seconds>.<host>`` file in
  ``logdir``; ``<seconds>`` is bumped past any file already there so that
  readers, which take a run's files in name order, read it last. Each
  record becomes one Event at step ``record["round"]`` holding every numeric
  key as a ``simple_value`` (float32) under :func:`scalar_tag`'s tag.
  """

  def __init__(self, logdir: str, resume_after: int | None = None,
               history: Sequence[Mapping[str, Any]] | None = None):
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
      self.truncate_after(resume_after, history)

  def _append(self, event: bytes) -> None:
    self._file.write(tfrecord(event))
    self._file.flush()

  def write(self, record: Mapping[str, Any]) -> None:
    """Writes the record's numeric values at step ``record["round"]``."""
    event = _scalars_event(record)
    if event is not None:
      self._append(event)

  def flush(self) -> None:
    """Events are flushed as they are written; kept for the interface."""
    self._file.flush()

  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None:
    """Drops every event at a step > last_round from the logdir's files.

    The files are rewritten (for readers without restart logic, such as the
    Rust data server or third-party parsers), and a SessionLog START at step
    ``last_round + 1`` is appended so that a TensorBoard that already loaded
    the old values purges them (``EventAccumulator`` restart logic). With
    ``history``, the rounds of it that the files lack (a record torn by a
    crash, a deleted file) are written again from it, after dropping every
    event from the first missing round on (values stay in step order).
    """
    self._file.close()
    paths = [os.path.join(self.logdir, name)
             for name in sorted(os.listdir(self.logdir))
             if _EVENT_FILE.match(name)]
    files = {path: read_tfrecords(path) for path in paths}
    limit, backfill = last_round, []
    if history is not None:
      held = {event_step(e) for events in files.values() for e in events
              if event_has_summary(e)}
      expected = [r for r in history if numeric_items(r) and
                  _round_of(r.get(STEP_KEY)) <= last_round]
      missing = [r for r in expected if int(r[STEP_KEY]) not in held]
      if missing:
        limit = int(missing[0][STEP_KEY]) - 1
        backfill = [r for r in expected if int(r[STEP_KEY]) > limit]
    for path, events in files.items():
      kept = [e for e in events if event_step(e) <= limit]
      if len(kept) < len(events) or os.path.getsize(path) != sum(
          len(e) + 16 for e in events):
        tmp = os.path.join(self.logdir, ".truncating")  # readers skip it
        try:
          with open(tmp, "wb") as f:
            f.write(b"".join(tfrecord(e) for e in kept))
          os.replace(tmp, path)
        except BaseException:
          if os.path.exists(tmp):
            os.remove(tmp)
          raise
    self._file = open(self.path, "ab")
    for record in backfill:
      self._append(_scalars_event(record))
    self._append(encode_event(time.time(), last_round + 1,
                              session_log_status=SESSION_LOG_START))

  def close(self) -> None:
    """Closes the event file."""
    self._file.close()


def _scalars_event(record: Mapping[str, Any]) -> bytes | None:
  """The Event of a record's numeric values (None when it has none)."""
  scalars = [(scalar_tag(k), v) for k, v in numeric_items(record)]
  if not scalars:
    return None
  return encode_event(time.time(), int(record[STEP_KEY]),
                      summary=scalar_summary(scalars))


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

  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None:
    """Not possible inside a W&B run: pass ``resume_after`` instead."""
    del history
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
               if _round_of(r.get(STEP_KEY)) <= resume_after]
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
