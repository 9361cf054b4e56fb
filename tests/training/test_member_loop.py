"""Sweep members trained as one program equal the same members run apart.

Each test runs K members with ``api.simulate_sweep`` (one compiled program
per group) and the same configs with ``api.simulate`` one by one, and
compares what each workdir holds: every metrics.jsonl value (timings aside)
within 1e-6 relative, epsilon exactly, the summary's results.
"""

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from fedjax_lab.training import api
from fedjax_lab.training import callbacks as callbacks_lib
from fedjax_lab.training import defaults
from fedjax_lab.training import loop
from fedjax_lab.training import member_loop
from fedjax_lab.training import member_setup
from fedjax_lab.training import setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, ROOT)
from configs import synthetic_logreg_fedavg  # pylint: disable=g-import-not-at-top,wrong-import-position

# Summary keys that legitimately differ between a member and a separate run.
_RUN_SPECIFIC = ("workdir", "seconds", "compilations", "resumed_from_round")


def _config(**overrides):
  config = synthetic_logreg_fedavg.get_config()
  config.num_rounds = 4
  config.eval_every = 2
  config.client.num_epochs = 1
  config.metrics_sinks = ""
  for dotted, value in overrides.items():
    defaults.set_dotted(config, dotted, value)
  return config


def _dp(**overrides):
  return _config(**{"weighting": "uniform", "sampling": "poisson",
                    "sampling_rate": 0.3, "privacy.mechanism": "gaussian",
                    "privacy.clip_norm": 0.5, "privacy.noise_multiplier": 1.0,
                    "privacy.noise_seed": 3, **overrides})


def _assert_same_run(member, separate, rtol=1e-6):
  """Same rounds, keys and values (timings aside); epsilon exactly."""
  assert [r["round"] for r in member.history] == [
      r["round"] for r in separate.history]
  for got, want in zip(member.history, separate.history):
    assert got.keys() == want.keys()
    for key, value in want.items():
      if key.endswith("seconds"):
        continue
      if key == "epsilon":
        assert got[key] == value
      else:
        np.testing.assert_allclose(got[key], value, rtol=rtol, err_msg=key)
  assert member.summary.keys() == separate.summary.keys()
  for key, value in separate.summary.items():
    if key in _RUN_SPECIFIC:
      continue
    if isinstance(value, float):
      np.testing.assert_allclose(member.summary[key], value, rtol=rtol,
                                 err_msg=key)
    else:
      assert member.summary[key] == value, key


def _run_both(tmp_path, configs):
  together = api.simulate_sweep(
      configs, workdirs=[str(tmp_path / f"member{k}")
                         for k in range(len(configs))])
  apart = [api.simulate(config, workdir=str(tmp_path / f"apart{k}"))
           for k, config in enumerate(configs)]
  return together, apart


def test_fedavg_members_equal_separate_runs(tmp_path):
  # Learning rates (traced), seeds and lengths (host) differ; one program,
  # compiled once (fixed step padding: one padded shape every round).
  fixed = {"client.step_padding": "fixed"}
  configs = [_config(**fixed),
             _config(**{**fixed, "client.learning_rate": 0.03}),
             _config(**fixed, seed=1),
             _config(**{**fixed, "client.learning_rate": 0.05,
                        "num_rounds": 3})]
  assert member_setup.group_members(configs) == [[0, 1, 2, 3]]
  together, apart = _run_both(tmp_path, configs)
  for member, separate in zip(together, apart):
    _assert_same_run(member, separate)
    assert member.summary["compilations"] == 1
  for got, want in zip(jax.tree.leaves(together[2].params),
                       jax.tree.leaves(apart[2].params)):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_fedadam_members_equal_separate_runs(tmp_path):
  adam = {"server.optimizer": "adam", "server.learning_rate": 0.03}
  configs = [_config(**adam),
             _config(**{**adam, "server.learning_rate": 0.1}),
             _config(**{**adam, "server.hparams": {"b1": 0.5}})]
  configs[0].server.hparams = {"b1": 0.9}
  configs[1].server.hparams = {"b1": 0.9}
  together, apart = _run_both(tmp_path, configs)
  for member, separate in zip(together, apart):
    _assert_same_run(member, separate)


def test_dp_members_with_different_noise_equal_separate_runs(tmp_path):
  configs = [_dp(), _dp(**{"privacy.noise_multiplier": 2.0}),
             _dp(**{"privacy.clip_norm": 1.0, "seed": 4})]
  together, apart = _run_both(tmp_path, configs)
  for member, separate in zip(together, apart):
    _assert_same_run(member, separate)
    assert member.summary["epsilon"] == separate.summary["epsilon"]
  assert together[0].summary["epsilon"] > together[1].summary["epsilon"]


def test_a_diverging_member_is_frozen_and_the_others_go_on(tmp_path):
  configs = [_config(), _config(**{"client.learning_rate": float("inf")}),
             _config(**{"client.learning_rate": 0.03})]
  together = api.simulate_sweep(configs, workdirs=[
      str(tmp_path / f"member{k}") for k in range(3)])
  assert isinstance(together[1].error, loop.DivergedError)
  assert together[1].summary is None
  assert not os.path.exists(tmp_path / "member1" / "summary.json")
  for k in (0, 2):
    separate = api.simulate(configs[k], workdir=str(tmp_path / f"apart{k}"))
    _assert_same_run(together[k], separate)


def test_target_epsilon_stops_a_member_not_the_group(tmp_path):
  configs = [_dp(**{"privacy.target_epsilon": 1.0}), _dp()]
  together, apart = _run_both(tmp_path, configs)
  assert together[0].summary["stopped_early"]
  assert together[0].summary["rounds"] < 4 == together[1].summary["rounds"]
  for member, separate in zip(together, apart):
    _assert_same_run(member, separate)


class _SignalAfter(callbacks_lib.Callback):
  """Sends this process SIGINT after round ``rounds`` (a Ctrl-C)."""

  def __init__(self, rounds):
    self.rounds = rounds

  def after_round(self, run):
    if run.rounds_done == self.rounds:
      os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_group_resumes_to_the_same_results(tmp_path):
  configs = [_config(**{"checkpoint_every": 1}),
             _config(**{"client.learning_rate": 0.03, "checkpoint_every": 1})]
  dirs = [str(tmp_path / f"member{k}") for k in range(2)]
  experiments = [setup.build_experiment(config) for config in configs]
  with pytest.raises(loop.RunInterrupted):
    member_loop.run_members(experiments, dirs,
                            callbacks=[[_SignalAfter(2)], []])
  assert not os.path.exists(os.path.join(dirs[0], "summary.json"))
  resumed = api.simulate_sweep(configs, workdirs=dirs)
  assert all(r.summary["resumed_from_round"] == 2 for r in resumed)
  uninterrupted = api.simulate_sweep(configs, workdirs=[
      str(tmp_path / f"whole{k}") for k in range(2)])
  for member, whole in zip(resumed, uninterrupted):
    _assert_same_run(member, whole)


def test_shape_changing_keys_split_programs():
  configs = [_config(), _config(**{"client.learning_rate": 0.3}),
             _config(**{"client.batch_size": 5}), _config(seed=2),
             _config(**{"client.batch_size": 5, "num_rounds": 9}),
             _config(**{"model.name": "mlp"}), _config(**{"cohort_size": 5})]
  assert member_setup.group_members(configs) == [[0, 1, 3], [2, 4], [5], [6]]
  assert member_setup.group_members(configs, max_members=2) == [
      [0, 1], [3], [2, 4], [5], [6]]


def test_members_of_different_programs_are_refused_together(tmp_path):
  experiments = [setup.build_experiment(_config()),
                 setup.build_experiment(_config(**{"client.batch_size": 5}))]
  with pytest.raises(ValueError, match="change the compiled program"):
    member_loop.run_members(experiments, [str(tmp_path / "a"),
                                          str(tmp_path / "b")])


@pytest.mark.slow
def test_scaffold_with_adaptive_clipping_members_equal_separate_runs(
    tmp_path):
  # Per-client state (SCAFFOLD's control variates), aggregator state (the
  # adaptive clip norm) and traced adaptive settings and noise multipliers.
  from tests.training import conftest  # pylint: disable=g-import-not-at-top

  def member(**overrides):
    config = conftest.resume_config(rounds=4)
    config.metrics_sinks = ""
    config.privacy.noise_seed = 5
    for dotted, value in overrides.items():
      defaults.set_dotted(config, dotted, value)
    return config

  configs = [member(), member(**{"privacy.noise_multiplier": 0.6}),
             member(**{"privacy.adaptive.target_quantile": 0.8,
                       "client.learning_rate": 0.05})]
  assert member_setup.group_members(configs) == [[0, 1, 2]]
  together, apart = _run_both(tmp_path, configs)
  for member_result, separate in zip(together, apart):
    _assert_same_run(member_result, separate, rtol=2e-6)


@pytest.mark.slow
def test_dp_ftrl_members_equal_separate_runs(tmp_path):
  ftrl = {"sampling": "shuffle", "cohort_size": 10, "sampling_rate": 0.0,
          "privacy.mechanism": "tree", "privacy.ftrl.momentum": 0.5}
  configs = [_dp(**ftrl), _dp(**{**ftrl, "privacy.noise_multiplier": 2.0,
                                 "privacy.ftrl.momentum": 0.9})]
  together, apart = _run_both(tmp_path, configs)
  for member_result, separate in zip(together, apart):
    _assert_same_run(member_result, separate)


@pytest.mark.slow
def test_members_whose_states_differ_in_structure_run_apart(tmp_path):
  # Server momentum 0 keeps no optax trace, momentum 0.5 does: not stackable,
  # so simulate_sweep runs each as its own program (still equal to apart).
  ftrl = {"sampling": "shuffle", "cohort_size": 10, "sampling_rate": 0.0,
          "privacy.mechanism": "tree", "privacy.ftrl.momentum": 0.0}
  configs = [_dp(**ftrl), _dp(**{**ftrl, "privacy.ftrl.momentum": 0.5})]
  experiments = [setup.build_experiment(config) for config in configs]
  with pytest.raises(member_setup.NotVectorizable, match="structure"):
    member_loop.run_members(experiments, [str(tmp_path / "a"),
                                          str(tmp_path / "b")])
  assert not os.path.exists(tmp_path / "a" / "config.json")  # nothing opened
  together, apart = _run_both(tmp_path, configs)
  for member_result, separate in zip(together, apart):
    _assert_same_run(member_result, separate)


_SHARDED_SCRIPT = r"""
import sys
sys.path.insert(0, ".")
import jax
from tests.training import test_member_loop as t
from fedjax_lab.training import api
from fedjax_lab.training import member_inputs
assert jax.device_count() == 4
# Members first, the devices left over shard each member's clients.
shapes = {k: dict(member_inputs.Placement(k, True).mesh.shape)
          for k in (1, 2, 3, 4, 6)}
assert shapes == {1: {"member_shards": 1, "clients": 4},
                  2: {"member_shards": 2, "clients": 2},
                  3: {"member_shards": 2, "clients": 2},
                  4: {"member_shards": 4, "clients": 1},
                  6: {"member_shards": 4, "clients": 1}}, shapes


def same(sharded, single):
  for a, b in zip(sharded, single):
    assert a.error is None and b.error is None, (a.error, b.error)
    assert len(a.history) == len(b.history) == 4
    for ra, rb in zip(a.history, b.history):
      for key, value in rb.items():
        if not key.endswith("seconds"):
          assert abs(ra[key] - value) <= 1e-6 * abs(value), (key, ra, rb)


def apart(configs):
  for config in configs:
    config.shard_clients = False
  return api.simulate_sweep(configs)


# Three DP members: members over 2 devices x clients over 2 (one padding
# copy of member 0); per-member Poisson cohorts.
configs = [t._dp(), t._dp(**{"privacy.noise_multiplier": 2.0}),
           t._dp(**{"privacy.clip_norm": 1.0, "seed": 4})]
same(api.simulate_sweep(configs), apart(configs))
# Two members with clients in chunks (the shard_map path of a sharded
# client axis), shared cohorts.
configs = [t._config(strategy="chunked3+scan", **{"client.learning_rate": lr})
           for lr in (0.01, 0.03)]
same(api.simulate_sweep(configs), apart(configs))
# A group of one shards its clients over all four devices, as its
# separate run does.
config = t._config(strategy="chunked3+scan")
same(api.simulate_sweep([config]), [api.simulate(t._config(
    strategy="chunked3+scan"))])
print("MEMBERS_SHARDED_OK")
"""


@pytest.mark.slow
def test_members_and_clients_sharded_over_four_devices_equal_one_device():
  # Members and their clients split over four simulated devices.
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], cwd=ROOT,
                          env=env, capture_output=True, text=True,
                          timeout=600)
  assert "MEMBERS_SHARDED_OK" in result.stdout, result.stderr[-3000:]
