"""Writing metrics and summaries to disk (JSON, JSON lines)."""

from __future__ import annotations

import json
import math
import os
from typing import Any


def _clean(value: Any) -> Any:
  """JSON-safe value: NaN/inf become strings so every line stays valid JSON."""
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  if isinstance(value, dict):
    return {k: _clean(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_clean(v) for v in value]
  return value


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON atomically (temp file + rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(_clean(obj), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


class JsonlWriter:
  """Appends one JSON object per line, flushed after each write."""

  def __init__(self, path: str):
    self.path = path
    self._file = open(path, "a")

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(_clean(record), sort_keys=True) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All records of a JSON-lines file."""
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
