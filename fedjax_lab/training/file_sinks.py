"""The file-format sinks: JSON lines (``metrics.jsonl``) and CSV.

Also the record conventions every sink shares: the step key (``round``),
reading a stored round number, and matching a sink's leading rounds with a
history (files are replaced with :func:`metrics_io.atomic_write`). The
interface, the resume rules and
:func:`~fedjax_lab.training.sinks.open_writers` are in
:mod:`fedjax_lab.training.sinks`; TensorBoard and W&B in
:mod:`fedjax_lab.training.dashboard_sinks`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Mapping, Sequence

from fedjax_lab.training import metrics_io

STEP_KEY = "round"


def round_of(value: Any) -> float:
  """A stored round number (``""`` or missing -> -inf, i.e. always kept)."""
  try:
    return float(value)
  except (TypeError, ValueError):
    return -math.inf


def matching_prefix(rounds: Sequence[float],
                    history: Sequence[Mapping[str, Any]]) -> int:
  """How many leading ``rounds`` (a sink's, in file order) are the rounds of
  ``history``'s leading records, in the same order."""
  n = 0
  while (n < min(len(rounds), len(history)) and
         rounds[n] == round_of(history[n].get(STEP_KEY))):
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
    its records (see :mod:`fedjax_lab.training.sinks`).

    Raises:
      metrics_io.MetricsFileError: a line before the last is not a record.
    """
    self._file.close()
    entries = metrics_io.read_jsonl_lines(self.path, allow_torn_tail=True)
    if history is None:
      kept = [line for _, line, record in entries
              if round_of(record.get(STEP_KEY)) <= last_round]
    else:
      history = [r for r in history if round_of(r.get(STEP_KEY)) <= last_round]
      n = matching_prefix(
          [round_of(record.get(STEP_KEY)) for _, _, record in entries],
          history)
      kept = ([line for _, line, _ in entries[:n]] +
              [metrics_io.record_line(dict(r)) for r in history[n:]])
    with metrics_io.atomic_write(self.path) as f:
      f.write("".join(kept))
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
    with metrics_io.atomic_write(self.path) as f:
      f.write(text.getvalue())
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
    ``history``, as exactly its rounds (see
    :mod:`fedjax_lab.training.sinks`)."""
    if history is None:
      self._rows = [r for r in self._rows
                    if round_of(r.get(STEP_KEY)) <= last_round]
    else:
      history = [r for r in history if round_of(r.get(STEP_KEY)) <= last_round]
      n = matching_prefix([round_of(r.get(STEP_KEY)) for r in self._rows],
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
