"""Helpers shared by the training tests.

Metrics sinks: loop-like records and reading the files back (CSV rows,
TensorBoard's own event reader). Resume: a config with every kind of state a
resume must restore, a run crashed at a given round with a fixed noise
secret, the same run uninterrupted (one per session), and reading a
workdir's metrics back.
"""

import csv
import errno
import os
import sys

import numpy as np
import pytest

from fedjax_lab.privacy import secret_seed
from fedjax_lab.training import loop, metrics_io, setup, sinks

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def accumulate(logdir):
  """{tag: [(step, value), ...]} as TensorBoard's own reader reports it."""
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  accumulator = event_accumulator.EventAccumulator(logdir)
  accumulator.Reload()
  return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
          for tag in accumulator.Tags()["scalars"]}


def f32(value):
  """``value`` rounded to float32, as TensorBoard stores it."""
  return float(np.float32(value))


def csv_rows(path):
  """``(header, rows)`` of a CSV file, read by ``csv.DictReader``."""
  with open(path, newline="") as f:
    reader = csv.DictReader(f)
    return reader.fieldnames, list(reader)


def sink_records(rounds, scale=1.0):
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


# The secret noise seed the DP runs below draw (through the real secret path:
# drawn at the start, kept in the checkpoint, restored on resume). A resume
# that drew a new secret instead would get _OTHER_SECRET and diverge.
_SECRET = 0x1234_5678_9ABC_DEF0
_OTHER_SECRET = 0x0FED_CBA9_8765_4321


def resume_config(name="synthetic_scaffold", rounds=8):
  """SCAFFOLD (client control variates) with adaptive clipping (aggregator
  state) and an accountant: every kind of state a resume must restore."""
  sys.path.insert(0, ROOT)
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  config = module.get_config()
  config.num_rounds = rounds
  config.eval_every = 2
  config.checkpoint_every = 3
  config.client.num_epochs = 1
  config.weighting = "uniform"
  config.privacy.mechanism = "adaptive"
  config.privacy.noise_multiplier = 0.3
  config.privacy.clip_norm = 0.1
  config.metrics_sinks = "csv,tensorboard"
  return config


def fix_secret(patcher: pytest.MonkeyPatch) -> None:
  """The next secret draw gives _SECRET, any later one _OTHER_SECRET."""
  draws = iter([_SECRET] + [_OTHER_SECRET] * 10)
  patcher.setattr(secret_seed, "draw_secret_seed", lambda: next(draws))


def crashed_run(workdir: str, monkeypatch, crash_round: int) -> None:
  """Runs ``resume_config()`` in ``workdir`` until the metrics writer crashes
  at ``crash_round``; the secret stays fixed for the resume that follows (a
  resume that drew a new one would diverge)."""
  fix_secret(monkeypatch)
  with pytest.MonkeyPatch.context() as crash:
    crash_after(crash, crash_round)
    with pytest.raises(RuntimeError, match="simulated crash"):
      loop.run_experiment(setup.build_experiment(resume_config()), workdir,
                          show_progress=False)


def run_records(workdir):
  """The records of ``workdir/metrics.jsonl`` without their timings."""
  return [{k: v for k, v in r.items() if not k.endswith("seconds")}
          for r in metrics_io.read_jsonl(os.path.join(workdir,
                                                      "metrics.jsonl"))]


def crash_after(monkeypatch, round_number):
  """Makes the metrics writer raise when it sees ``round_number``."""
  original = sinks.MultiWriter.write

  def write(self, record):
    if record["round"] == round_number:
      raise RuntimeError("simulated crash")
    original(self, record)

  monkeypatch.setattr(sinks.MultiWriter, "write", write)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
  """``(workdir, summary)`` of ``resume_config()`` run whole, once: what
  every interrupted and resumed run must end up equal to."""
  workdir = str(tmp_path_factory.mktemp("whole"))
  with pytest.MonkeyPatch.context() as patcher:
    fix_secret(patcher)
    summary = loop.run_experiment(setup.build_experiment(resume_config()),
                                  workdir, show_progress=False)
  return workdir, summary


def csv_table(workdir):
  """{round: {column: cell}} of metrics.csv, without the timing column."""
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  return [{k: v for k, v in row.items() if not k.endswith("seconds")}
          for row in rows]


def tensorboard_points(workdir):
  """{tag: [(step, value), ...]} over the event files in name order, as a
  reader without restart logic sees them (timings left out)."""
  loader = pytest.importorskip(
      "tensorboard.backend.event_processing.event_file_loader")
  logdir = os.path.join(workdir, "tensorboard")
  points = {}
  for name in sorted(os.listdir(logdir)):
    for event in loader.EventFileLoader(os.path.join(logdir, name)).Load():
      for value in event.summary.value:
        if value.tag != "system/seconds":
          points.setdefault(value.tag, []).append((event.step,
                                                   value.simple_value))
  return points


def no_space(path):
  """The ``OSError`` of a full disk while writing ``path``."""
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
