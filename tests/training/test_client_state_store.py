"""client_state_store='disk': the run loop with per-client states on disk.

The store itself (rollback, journal, O(cohort) cost) is tested in
tests/engine/test_disk_states.py; here: a run with its client states on
disk equals the in-memory run, its checkpoints do not hold the population,
and a run killed mid-way resumes to the uninterrupted result.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from fedjax_lab.training.workdir import read_history

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SCAFFOLD = "configs/synthetic_scaffold.py:tiny"
# SCAFFOLD's control variates and, paired with them, top-k's error-feedback
# residuals: both kinds of per-client state.
_OVERRIDES = ("--config.compression.method=top_k",
              "--config.compression.fraction=0.2",
              "--config.checkpoint_every=5")


def _command(workdir, store, num_rounds):
  return [sys.executable, "-m", "experiments.run", "--noprogress",
          f"--config={SCAFFOLD}", f"--workdir={workdir}",
          f"--config.num_rounds={num_rounds}",
          f"--config.client_state_store={store}", *_OVERRIDES]


def _run(workdir, store, num_rounds):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(_command(workdir, store, num_rounds), cwd=ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 0, result.stderr[-4000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def _same(one, two):
  assert len(one) == len(two)
  for first, second in zip(one, two):
    for key, value in first.items():
      if not key.endswith("seconds"):
        assert value == second[key] or (
            isinstance(value, float) and math.isnan(value) and
            math.isnan(second[key])), (first["round"], key)


def _checkpoint_bytes(workdir, step):
  folder = os.path.join(workdir, "checkpoints", str(step))
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names)


def test_disk_store_run_equals_memory_run_and_checkpoints_skip_clients(
    tmp_path):
  memory = _run(tmp_path / "memory", "memory", 12)
  disk = _run(tmp_path / "disk", "disk", 12)
  _same(read_history(tmp_path / "memory"), read_history(tmp_path / "disk"))
  assert memory["final_eval_loss"] == disk["final_eval_loss"]
  assert os.path.isdir(tmp_path / "disk" / "client_states")
  # The memory run's checkpoint carries every client's states; the disk
  # run's only the server state (the store is committed beside it).
  assert (_checkpoint_bytes(tmp_path / "disk", 10) <
          _checkpoint_bytes(tmp_path / "memory", 10))


def test_killed_disk_store_run_resumes_to_the_uninterrupted_run(tmp_path):
  _run(tmp_path / "whole", "memory", 300)
  workdir = tmp_path / "killed"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  first = subprocess.Popen(_command(workdir, "disk", 300), cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
  checkpoint = workdir / "checkpoints" / "10"
  deadline = time.monotonic() + 240
  while not checkpoint.exists() and first.poll() is None:
    assert time.monotonic() < deadline, "no checkpoint after 240 s"
    time.sleep(0.02)
  time.sleep(0.3)  # let it write rows past the checkpoint
  first.send_signal(signal.SIGKILL)
  first.wait()
  if (workdir / "summary.json").exists():
    pytest.skip("the run finished before it was killed")
  summary = _run(workdir, "disk", 300)
  assert summary["resumed_from_round"] >= 10
  _same(read_history(tmp_path / "whole"), read_history(workdir))
