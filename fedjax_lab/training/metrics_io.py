"""Writing metrics and summaries to disk (JSON, JSON lines) and reading them.

JSON files are written atomically (a synced temporary file renamed into
place), so a failed write (a crash, a full disk) leaves the previous file.
JSON-lines files are appended one flushed line per record; a crash can only
tear the last line, which :func:`read_jsonl` drops when asked to.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import IO, Any, Iterator


class MetricsFileError(ValueError):
  """A JSON-lines file holds a line that is not a JSON object.

  Attributes:
    path: the file.
    line_number: the 1-based number of the offending line.
  """

  def __init__(self, path: str, line_number: int, message: str):
    super().__init__(f"{path}, line {line_number}: {message}")
    self.path = path
    self.line_number = line_number


def _clean(value: Any) -> Any:
  """JSON-safe value: NaN/inf become strings so every line stays valid JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  return value


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO[Any]]:
  """Yields a file that replaces ``path`` atomically when the block ends.

  It writes ``path.tmp``, syncs it and renames it over ``path``. On any
  failure (e.g. a full disk) the previous file at ``path`` is left as it was
  and the temporary file is removed. Text mode writes newlines unchanged.
  """
  tmp = f"{path}.tmp"
  try:
    with open(tmp, mode, **({} if "b" in mode else {"newline": ""})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON atomically (:func:`atomic_write`)."""
  with atomic_write(path) as f:
    json.dump(_clean(obj), f, indent=2, sort_keys=True)
    f.write("\n")


def record_line(record: dict[str, Any]) -> str:
  """The JSON-lines line (with its newline) of one record."""
  return json.dumps(_clean(record), sort_keys=True) + "\n"


class JsonlWriter:
  """Appends one JSON object per line, flushed after each write."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "a")

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(record_line(record))
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_jsonl_lines(path: str, allow_torn_tail: bool = False
                     ) -> list[tuple[int, str, dict[str, Any]]]:
  """``(line number, line, record)`` for each non-blank line of a JSON-lines
  file (numbers are 1-based; ``line`` ends with its newline).

  With ``allow_torn_tail`` a last line without its newline (torn by a crash
  or a full disk while it was written) is dropped.

  Raises:
    MetricsFileError: a (kept) line is not a JSON object; it names the line.
  """
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  torn = lines.pop()  # what follows the last newline ("" when none is torn)
  if torn.strip() and not allow_torn_tail:
    lines.append(torn)
  out = []
  for number, raw in enumerate(lines, start=1):
    if not raw.strip():
      continue
    try:
      line = raw.decode("utf-8")
      record = json.loads(line)
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError
      shown = raw[:60].decode("utf-8", "replace")
      raise MetricsFileError(path, number,
                             f"not valid JSON ({shown!r}: {e})") from None
    if not isinstance(record, dict):
      raise MetricsFileError(path, number,
                             f"a JSON {type(record).__name__}, not an object")
    out.append((number, line + "\n", record))
  return out


def read_jsonl(path: str, allow_torn_tail: bool = False
               ) -> list[dict[str, Any]]:
  """All records of a JSON-lines file (see :func:`read_jsonl_lines`)."""
  return [record for _, _, record in read_jsonl_lines(path, allow_torn_tail)]
