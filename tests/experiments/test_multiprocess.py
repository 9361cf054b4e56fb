"""One experiment over several local processes (jax.distributed, gloo).

``python -m experiments.run ... --num_processes=2`` starts two processes
that split every cohort's clients between them; the run must be the run one
process makes (the same metrics, the same epsilon, the same final model),
written once, and must resume after being killed.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments.lib import launcher
from fedjax_lab.training.workdir import read_history

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
# Records that legitimately differ: the cohort is padded to a multiple of
# the device count, and wall-clock times.
_UNCOMPARED = {"seconds", "host_prepare_seconds", "host_wait_seconds",
               "cohort_padded_size"}


def _command(config, workdir, num_processes, *overrides):
  return [sys.executable, "-m", "experiments.run", "--noprogress",
          f"--config={config}", f"--workdir={workdir}",
          f"--num_processes={num_processes}", *overrides]


def _run(config, workdir, num_processes, *overrides):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(_command(config, workdir, num_processes,
                                   *overrides),
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _assert_same_history(one, two, rel=1e-6):
  assert len(one) == len(two)
  for first, second in zip(one, two):
    assert set(first) == set(second)
    for key, value in first.items():
      if key in _UNCOMPARED:
        continue
      if isinstance(value, float):
        assert math.isclose(value, second[key], rel_tol=rel, abs_tol=1e-9), (
            first["round"], key, value, second[key])
      else:
        assert value == second[key], (first["round"], key)


def _final_state(workdir):
  with np.load(os.path.join(workdir, "final_state.npz")) as data:
    return [data[name] for name in sorted(data.files)]


@pytest.mark.parametrize("config,overrides", [
    # Plain FedAvg is slow: SCAFFOLD and DP-FedAvg below run the same path
    # and more.
    pytest.param("configs/synthetic_logreg_fedavg.py:tiny",
                 ("--config.num_rounds=4",), marks=pytest.mark.slow),
    # DP-FedAvg with a fixed noise seed, so both runs draw the same noise.
    ("configs/dp_mnist.py:tiny", ("--config.privacy.noise_seed=0",)),
    # SCAFFOLD: per-client control variates travel between processes.
    ("configs/synthetic_scaffold.py:tiny", ("--config.num_rounds=8",)),
], ids=["fedavg", "dp_fedavg", "scaffold"])
def test_two_processes_make_the_one_process_run(tmp_path, config, overrides):
  one = _run(config, tmp_path / "one", 1, *overrides)
  two = _run(config, tmp_path / "two", 2, *overrides)
  _assert_same_history(read_history(tmp_path / "one"),
                       read_history(tmp_path / "two"))
  assert "over 2 processes" in two["devices"]
  assert one["rounds"] == two["rounds"]
  assert one.get("epsilon") == two.get("epsilon")
  for key in ("final_eval_accuracy", "final_eval_loss"):
    assert math.isclose(one[key], two[key], rel_tol=1e-6), key
  for a, b in zip(_final_state(tmp_path / "one"),
                  _final_state(tmp_path / "two")):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # Written once: one metrics line per round, no second process's files.
  assert [r["round"] for r in read_history(tmp_path / "two")] == list(
      range(1, one["rounds"] + 1))


@pytest.mark.slow
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_run(tmp_path):
  config = "configs/synthetic_scaffold.py:tiny"
  overrides = ("--config.num_rounds=150", "--config.checkpoint_every=5")
  _run(config, tmp_path / "whole", 1, *overrides)

  workdir = tmp_path / "killed"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.Popen(_command(config, workdir, 2, *overrides),
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  checkpoint = workdir / "checkpoints" / "10"
  deadline = time.monotonic() + 240
  while not checkpoint.exists() and first.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint after 240 s"
    time.sleep(0.05)
  first.send_signal(signal.SIGKILL)  # The launcher; its children die too.
  first.wait()
  assert not (workdir / "summary.json").exists(), (
      "the run finished before it was killed; make it longer")

  summary = _run(config, workdir, 2, *overrides)
  assert summary["resumed_from_round"] >= 10
  _assert_same_history(read_history(tmp_path / "whole"), read_history(workdir))


def test_child_commands_carry_the_flags_and_one_workdir():
  argv = ["experiments/run.py", "--config=configs/x.py", "--num_processes=3",
          "--workdir", "runs/a", "--config.num_rounds=2"]
  commands = launcher.child_commands(argv, 3, "runs/a", "127.0.0.1:1234")
  assert len(commands) == 3
  for index, command in enumerate(commands):
    assert command[1:3] == ["-m", "experiments.run"]
    assert "--config=configs/x.py" in command
    assert "--config.num_rounds=2" in command
    assert command.count("--workdir=runs/a") == 1
    assert "runs/a" not in command  # the two-token form was replaced
    assert f"--process_id={index}" in command
    assert "--num_processes=3" in command
    assert "--coordinator_address=127.0.0.1:1234" in command


def test_a_failing_process_stops_the_run_with_its_exit_code(tmp_path):
  # A config error fails in every process before they join; the launcher
  # reports the failure instead of waiting forever.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      _command("configs/synthetic_logreg_fedavg.py:tiny", tmp_path / "bad",
               2, "--config.num_rounds=0"),
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error:" in result.stderr
