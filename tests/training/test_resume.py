"""Checkpoints and exact resume: crashes, SIGKILL, SIGTERM, corrupt checkpoints,
torn metrics, a deleted config.json, a full disk."""

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedjax_lab.privacy import secret_seed
from fedjax_lab.training import loop, metrics_io, setup, sinks
from fedjax_lab.training import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _config(name="synthetic_scaffold", rounds=8):
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


# The secret noise seed the DP runs below draw (through the real secret path:
# drawn at the start, kept in the checkpoint, restored on resume). A resume
# that drew a new secret instead would get _OTHER_SECRET and diverge.
_SECRET = 0x1234_5678_9ABC_DEF0
_OTHER_SECRET = 0x0FED_CBA9_8765_4321


def _fix_secret(patcher: pytest.MonkeyPatch) -> None:
  """The next secret draw gives _SECRET, any later one _OTHER_SECRET."""
  draws = iter([_SECRET] + [_OTHER_SECRET] * 10)
  patcher.setattr(secret_seed, "draw_secret_seed", lambda: next(draws))


def _crashed_run(workdir: str, monkeypatch, crash_round: int) -> None:
  """Runs ``_config()`` in ``workdir`` until the metrics writer crashes at
  ``crash_round``; the secret stays fixed for the resume that follows (a
  resume that drew a new one would diverge)."""
  _fix_secret(monkeypatch)
  with pytest.MonkeyPatch.context() as crash:
    _crash_after(crash, crash_round)
    with pytest.raises(RuntimeError, match="simulated crash"):
      loop.run_experiment(setup.build_experiment(_config()), workdir,
                          show_progress=False)


def _records(workdir):
  return [{k: v for k, v in r.items() if k != "seconds"}
          for r in metrics_io.read_jsonl(os.path.join(workdir,
                                                      "metrics.jsonl"))]


def _crash_after(monkeypatch, round_number):
  """Makes the metrics writer raise when it sees ``round_number``."""
  original = sinks.MultiWriter.write

  def write(self, record):
    if record["round"] == round_number:
      raise RuntimeError("simulated crash")
    original(self, record)

  monkeypatch.setattr(sinks.MultiWriter, "write", write)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("whole"))
  with pytest.MonkeyPatch.context() as patcher:
    _fix_secret(patcher)
    summary = loop.run_experiment(setup.build_experiment(_config()), workdir,
                                  show_progress=False)
  return workdir, summary


def test_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path,
                                              monkeypatch):
  whole, whole_summary = uninterrupted
  workdir = str(tmp_path / "run")
  _crashed_run(workdir, monkeypatch, 8)
  # Checkpoints after rounds 3 and 6; rounds 7 was written after the last.
  assert [r["round"] for r in _records(workdir)] == list(range(1, 8))
  summary = loop.run_experiment(setup.build_experiment(_config()), workdir,
                                show_progress=False)
  assert summary["resumed_from_round"] == 6
  assert _records(workdir) == _records(whole)
  assert summary["final_eval_accuracy"] == whole_summary["final_eval_accuracy"]
  assert summary["epsilon"] == whole_summary["epsilon"]
  # The CSV holds each round once, in order.
  with open(os.path.join(workdir, "metrics.csv")) as f:
    rounds = [int(line.split(",")[0]) for line in f.readlines()[1:]]
  assert rounds == list(range(1, 9))


def test_finished_run_is_not_rerun(uninterrupted):
  whole, _ = uninterrupted
  with pytest.raises(FileExistsError, match="finished run"):
    loop.run_experiment(setup.build_experiment(_config()), whole,
                        show_progress=False)


def test_corrupt_newest_checkpoint_falls_back_to_previous(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = str(tmp_path / "run")
  _crashed_run(workdir, monkeypatch, 8)
  newest = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR, "6")
  damaged = 0
  for path in glob.glob(os.path.join(newest, "state", "**", "*"),
                        recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
      damaged += 1
  assert damaged
  checkpoints = workdir_lib.RunCheckpoints(os.path.dirname(newest))
  assert checkpoints.steps() == [3, 6]
  checkpoints.close()
  experiment = setup.build_experiment(_config())
  summary = loop.run_experiment(experiment, workdir, show_progress=False)
  assert summary["resumed_from_round"] == 3
  assert _records(workdir) == _records(whole)
  # The unreadable checkpoint is kept aside, not deleted.
  assert glob.glob(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR,
                                "unreadable-6-*"))


def test_changed_config_is_refused(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  _crashed_run(workdir, monkeypatch, 5)
  config = _config()
  config.client.learning_rate = 0.5
  with pytest.raises(workdir_lib.ResumeError, match="client.learning_rate"):
    loop.run_experiment(setup.build_experiment(config), workdir,
                        show_progress=False)
  config = _config(rounds=10)  # running longer is allowed
  summary = loop.run_experiment(setup.build_experiment(config), workdir,
                                show_progress=False)
  assert summary["rounds"] == 10 and summary["resumed_from_round"] == 3


def test_unfinished_run_without_checkpoint_starts_over_and_keeps_files(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"round": 1}\n')
  _fix_secret(monkeypatch)
  loop.run_experiment(setup.build_experiment(_config()), str(workdir),
                      show_progress=False)
  assert (workdir / "unfinished-1" / "metrics.jsonl").read_text() == (
      '{"round": 1}\n')
  assert _records(str(workdir)) == _records(whole)


def _launch(workdir, rounds):
  command = [sys.executable, "-m", "experiments.run",
             "--config=configs/synthetic_scaffold.py", f"--workdir={workdir}",
             "--noprogress", f"--config.num_rounds={rounds}",
             "--config.checkpoint_every=2", "--config.eval_every=2",
             "--config.client.num_epochs=1"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(workdir, process, timeout=240):
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [p for p in glob.glob(os.path.join(
        workdir, workdir_lib.CHECKPOINT_DIR, "*"))
             if os.path.basename(p).isdigit()]  # complete (renamed) steps
    if steps:
      return
    if process.poll() is not None:
      raise AssertionError("the run ended before writing a checkpoint: " +
                           process.stderr.read()[-2000:])
    time.sleep(0.2)
  raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path):
  rounds = 400
  whole = tmp_path / "whole"
  assert _launch(whole, rounds).wait(timeout=600) == 0
  killed = tmp_path / "killed"
  process = _launch(killed, rounds)
  _wait_for_checkpoint(str(killed), process)
  process.send_signal(signal.SIGKILL)
  process.wait(timeout=60)
  written = len(_records(killed))
  assert written < rounds, "the run finished before it could be killed"
  resumed = _launch(killed, rounds)
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-2000:]
  assert json.loads(out.strip().splitlines()[-1])["resumed_from_round"]
  assert _records(killed) == _records(whole)


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
  workdir = tmp_path / "run"
  process = _launch(workdir, 100000)
  _wait_for_checkpoint(str(workdir), process)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130, err[-2000:]
  assert "SIGTERM received" in err and "re-run the same command" in err
  records = _records(workdir)
  steps = workdir_lib.RunCheckpoints(
      str(workdir / workdir_lib.CHECKPOINT_DIR)).steps()
  assert steps[-1] == records[-1]["round"]  # the last round is checkpointed
  assert not (workdir / loop.SUMMARY_FILE).exists()


def test_switched_off_blocks_may_change_between_versions(tmp_path):
  saved = {"algorithm": "fedavg", "num_rounds": 5,
           "client": {"learning_rate": 0.1},
           "personalization": {"enabled": False, "clients_per_chunk": 64},
           "scaffold": {"option": "II"}}
  path = tmp_path / "config.json"
  path.write_text(json.dumps(saved))
  newer = json.loads(json.dumps(saved))
  newer["personalization"]["clients_per_chunk"] = 16  # a changed default
  newer["personalization"]["eval_batch_size"] = 32  # a new key
  newer["scaffold"]["option"] = "I"  # another algorithm's block
  newer["num_rounds"] = 9
  workdir_lib.check_resumable(str(path), newer)  # nothing that acts changed
  newer["personalization"]["enabled"] = True
  with pytest.raises(workdir_lib.ResumeError, match="personalization.enabled"):
    workdir_lib.check_resumable(str(path), newer)
  newer = json.loads(json.dumps(saved))
  newer["client"]["learning_rate"] = 0.2
  with pytest.raises(workdir_lib.ResumeError,
                     match=r"client.learning_rate: 0.1 -> 0.2"):
    workdir_lib.check_resumable(str(path), newer)


def _csv_table(workdir):
  """{round: {column: cell}} of metrics.csv, without the timing column."""
  import csv  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def _tensorboard_points(workdir):
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


def test_torn_last_line_of_the_checkpointed_round_is_written_again(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = str(tmp_path / "run")
  _crashed_run(workdir, monkeypatch, 7)  # rounds 1-6; checkpoints 3 and 6
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "r+b") as f:  # tear round 6's line (the checkpoint's)
    f.truncate(os.path.getsize(path) - 25)
  summary = loop.run_experiment(setup.build_experiment(_config()), workdir,
                                show_progress=False)
  # Round 6 is not in metrics.jsonl any more: resume from round 3, so that
  # every sink holds rounds 1-3 and the run writes rounds 4-8 again.
  assert summary["resumed_from_round"] == 3
  assert _records(workdir) == _records(whole)
  assert _csv_table(workdir) == _csv_table(whole)
  assert _tensorboard_points(workdir) == _tensorboard_points(whole)


def test_deleted_config_json_does_not_let_a_changed_config_through(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = tmp_path / "run"
  _crashed_run(str(workdir), monkeypatch, 5)
  (workdir / "config.json").unlink()
  before = sorted(os.listdir(workdir / workdir_lib.CHECKPOINT_DIR))
  config = _config()
  config.client.learning_rate = 0.5
  with pytest.raises(workdir_lib.ResumeError,
                     match=r"checkpoint.*client.learning_rate"):
    loop.run_experiment(setup.build_experiment(config), str(workdir),
                        show_progress=False)
  assert sorted(os.listdir(workdir / workdir_lib.CHECKPOINT_DIR)) == before
  assert not (workdir / "config.json").exists()
  loop.run_experiment(setup.build_experiment(_config()), str(workdir),
                      show_progress=False)
  assert _records(str(workdir)) == _records(whole)
  with open(workdir / "config.json") as f:  # written again
    assert f.read() == open(os.path.join(whole, "config.json")).read()


def _no_space(path):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def test_full_disk_while_checkpointing_keeps_the_earlier_ones(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = str(tmp_path / "run")
  _fix_secret(monkeypatch)
  with pytest.MonkeyPatch.context() as full:
    original = workdir_lib.RunCheckpoints.save

    def save(self, rounds_done, state, record):
      if rounds_done == 6:  # orbax fails half-way: its temporary folder stays
        os.makedirs(os.path.join(self.directory,
                                 "6.orbax-checkpoint-tmp-1"))
        raise _no_space(os.path.join(self.directory, "6"))
      original(self, rounds_done, state, record)

    full.setattr(workdir_lib.RunCheckpoints, "save", save)
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"no space left on the disk of .*re-run"):
      loop.run_experiment(setup.build_experiment(_config()), workdir,
                          show_progress=False)
  checkpoints = workdir_lib.RunCheckpoints(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
  assert checkpoints.steps() == [3]
  checkpoints.close()
  assert [r["round"] for r in _records(workdir)] == list(range(1, 7))
  summary = loop.run_experiment(setup.build_experiment(_config()), workdir,
                                show_progress=False)
  assert summary["resumed_from_round"] == 3
  assert _records(workdir) == _records(whole)


def test_full_disk_mid_line_and_at_the_summary_then_resume_exactly(
    uninterrupted, tmp_path, monkeypatch):
  whole, whole_summary = uninterrupted
  workdir = tmp_path / "run"
  _fix_secret(monkeypatch)
  with pytest.MonkeyPatch.context() as full:
    original = metrics_io.JsonlWriter.write

    def write(self, record):
      if record["round"] == 5:  # half the line reaches the disk
        self._file.write(metrics_io.record_line(record)[:30])
        self._file.flush()
        raise _no_space(self.path)
      original(self, record)

    full.setattr(metrics_io.JsonlWriter, "write", write)
    with pytest.raises(workdir_lib.WorkdirError, match="no space left"):
      loop.run_experiment(setup.build_experiment(_config()), str(workdir),
                          show_progress=False)
  assert not (workdir / "metrics.jsonl").read_text().endswith("\n")
  with pytest.MonkeyPatch.context() as full:
    original_json = metrics_io.write_json

    def write_json(path, obj):
      if path.endswith(loop.SUMMARY_FILE):
        with open(path + ".tmp", "w") as f:
          f.write("{")
        raise _no_space(path + ".tmp")
      original_json(path, obj)

    full.setattr(metrics_io, "write_json", write_json)
    with pytest.raises(workdir_lib.WorkdirError, match="no space left"):
      loop.run_experiment(setup.build_experiment(_config()), str(workdir),
                          show_progress=False)
  assert not (workdir / loop.SUMMARY_FILE).exists()
  assert (workdir / loop.FINAL_STATE_FILE).exists()
  assert _records(str(workdir)) == _records(whole)  # every round was written
  summary = loop.run_experiment(setup.build_experiment(_config()),
                                str(workdir), show_progress=False)
  assert summary["resumed_from_round"] == 8
  assert summary["final_eval_accuracy"] == whole_summary["final_eval_accuracy"]
  assert _records(str(workdir)) == _records(whole)
  assert _csv_table(str(workdir)) == _csv_table(whole)
