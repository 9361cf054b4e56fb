"""The JSON-lines and CSV sinks: widening CSV headers, exact read-back, and
resume truncation (torn and damaged lines)."""

import pytest

from fedjax_lab.training import file_sinks, metrics_io
from tests.training.conftest import csv_rows, sink_records


def test_csv_widens_header_and_reads_back_exactly(tmp_path):
  path = str(tmp_path / "metrics.csv")
  writer = file_sinks.CsvWriter(path)
  records = [{"train_loss": 0.1 + 0.2, "round": 1},
             {"round": 2, "train_loss": 1 / 3, "eval_accuracy": 0.75},
             {"round": 3, "train_loss": 2.5e-17, "epsilon": 1.25,
              "stopped": None}]
  for i, record in enumerate(records):
    writer.write(record)
    header, rows = csv_rows(path)  # a valid file after every write
    assert len(rows) == i + 1
  writer.close()
  assert header == ["round", "train_loss", "eval_accuracy", "epsilon",
                    "stopped"]
  assert [float(r["train_loss"]) for r in rows] == [
      0.1 + 0.2, 1 / 3, 2.5e-17]
  assert [r["eval_accuracy"] for r in rows] == ["", "0.75", ""]
  assert [r["epsilon"] for r in rows] == ["", "", "1.25"]
  assert [r["stopped"] for r in rows] == ["", "", ""]
  assert [int(r["round"]) for r in rows] == [1, 2, 3]


def test_csv_resume_drops_later_rounds_and_keeps_the_header(tmp_path):
  path = str(tmp_path / "metrics.csv")
  writer = file_sinks.CsvWriter(path)
  for record in sink_records(range(1, 7)):
    writer.write(record)
  writer.close()
  resumed = file_sinks.CsvWriter(path, resume_after=3)
  header, rows = csv_rows(path)
  assert [int(r["round"]) for r in rows] == [1, 2, 3]
  for record in sink_records(range(4, 6), scale=10.0):
    resumed.write({**record, "new_key": 7})
  resumed.close()
  header, rows = csv_rows(path)
  assert [int(r["round"]) for r in rows] == [1, 2, 3, 4, 5]
  assert header[:-1] == ["round", "train_loss", "seconds", "eval_accuracy",
                         "eval_loss", "epsilon", "clip_norm", "dp_noise_std"]
  assert header[-1] == "new_key"
  assert [float(r["train_loss"]) for r in rows] == [
      1.0, 0.5, 1 / 3, 10.0 / 4, 10.0 / 5]
  assert [r["new_key"] for r in rows] == ["", "", "", "7", "7"]


def test_jsonl_resume_drops_a_line_torn_by_a_crash(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  writer = file_sinks.JsonlWriter(path)
  for record in sink_records(range(1, 4)):
    writer.write(record)
  writer.close()
  with open(path, "a") as f:
    f.write('{"round": 4, "train_lo')
  resumed = file_sinks.JsonlWriter(path, resume_after=3)
  resumed.write({"round": 4, "train_loss": 9.0})
  resumed.close()
  assert [r["round"] for r in metrics_io.read_jsonl(path)] == [1, 2, 3, 4]
  assert metrics_io.read_jsonl(path)[-1]["train_loss"] == 9.0


def test_jsonl_line_damaged_before_the_last_is_an_error(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 1}\n{"round": 2, "x\n{"round": 3}\n')
  with pytest.raises(metrics_io.MetricsFileError, match="line 2"):
    metrics_io.read_jsonl(str(path), allow_torn_tail=True)
  with pytest.raises(metrics_io.MetricsFileError, match="line 2"):
    file_sinks.JsonlWriter(str(path), resume_after=3)
  path.write_text('{"round": 1}\n{"round": 2, "x')
  assert metrics_io.read_jsonl(str(path), allow_torn_tail=True) == [
      {"round": 1}]
  with pytest.raises(metrics_io.MetricsFileError, match="line 2"):
    metrics_io.read_jsonl(str(path))
