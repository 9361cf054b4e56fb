"""The workdir: its lock, damaged metrics, unusable directories (a file, read
only), and the single ``error:`` line the CLI prints for them."""

import errno
import os
import signal
import subprocess
import sys

import pytest

from fedjax_lab.training import loop, metrics_io, setup
from fedjax_lab.training import workdir as workdir_lib

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
