"""Metrics files: atomic JSON with non-finite numbers as strings, JSON lines
appended per record, torn last lines dropped on request and damaged lines
named."""

import json
import math

import pytest

from fedjax_lab.training import metrics_io


def test_write_json_is_atomic_and_keeps_non_finite_numbers(tmp_path,
                                                           monkeypatch):
  path = str(tmp_path / "summary.json")
  metrics_io.write_json(path, {"loss": math.nan, "values": [math.inf, 1.0]})
  assert json.loads(open(path).read()) == {"loss": "nan",
                                          "values": ["inf", 1.0]}

  def fail(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(json, "dump", fail)
  with pytest.raises(OSError):
    metrics_io.write_json(path, {"loss": 0.5})
  assert json.loads(open(path).read())["loss"] == "nan"  # the old file
  assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_jsonl_lines_torn_tail_and_damage(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  writer = metrics_io.JsonlWriter(path)
  for r in (1, 2):
    writer.write({"round": r, "loss": 1.0 / r})
  writer.close()
  with open(path, "a") as f:
    f.write('{"round": 3, "lo')  # torn by a crash
  with pytest.raises(metrics_io.MetricsFileError, match="line 3"):
    metrics_io.read_jsonl(path)
  lines = metrics_io.read_jsonl_lines(path, allow_torn_tail=True)
  assert [(n, r["round"]) for n, _, r in lines] == [(1, 1), (2, 2)]
  assert lines[0][1] == metrics_io.record_line({"round": 1, "loss": 1.0})
  with open(path, "w") as f:
    f.write('{"round": 1}\n[1, 2]\n{"round": 3}\n')
  with pytest.raises(metrics_io.MetricsFileError,
                     match=r"line 2: a JSON list, not an object") as error:
    metrics_io.read_jsonl(path, allow_torn_tail=True)
  assert error.value.line_number == 2 and error.value.path == path
