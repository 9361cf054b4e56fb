"""Metrics sinks: CRC-32C, TensorBoard files read back by TensorBoard, CSV,
W&B calls, and resume truncation."""

import csv
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from fedjax_lab.training import metrics_io, sinks, tfevents

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _accumulate(logdir):
  """{tag: [(step, value), ...]} as TensorBoard's own reader reports it."""
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  accumulator = event_accumulator.EventAccumulator(logdir)
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()["scalars"]}


def _f32(value):
  return float(np.float32(value))


def _csv_rows(path):
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def _records(rounds, scale=1.0):
  """Loop-like records: eval keys on even rounds, DP keys from round 2."""
  out = []
  for r in rounds:
    record = {"round": r, "train_loss": scale / r, "seconds": 0.01 * r}
    if r % 2 == 0:
      record.update(eval_accuracy=scale * 0.1 * r, eval_loss=scale * 2.0 / r)
    if r >= 2:
      record.update(epsilon=0.5 * r, clip_norm=1.0, dp_noise_std=0.3)
    out.append(record)
  return out


@pytest.mark.parametrize("data,expected", [
    (b"", 0x00000000),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),               # RFC 3720, appendix B.4
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
    (bytes(range(31, -1, -1)), 0x113FDB5C),
])
def test_crc32c_known_vectors(data, expected):
  assert tfevents.crc32c(data) == expected


def test_masked_crc_and_framing_match_tensorboard_reference():
  stub = pytest.importorskip(
      "tensorboard.compat.tensorflow_stub.pywrap_tensorflow")
  rng = random.Random(0)
  for size in (0, 1, 7, 8, 100, 1000):
    data = bytes(rng.getrandbits(8) for _ in range(size))
    assert tfevents.masked_crc32c(data) == stub.masked_crc32c(data)
    record = tfevents.tfrecord(data)
    assert len(record) == 8 + 4 + size + 4
    assert int.from_bytes(record[:8], "little") == size
    assert record[12:12 + size] == data


def test_encoded_event_parses_as_the_tensorboard_proto():
  event_pb2 = pytest.importorskip("tensorboard.compat.proto.event_pb2")
  summary = tfevents.scalar_summary([("eval/accuracy", 0.875),
                                  ("train/loss", -2.5)])
  event = event_pb2.Event.FromString(
      tfevents.encode_event(1234.5, 300, summary=summary))
  assert (event.wall_time, event.step) == (1234.5, 300)
  assert [(v.tag, v.simple_value) for v in event.summary.value] == [
      ("eval/accuracy", 0.875), ("train/loss", -2.5)]
  version = event_pb2.Event.FromString(
      tfevents.encode_event(1.0, 0, file_version="brain.Event:2"))
  assert version.file_version == "brain.Event:2"
  restart = event_pb2.Event.FromString(tfevents.encode_event(
      2.0, -3, session_log_status=tfevents.SESSION_LOG_START))
  assert restart.step == -3  # ten-byte varint of a negative int64
  assert restart.session_log.status == event_pb2.SessionLog.START


def test_scalar_tags_group_keys():
  assert {k: sinks.scalar_tag(k) for k in (
      "eval_accuracy", "train_eval_loss", "train_loss", "epsilon",
      "dp_noise_std", "fraction_clipped", "seconds", "update_norm",
      "custom/tag")} == {
          "eval_accuracy": "eval/accuracy",
          "train_eval_loss": "train_eval/loss",
          "train_loss": "train/loss", "epsilon": "privacy/epsilon",
          "dp_noise_std": "privacy/dp_noise_std",
          "fraction_clipped": "privacy/fraction_clipped",
          "seconds": "system/seconds", "update_norm": "round/update_norm",
          "custom/tag": "custom/tag"}


def test_tensorboard_reader_sees_exact_values_and_steps(tmp_path):
  records = _records(range(1, 6))
  records[2]["note"] = "not a number"  # skipped, not an error
  writer = sinks.TensorBoardWriter(str(tmp_path))
  for record in records:
    writer.write(record)
  writer.close()
  scalars = _accumulate(str(tmp_path))
  expected = {}
  for record in records:
    for key, value in record.items():
      if key not in ("round", "note"):
        expected.setdefault(sinks.scalar_tag(key), []).append(
            (record["round"], _f32(value)))
  assert scalars == expected
  assert scalars["eval/accuracy"] == [(2, _f32(0.2)), (4, _f32(0.4))]


def test_tensorboard_resume_purges_later_rounds_of_every_tag(tmp_path):
  logdir = str(tmp_path)
  first = sinks.TensorBoardWriter(logdir)
  for record in _records(range(1, 7)):  # eval at 2, 4, 6
    first.write(record)
  first.close()
  with open(first.path, "ab") as f:  # a record torn by a crash
    f.write(tfevents.tfrecord(tfevents.encode_event(0.0, 7))[:-6])
  # Resume from a checkpoint after round 3; the new run stops after round 5,
  # so round 6's old eval values must vanish though no new value replaces them.
  resumed = sinks.TensorBoardWriter(logdir, resume_after=3)
  replayed = _records(range(4, 6), scale=10.0)
  for record in replayed:
    resumed.write(record)
  resumed.close()
  names = sorted(os.listdir(logdir))
  assert len(names) == 2 and names[-1] == os.path.basename(resumed.path)
  scalars = _accumulate(logdir)
  assert scalars["train/loss"] == (
      [(r, _f32(1.0 / r)) for r in (1, 2, 3)] +
      [(r, _f32(10.0 / r)) for r in (4, 5)])
  assert scalars["eval/accuracy"] == [(2, _f32(0.2)), (4, _f32(4.0))]
  for points in scalars.values():
    steps = [step for step, _ in points]
    assert steps == sorted(set(steps)) and max(steps) <= 5
  # Readers without restart logic (TensorBoard's Rust data server, plain
  # parsers) see the same: the old file holds no step > 3 and no torn tail.
  event_file_loader = pytest.importorskip(
      "tensorboard.backend.event_processing.event_file_loader")
  old_steps = [e.step for e in event_file_loader.EventFileLoader(
      os.path.join(logdir, names[0])).Load()]
  assert old_steps == [0, 1, 2, 3]
  new_events = list(event_file_loader.EventFileLoader(resumed.path).Load())
  assert [e.step for e in new_events] == [0, 4, 4, 5]
  assert new_events[1].session_log.status == new_events[1].session_log.START


def test_tensorboard_writer_imports_no_tensorflow_nor_tensorboard(tmp_path):
  code = (
      "import sys\n"
      "from fedjax_lab.training import sinks\n"
      f"w = sinks.TensorBoardWriter({str(tmp_path)!r}, resume_after=0)\n"
      "w.write({'round': 1, 'train_loss': 0.5}); w.close()\n"
      "bad = [m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'tensorboard')]\n"
      "assert not bad, bad\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert _accumulate(str(tmp_path)) == {"train/loss": [(1, 0.5)]}


def test_csv_widens_header_and_reads_back_exactly(tmp_path):
  path = str(tmp_path / "metrics.csv")
  writer = sinks.CsvWriter(path)
  records = [{"train_loss": 0.1 + 0.2, "round": 1},
             {"round": 2, "train_loss": 1 / 3, "eval_accuracy": 0.75},
             {"round": 3, "train_loss": 2.5e-17, "epsilon": 1.25,
              "stopped": None}]
  for i, record in enumerate(records):
    writer.write(record)
    header, rows = _csv_rows(path)  # a valid file after every write
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
  writer = sinks.CsvWriter(path)
  for record in _records(range(1, 7)):
    writer.write(record)
  writer.close()
  resumed = sinks.CsvWriter(path, resume_after=3)
  header, rows = _csv_rows(path)
  assert [int(r["round"]) for r in rows] == [1, 2, 3]
  for record in _records(range(4, 6), scale=10.0):
    resumed.write({**record, "new_key": 7})
  resumed.close()
  header, rows = _csv_rows(path)
  assert [int(r["round"]) for r in rows] == [1, 2, 3, 4, 5]
  assert header[:-1] == ["round", "train_loss", "seconds", "eval_accuracy",
                         "eval_loss", "epsilon", "clip_norm", "dp_noise_std"]
  assert header[-1] == "new_key"
  assert [float(r["train_loss"]) for r in rows] == [
      1.0, 0.5, 1 / 3, 10.0 / 4, 10.0 / 5]
  assert [r["new_key"] for r in rows] == ["", "", "", "7", "7"]


def test_jsonl_resume_and_multiwriter(tmp_path):
  workdir = str(tmp_path)
  writer = sinks.open_writers(workdir, ["jsonl", "csv", "tensorboard"])
  for record in _records(range(1, 5)):
    writer.write(record)
  writer.close()
  resumed = sinks.open_writers(workdir, ["jsonl", "csv", "tensorboard"],
                               resume_after=2)
  for record in _records(range(3, 5), scale=10.0):
    resumed.write(record)
  resumed.flush()
  resumed.close()
  jsonl = metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  _, rows = _csv_rows(os.path.join(workdir, "metrics.csv"))
  tensorboard = _accumulate(os.path.join(workdir, "tensorboard"))
  expected = _records(range(1, 3)) + _records(range(3, 5), scale=10.0)
  assert jsonl == json.loads(json.dumps(expected))
  assert [float(r["train_loss"]) for r in rows] == [
      r["train_loss"] for r in expected]
  assert tensorboard["train/loss"] == [
      (r["round"], _f32(r["train_loss"])) for r in expected]


def test_unknown_sink_and_missing_wandb_fail_clearly(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="unknown metrics sinks"):
    sinks.open_writers(str(tmp_path), ["csv", "tensorbored"])
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails
  with pytest.raises(ImportError, match="pip install wandb"):
    sinks.open_writers(str(tmp_path), ["csv", "wandb"])
  assert not os.path.exists(os.path.join(tmp_path, sinks.WANDB_RUN_ID_FILE))


class _FakeWandb:
  """Records wandb.init / run.log / run.finish calls."""

  def __init__(self):
    self.inits, self.logs, self.finished = [], [], 0

  def init(self, **kwargs):
    self.inits.append(kwargs)
    return self

  def log(self, values, step):
    self.logs.append((step, values))

  def finish(self):
    self.finished += 1


def test_wandb_writer_logs_tagged_scalars_and_rewinds_on_resume(
    tmp_path, monkeypatch):
  fake = _FakeWandb()
  monkeypatch.setitem(sys.modules, "wandb", fake)
  writer = sinks.open_writers(str(tmp_path), ["wandb"], config={"seed": 1})
  writer.write({"round": 3, "train_loss": 0.5, "epsilon": 2, "note": "x"})
  writer.close()
  run_id = fake.inits[0]["id"]
  assert fake.inits[0]["config"] == {"seed": 1}
  assert fake.logs == [(3, {"train/loss": 0.5, "privacy/epsilon": 2.0})]
  sinks.open_writers(str(tmp_path), ["wandb"], resume_after=7).close()
  assert fake.inits[1]["resume_from"] == f"{run_id}?_step=8"
  assert fake.finished == 2


def test_jsonl_resume_drops_a_line_torn_by_a_crash(tmp_path):
  path = str(tmp_path / "metrics.jsonl")
  writer = sinks.JsonlWriter(path)
  for record in _records(range(1, 4)):
    writer.write(record)
  writer.close()
  with open(path, "a") as f:
    f.write('{"round": 4, "train_lo')
  resumed = sinks.JsonlWriter(path, resume_after=3)
  resumed.write({"round": 4, "train_loss": 9.0})
  resumed.close()
  assert [r["round"] for r in metrics_io.read_jsonl(path)] == [1, 2, 3, 4]
  assert metrics_io.read_jsonl(path)[-1]["train_loss"] == 9.0


def test_resume_completes_every_sink_from_the_jsonl_history(tmp_path):
  workdir = str(tmp_path)
  writer = sinks.open_writers(workdir, ["jsonl", "csv", "tensorboard"])
  for record in _records(range(1, 7)):
    writer.write(record)
  writer.close()
  _, whole_rows = _csv_rows(os.path.join(workdir, "metrics.csv"))
  csv_path = os.path.join(workdir, "metrics.csv")
  with open(csv_path, "r+b") as f:  # round 6's row torn by a crash
    f.truncate(os.path.getsize(csv_path) - 5)
  logdir = os.path.join(workdir, "tensorboard")
  (event_file,) = os.listdir(logdir)
  events = tfevents.read_tfrecords(os.path.join(logdir, event_file))
  with open(os.path.join(logdir, event_file), "wb") as f:  # rounds 5, 6 lost
    f.write(b"".join(tfevents.tfrecord(e) for e in events
                     if tfevents.event_step(e) < 5))
  resumed = sinks.open_writers(workdir, ["jsonl", "csv", "tensorboard"],
                               resume_after=6)
  resumed.write(_records([7])[0])
  resumed.close()
  header, rows = _csv_rows(csv_path)
  assert rows[:6] == whole_rows and [r["round"] for r in rows] == [
      str(r) for r in range(1, 8)]
  expected = _records(range(1, 8))
  assert _accumulate(logdir)["train/loss"] == [
      (r["round"], _f32(r["train_loss"])) for r in expected]
  assert _accumulate(logdir)["eval/accuracy"] == [
      (r, _f32(0.1 * r)) for r in (2, 4, 6)]
  # A sink switched on only now starts with the earlier rounds too.
  os.remove(csv_path)
  sinks.open_writers(workdir, ["jsonl", "csv"], resume_after=7).close()
  _, rows = _csv_rows(csv_path)
  assert [float(r["train_loss"]) for r in rows] == [
      r["train_loss"] for r in expected]


def test_jsonl_line_damaged_before_the_last_is_an_error(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 1}\n{"round": 2, "x\n{"round": 3}\n')
  with pytest.raises(metrics_io.MetricsFileError, match="line 2"):
    metrics_io.read_jsonl(str(path), allow_torn_tail=True)
  with pytest.raises(metrics_io.MetricsFileError, match="line 2"):
    sinks.JsonlWriter(str(path), resume_after=3)
  path.write_text('{"round": 1}\n{"round": 2, "x')
  assert metrics_io.read_jsonl(str(path), allow_torn_tail=True) == [
      {"round": 1}]
  with pytest.raises(metrics_io.MetricsFileError, match="line 2"):
    metrics_io.read_jsonl(str(path))
