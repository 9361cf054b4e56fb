"""The TensorBoard sink read back by TensorBoard (exact values and steps,
resume purging, no TensorFlow import) and the grouping of tags."""

import os
import subprocess
import sys

import pytest

from fedjax_lab.training import dashboard_sinks, tfevents
from tests.training.conftest import accumulate, f32, sink_records

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_scalar_tags_group_keys():
  assert {k: dashboard_sinks.scalar_tag(k) for k in (
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
  records = sink_records(range(1, 6))
  records[2]["note"] = "not a number"  # skipped, not an error
  writer = dashboard_sinks.TensorBoardWriter(str(tmp_path))
  for record in records:
    writer.write(record)
  writer.close()
  scalars = accumulate(str(tmp_path))
  expected = {}
  for record in records:
    for key, value in record.items():
      if key not in ("round", "note"):
        expected.setdefault(dashboard_sinks.scalar_tag(key), []).append(
            (record["round"], f32(value)))
  assert scalars == expected
  assert scalars["eval/accuracy"] == [(2, f32(0.2)), (4, f32(0.4))]


def test_tensorboard_resume_purges_later_rounds_of_every_tag(tmp_path):
  logdir = str(tmp_path)
  first = dashboard_sinks.TensorBoardWriter(logdir)
  for record in sink_records(range(1, 7)):  # eval at 2, 4, 6
    first.write(record)
  first.close()
  with open(first.path, "ab") as f:  # a record torn by a crash
    f.write(tfevents.tfrecord(tfevents.encode_event(0.0, 7))[:-6])
  # Resume from a checkpoint after round 3; the new run stops after round 5,
  # so round 6's old eval values must vanish though no new value replaces them.
  resumed = dashboard_sinks.TensorBoardWriter(logdir, resume_after=3)
  replayed = sink_records(range(4, 6), scale=10.0)
  for record in replayed:
    resumed.write(record)
  resumed.close()
  names = sorted(os.listdir(logdir))
  assert len(names) == 2 and names[-1] == os.path.basename(resumed.path)
  scalars = accumulate(logdir)
  assert scalars["train/loss"] == (
      [(r, f32(1.0 / r)) for r in (1, 2, 3)] +
      [(r, f32(10.0 / r)) for r in (4, 5)])
  assert scalars["eval/accuracy"] == [(2, f32(0.2)), (4, f32(4.0))]
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
      "from fedjax_lab.training import dashboard_sinks\n"
      f"w = dashboard_sinks.TensorBoardWriter({str(tmp_path)!r}, resume_after=0)\n"
      "w.write({'round': 1, 'train_loss': 0.5}); w.close()\n"
      "bad = [m for m in sys.modules if m.split('.')[0] in "
      "('tensorflow', 'tensorboard')]\n"
      "assert not bad, bad\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert accumulate(str(tmp_path)) == {"train/loss": [(1, 0.5)]}
