"""The workdir: its lock, damaged metrics, unusable directories (a file, read
only), the single ``error:`` line the CLI prints for them, and resuming
there: a finished run left alone, changed configs refused (also with
``config.json`` deleted), switched-off blocks allowed to change, an
unfinished run without a checkpoint set aside, a torn checkpointed round
written again."""

import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from fedjax_lab.training import loop, metrics_io, setup
from fedjax_lab.training import workdir as workdir_lib
from tests.training.conftest import (crashed_run, csv_table, fix_secret,
                                     resume_config, run_records,
                                     tensorboard_points)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def _config(rounds=4):
  sys.path.insert(0, ROOT)
  module = __import__("configs.synthetic_logreg_fedavg",
                      fromlist=["get_config"])
  config = module.get_config()
  config.num_rounds = rounds
  config.checkpoint_every = 2
  config.client.num_epochs = 1
  return config


@pytest.fixture(scope="module")
def experiment():
  return setup.build_experiment(_config())


def _snapshot(directory):
  """{relative path: bytes} of every file under ``directory``."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


def test_garbage_line_in_the_middle_of_metrics_is_refused_untouched(
    experiment, tmp_path):
  workdir = tmp_path / "run"
  loop.run_experiment(experiment, str(workdir), show_progress=False)
  (workdir / loop.SUMMARY_FILE).unlink()  # as if it had been interrupted
  (workdir / loop.FINAL_STATE_FILE).unlink()
  path = workdir / "metrics.jsonl"
  lines = path.read_text().splitlines(keepends=True)
  lines[1] = "\x00\x00garbage\n"
  path.write_text("".join(lines))
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.CorruptMetricsError,
                     match=r"metrics.jsonl, line 2: not valid JSON.*"
                     r"Delete that line and every line after it"):
    loop.run_experiment(experiment, str(workdir), show_progress=False)
  assert _snapshot(workdir) == before
  assert issubclass(workdir_lib.CorruptMetricsError, workdir_lib.ResumeError)
  # A skipped round is refused as well.
  del lines[1]
  path.write_text("".join(lines))
  with pytest.raises(workdir_lib.CorruptMetricsError,
                     match=r"line 2: holds round 3 where round 2"):
    loop.run_experiment(experiment, str(workdir), show_progress=False)


def test_a_second_run_on_a_held_workdir_is_refused(experiment, tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lib.locked(workdir):
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=rf"another run \(pid {os.getpid()}\) holds"):
      loop.run_experiment(experiment, workdir, show_progress=False)
  assert os.listdir(workdir) == [workdir_lib.LOCK_FILE]  # nothing written
  # Released on every exit path, exceptions included.
  with pytest.raises(RuntimeError):
    with workdir_lib.locked(workdir):
      raise RuntimeError("boom")
  with workdir_lib.locked(workdir):
    pass


def test_lock_of_a_live_process_blocks_and_of_a_dead_one_does_not(
    experiment, tmp_path):
  workdir = str(tmp_path / "run")
  code = ("import sys, time\n"
          "from fedjax_lab.training import workdir\n"
          f"with workdir.locked({workdir!r}):\n"
          "  print('locked', flush=True)\n"
          "  time.sleep(120)\n")
  holder = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirBusyError,
                       match=rf"pid {holder.pid}\)"):
      loop.run_experiment(experiment, workdir, show_progress=False)
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  # The kernel dropped the dead holder's lock.
  summary = loop.run_experiment(experiment, workdir, show_progress=False)
  assert summary["rounds"] == 4


def test_set_aside_keeps_the_lock_in_place(experiment, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"round": 1}\n')
  loop.run_experiment(experiment, str(workdir), show_progress=False)
  assert (workdir / workdir_lib.LOCK_FILE).exists()
  assert not (workdir / "unfinished-1" / workdir_lib.LOCK_FILE).exists()
  assert (workdir / "unfinished-1" / "metrics.jsonl").exists()


def test_workdir_that_is_a_file_is_refused(experiment, tmp_path):
  path = tmp_path / "file"
  path.write_text("mine")
  with pytest.raises(workdir_lib.WorkdirError,
                     match=r"is a file, not a directory"):
    loop.run_experiment(experiment, str(path), show_progress=False)
  assert path.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0,
                    reason="root ignores file permissions")
def test_read_only_workdir_is_refused(experiment, tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  workdir.chmod(0o555)
  try:
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"Permission denied.*chmod u\+w"):
      loop.run_experiment(experiment, str(workdir), show_progress=False)
  finally:
    workdir.chmod(0o755)


@pytest.mark.parametrize("number", [errno.EACCES, errno.EROFS])
def test_unwritable_workdir_is_refused(experiment, tmp_path, monkeypatch,
                                       number):
  """What a read-only directory or file system raises, for a root user too."""
  workdir = tmp_path / "run"
  original = metrics_io.write_json

  def write_json(path, obj):
    if path.startswith(str(workdir)):
      raise OSError(number, os.strerror(number), path + ".tmp")
    original(path, obj)

  monkeypatch.setattr(metrics_io, "write_json", write_json)
  with pytest.raises(workdir_lib.WorkdirError,
                     match=rf"cannot write .*config.json.tmp "
                     rf"\({os.strerror(number)}\).*another --workdir"):
    loop.run_experiment(experiment, str(workdir), show_progress=False)


def test_unrelated_os_errors_are_not_relabelled(tmp_path):
  with pytest.raises(FileNotFoundError):
    with workdir_lib.locked(str(tmp_path / "run")):
      open(str(tmp_path / "elsewhere" / "x"))


def test_cli_prints_one_error_line_for_a_file_workdir(tmp_path):
  path = tmp_path / "file"
  path.write_text("mine")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.run",
       "--config=configs/synthetic_logreg_fedavg.py", f"--workdir={path}",
       "--noprogress", "--config.num_rounds=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1 and "is a file, not a directory" in errors[0]


def test_checkpoint_record_carries_the_config(experiment, tmp_path):
  workdir = str(tmp_path / "run")
  loop.run_experiment(experiment, workdir, show_progress=False)
  record = workdir_lib.latest_record(workdir)
  with open(os.path.join(workdir, "config.json")) as f:
    import json  # pylint: disable=g-import-not-at-top
    assert record["config"] == json.load(f)


def test_finished_run_is_not_rerun(uninterrupted):
  whole, _ = uninterrupted
  with pytest.raises(FileExistsError, match="finished run"):
    loop.run_experiment(setup.build_experiment(resume_config()), whole,
                        show_progress=False)


def test_changed_config_is_refused(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  crashed_run(workdir, monkeypatch, 5)
  config = resume_config()
  config.client.learning_rate = 0.5
  with pytest.raises(workdir_lib.ResumeError, match="client.learning_rate"):
    loop.run_experiment(setup.build_experiment(config), workdir,
                        show_progress=False)
  config = resume_config(rounds=10)  # running longer is allowed
  summary = loop.run_experiment(setup.build_experiment(config), workdir,
                                show_progress=False)
  assert summary["rounds"] == 10 and summary["resumed_from_round"] == 3


def test_unfinished_run_without_checkpoint_starts_over_and_keeps_files(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text('{"round": 1}\n')
  fix_secret(monkeypatch)
  loop.run_experiment(setup.build_experiment(resume_config()), str(workdir),
                      show_progress=False)
  assert (workdir / "unfinished-1" / "metrics.jsonl").read_text() == (
      '{"round": 1}\n')
  assert run_records(str(workdir)) == run_records(whole)


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


def test_torn_last_line_of_the_checkpointed_round_is_written_again(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = str(tmp_path / "run")
  crashed_run(workdir, monkeypatch, 7)  # rounds 1-6; checkpoints 3 and 6
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "r+b") as f:  # tear round 6's line (the checkpoint's)
    f.truncate(os.path.getsize(path) - 25)
  summary = loop.run_experiment(setup.build_experiment(resume_config()),
                                workdir, show_progress=False)
  # Round 6 is not in metrics.jsonl any more: resume from round 3, so that
  # every sink holds rounds 1-3 and the run writes rounds 4-8 again.
  assert summary["resumed_from_round"] == 3
  assert run_records(workdir) == run_records(whole)
  assert csv_table(workdir) == csv_table(whole)
  assert tensorboard_points(workdir) == tensorboard_points(whole)


def test_deleted_config_json_does_not_let_a_changed_config_through(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = tmp_path / "run"
  crashed_run(str(workdir), monkeypatch, 5)
  (workdir / "config.json").unlink()
  before = sorted(os.listdir(workdir / workdir_lib.CHECKPOINT_DIR))
  config = resume_config()
  config.client.learning_rate = 0.5
  with pytest.raises(workdir_lib.ResumeError,
                     match=r"checkpoint.*client.learning_rate"):
    loop.run_experiment(setup.build_experiment(config), str(workdir),
                        show_progress=False)
  assert sorted(os.listdir(workdir / workdir_lib.CHECKPOINT_DIR)) == before
  assert not (workdir / "config.json").exists()
  loop.run_experiment(setup.build_experiment(resume_config()), str(workdir),
                      show_progress=False)
  assert run_records(str(workdir)) == run_records(whole)
  with open(workdir / "config.json") as f:  # written again
    assert f.read() == open(os.path.join(whole, "config.json")).read()
