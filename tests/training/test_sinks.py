"""Metrics sinks opened for a workdir: fan-out, unknown sinks, the W&B run
id kept for resuming, and every sink completed from the JSON-lines history."""

import json
import os
import sys

import pytest

from fedjax_lab.training import metrics_io, sinks, tfevents
from tests.training.conftest import accumulate, csv_rows, f32, sink_records


def test_jsonl_resume_and_multiwriter(tmp_path):
  workdir = str(tmp_path)
  writer = sinks.open_writers(workdir, ["jsonl", "csv", "tensorboard"])
  for record in sink_records(range(1, 5)):
    writer.write(record)
  writer.close()
  resumed = sinks.open_writers(workdir, ["jsonl", "csv", "tensorboard"],
                               resume_after=2)
  for record in sink_records(range(3, 5), scale=10.0):
    resumed.write(record)
  resumed.flush()
  resumed.close()
  jsonl = metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  _, rows = csv_rows(os.path.join(workdir, "metrics.csv"))
  tensorboard = accumulate(os.path.join(workdir, "tensorboard"))
  expected = sink_records(range(1, 3)) + sink_records(range(3, 5), scale=10.0)
  assert jsonl == json.loads(json.dumps(expected))
  assert [float(r["train_loss"]) for r in rows] == [
      r["train_loss"] for r in expected]
  assert tensorboard["train/loss"] == [
      (r["round"], f32(r["train_loss"])) for r in expected]


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


def test_resume_completes_every_sink_from_the_jsonl_history(tmp_path):
  workdir = str(tmp_path)
  writer = sinks.open_writers(workdir, ["jsonl", "csv", "tensorboard"])
  for record in sink_records(range(1, 7)):
    writer.write(record)
  writer.close()
  _, whole_rows = csv_rows(os.path.join(workdir, "metrics.csv"))
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
  resumed.write(sink_records([7])[0])
  resumed.close()
  header, rows = csv_rows(csv_path)
  assert rows[:6] == whole_rows and [r["round"] for r in rows] == [
      str(r) for r in range(1, 8)]
  expected = sink_records(range(1, 8))
  assert accumulate(logdir)["train/loss"] == [
      (r["round"], f32(r["train_loss"])) for r in expected]
  assert accumulate(logdir)["eval/accuracy"] == [
      (r, f32(0.1 * r)) for r in (2, 4, 6)]
  # A sink switched on only now starts with the earlier rounds too.
  os.remove(csv_path)
  sinks.open_writers(workdir, ["jsonl", "csv"], resume_after=7).close()
  _, rows = csv_rows(csv_path)
  assert [float(r["train_loss"]) for r in rows] == [
      r["train_loss"] for r in expected]


