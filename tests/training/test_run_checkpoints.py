"""Run checkpoints: save and restore (typed PRNG keys, the config in every
record, the newest kept), unreadable steps set aside, and through whole runs
a corrupt newest checkpoint and a full disk while checkpointing."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.training import loop, run_checkpoints, setup
from fedjax_lab.training import workdir as workdir_lib
from tests.training.conftest import (crashed_run, fix_secret, no_space,
                                     resume_config, run_records)


def _state(scale):
  return {"w": scale * jnp.arange(3.0), "round": jnp.int32(scale),
          "key": jax.random.key(scale)}


def _assert_same(restored, expected):
  np.testing.assert_array_equal(restored["w"], expected["w"])
  assert restored["round"].dtype == jnp.int32
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(expected["key"]))


def test_save_restore_keeps_the_newest_and_carries_the_config(tmp_path):
  checkpoints = run_checkpoints.RunCheckpoints(
      str(tmp_path / "checkpoints"), max_to_keep=2, config={"seed": 1})
  try:
    for rounds in (1, 2, 3):
      checkpoints.save(rounds, _state(rounds), {"rounds_done": rounds})
    checkpoints.save(3, _state(9), {"rounds_done": 9})  # kept as it was
    assert checkpoints.steps() == [2, 3]
    step, restored, record = checkpoints.restore_latest(_state(0))
    assert step == 3 and record == {"rounds_done": 3, "config": {"seed": 1}}
    _assert_same(restored, _state(3))
    assert checkpoints.restore_latest(_state(0), max_step=2)[0] == 2
    assert checkpoints.latest_record(max_step=2)["rounds_done"] == 2
    assert checkpoints.latest_record(max_step=1) is None
  finally:
    checkpoints.close()


def test_an_unreadable_step_is_set_aside_and_the_previous_restored(tmp_path):
  directory = str(tmp_path / "checkpoints")
  checkpoints = run_checkpoints.RunCheckpoints(directory)
  try:
    for rounds in (1, 2):
      checkpoints.save(rounds, _state(rounds), {"rounds_done": rounds})
    for path in glob.glob(os.path.join(directory, "2", "state", "**", "*"),
                          recursive=True):
      if os.path.isfile(path) and os.path.getsize(path) > 0:
        with open(path, "r+b") as f:
          f.truncate(max(os.path.getsize(path) // 3, 1))
    warnings = []
    step, restored, _ = checkpoints.restore_latest(_state(0),
                                                   warn=warnings.append)
    assert step == 1
    _assert_same(restored, _state(1))
    assert len(warnings) == 1 and "unreadable-2-1" in warnings[0]
    assert checkpoints.steps() == [1]
    assert os.path.isdir(os.path.join(directory, "unreadable-2-1"))
  finally:
    checkpoints.close()


def test_corrupt_newest_checkpoint_falls_back_to_previous(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = str(tmp_path / "run")
  crashed_run(workdir, monkeypatch, 8)
  newest = os.path.join(workdir, workdir_lib.CHECKPOINT_DIR, "6")
  damaged = 0
  for path in glob.glob(os.path.join(newest, "state", "**", "*"),
                        recursive=True):
    if os.path.isfile(path) and os.path.getsize(path) > 0:
      with open(path, "r+b") as f:
        f.truncate(max(os.path.getsize(path) // 3, 1))
      damaged += 1
  assert damaged
  checkpoints = run_checkpoints.RunCheckpoints(os.path.dirname(newest))
  assert checkpoints.steps() == [3, 6]
  checkpoints.close()
  experiment = setup.build_experiment(resume_config())
  summary = loop.run_experiment(experiment, workdir, show_progress=False)
  assert summary["resumed_from_round"] == 3
  assert run_records(workdir) == run_records(whole)
  # The unreadable checkpoint is kept aside, not deleted.
  assert glob.glob(os.path.join(workdir, workdir_lib.CHECKPOINT_DIR,
                                "unreadable-6-*"))


def test_full_disk_while_checkpointing_keeps_the_earlier_ones(
    uninterrupted, tmp_path, monkeypatch):
  whole, _ = uninterrupted
  workdir = str(tmp_path / "run")
  fix_secret(monkeypatch)
  with pytest.MonkeyPatch.context() as full:
    original = run_checkpoints.RunCheckpoints.save

    def save(self, rounds_done, state, record):
      if rounds_done == 6:  # orbax fails half-way: its temporary folder stays
        os.makedirs(os.path.join(self.directory,
                                 "6.orbax-checkpoint-tmp-1"))
        raise no_space(os.path.join(self.directory, "6"))
      original(self, rounds_done, state, record)

    full.setattr(run_checkpoints.RunCheckpoints, "save", save)
    with pytest.raises(workdir_lib.WorkdirError,
                       match=r"no space left on the disk of .*re-run"):
      loop.run_experiment(setup.build_experiment(resume_config()), workdir,
                          show_progress=False)
  checkpoints = run_checkpoints.RunCheckpoints(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
  assert checkpoints.steps() == [3]
  checkpoints.close()
  assert [r["round"] for r in run_records(workdir)] == list(range(1, 7))
  summary = loop.run_experiment(setup.build_experiment(resume_config()),
                                workdir, show_progress=False)
  assert summary["resumed_from_round"] == 3
  assert run_records(workdir) == run_records(whole)
