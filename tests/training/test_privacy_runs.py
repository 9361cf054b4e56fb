"""DP runs end to end: per-round epsilon, budget stop, calibration, refusals."""

import json
import os

import jax
import numpy as np
import pytest

from configs import common
from fedjax_lab.privacy import accounting
from fedjax_lab.training import checkpoint, loop, metrics_io, setup


def _dp_config(**privacy):
  """A fast DP config: logistic regression on 30 synthetic clients."""
  config = common.base_config()
  config.num_rounds = 6
  config.eval_every = 3
  config.weighting = "uniform"
  config.sampling = "poisson"
  config.sampling_rate = 0.2
  config.data.update({"name": "synthetic", "alpha": 1.0, "beta": 1.0,
                      "iid": False, "num_clients": 30, "seed": 0})
  config.model.name = "logistic"
  config.client.update({"learning_rate": 0.01, "max_steps": 2})
  config.privacy.update({"mechanism": "gaussian", "clip_norm": 1.0,
                         "noise_multiplier": 1.0, "delta": 1e-3})
  config.privacy.update(privacy)
  return config


def _run(config, workdir):
  summary = loop.run_experiment(setup.build_experiment(config), str(workdir),
                                show_progress=False)
  return summary, metrics_io.read_jsonl(os.path.join(workdir,
                                                     "metrics.jsonl"))


def test_every_round_reports_epsilon_from_the_accountant(tmp_path):
  summary, records = _run(_dp_config(), tmp_path)
  spec = accounting.AccountingSpec(noise_multiplier=1.0, sampling="poisson",
                                   population=30, sampling_rate=0.2)
  for record in records:
    assert record["epsilon"] == pytest.approx(
        accounting.epsilon(spec, record["round"], 1e-3), rel=1e-9)
    assert record["delta"] == 1e-3
    assert record["noise_multiplier"] == 1.0
    assert record["clip_norm"] == 1.0
    assert record["dp_noise_std"] == pytest.approx(1.0)
    assert 0 < record["signal_to_noise"] < np.inf
  epsilons = [r["epsilon"] for r in records]
  assert epsilons == sorted(epsilons) and epsilons[0] > 0
  assert summary["epsilon"] == records[-1]["epsilon"]
  assert summary["delta"] == 1e-3
  assert summary["privacy"]["sampling"] == "poisson"
  assert summary["algorithm"] == "dp-fedavg"


def test_run_stops_cleanly_at_the_budget_with_state_and_summary(tmp_path):
  spec = accounting.AccountingSpec(noise_multiplier=1.0, sampling="poisson",
                                   population=30, sampling_rate=0.2)
  target = (accounting.epsilon(spec, 3, 1e-3) +
            accounting.epsilon(spec, 4, 1e-3)) / 2  # room for 3 rounds
  summary, records = _run(_dp_config(target_epsilon=target), tmp_path)
  assert summary["rounds"] == 3 and len(records) == 3
  assert "privacy budget" in summary["stopped_early"]
  assert summary["epsilon"] <= target
  assert "eval_accuracy" in records[-1]  # evaluated before stopping
  on_disk = json.load(open(tmp_path / "summary.json"))
  assert on_disk["rounds"] == 3
  exp = setup.build_experiment(_dp_config())
  template = exp.algorithm.server_init(exp.model.init(jax.random.key(0)))
  state = checkpoint.load_pytree(str(tmp_path / loop.FINAL_STATE_FILE),
                                 template)
  assert int(state.round) == 3


def test_budget_too_small_for_one_round_trains_nothing(tmp_path):
  summary, records = _run(_dp_config(target_epsilon=1e-4), tmp_path)
  assert summary["rounds"] == 0 and records == []
  assert "privacy budget" in summary["stopped_early"]
  assert summary["final_eval_accuracy"] is not None


def test_calibration_picks_the_noise_that_meets_the_target(tmp_path):
  config = _dp_config(target_epsilon=2.0, calibrate=True)
  exp = setup.build_experiment(config)
  z = exp.privacy.noise_multiplier
  assert exp.privacy.calibrated
  eps = accounting.epsilon(exp.privacy.spec, config.num_rounds, 1e-3)
  assert eps <= 2.0 and eps == pytest.approx(2.0, rel=1e-2)
  summary, records = _run(config, tmp_path)
  assert summary["rounds"] == config.num_rounds  # never stopped early
  assert records[-1]["noise_multiplier"] == pytest.approx(z)


def test_large_cohort_noise_simulation_is_labelled(tmp_path):
  config = _dp_config(noise_cohort_size=200, accounting_population=10_000,
                      delta=1e-5)
  summary, records = _run(config, tmp_path)
  privacy = summary["privacy"]
  assert privacy["accounted_cohort_size"] == 200
  assert privacy["population"] == 10_000
  assert privacy["sampling_rate"] == pytest.approx(0.02)
  assert "accounted for a cohort of 200" in privacy["note"]
  # Noise on the sum scaled so its std on the mean is z C / 200.
  assert records[0]["dp_noise_std_on_mean"] == pytest.approx(1.0 / 200)
  assert all(r["accounted_cohort_size"] == 200 for r in records)
  spec = accounting.AccountingSpec(noise_multiplier=1.0, sampling="poisson",
                                   population=10_000, sampling_rate=0.02)
  assert summary["epsilon"] == pytest.approx(
      accounting.epsilon(spec, 6, 1e-5), rel=1e-9)


@pytest.mark.parametrize("overrides,message", [
    ({"sampling": "shuffle"}, "shuffl"),
    ({"sampling": "fixed", "privacy.accountant": "pld"}, "rdp"),
    ({"privacy.mechanism": "tree"}, "shuffle"),
    ({"weighting": "num_examples"}, "weighting=uniform"),
    ({"privacy.delta": 0.5}, "delta"),
    ({"privacy.calibrate": True}, "target_epsilon"),
    ({"privacy.mechanism": "dp"}, "mechanism"),
    ({"privacy.clip_norm": -1.0}, "clip_norm"),
    ({"privacy.noise_multiplier": 0.0, "privacy.target_epsilon": 3.0},
     "infinite"),
    ({"privacy.noise_cohort_size": 2}, "smaller than the simulated cohort"),
])
def test_refused_combinations_are_refused(overrides, message):
  config = _dp_config()
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for part in path:
      node = node[part]
    node[leaf] = value
  with pytest.raises(setup.ConfigError, match=message):
    setup.build_experiment(config)


def test_fixed_cohorts_are_accounted_without_replacement(tmp_path):
  config = _dp_config()
  config.sampling = "fixed"
  config.cohort_size = 6
  exp = setup.build_experiment(config)
  assert exp.privacy.spec.sampling == "fixed"
  assert accounting.neighboring_relation(exp.privacy.spec).name == (
      "REPLACE_ONE")
  poisson = accounting.AccountingSpec(noise_multiplier=1.0,
                                      sampling="poisson", population=30,
                                      sampling_rate=0.2)
  # Replace-one doubles the sensitivity: fixed cohorts cost more epsilon.
  assert accounting.epsilon(exp.privacy.spec, 6, 1e-3) > accounting.epsilon(
      poisson, 6, 1e-3)


def test_dp_ftrl_and_local_dp_runs(tmp_path):
  ftrl = _dp_config(mechanism="tree", noise_multiplier=2.0)
  ftrl.sampling = "shuffle"
  ftrl.cohort_size = 5
  summary, records = _run(ftrl, tmp_path / "ftrl")
  assert summary["algorithm"] == "dp-ftrl-fedavg"
  spec = accounting.AccountingSpec(noise_multiplier=2.0, sampling="shuffle",
                                   population=30, cohort_size=5,
                                   mechanism="tree")
  assert [r["epsilon"] for r in records] == pytest.approx(
      [accounting.epsilon(spec, t, 1e-3) for t in range(1, 7)])
  # 6 rounds per epoch (30 clients / 5): tree steps 1..6, noise std on the
  # mean z C / 5 * sqrt(popcount(step)).
  assert [r["tree_step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert [r["dp_noise_std_on_mean"] for r in records] == pytest.approx(
      [2.0 / 5 * np.sqrt(bin(s).count("1")) for s in range(1, 7)])
  local = _dp_config(mechanism="local")
  summary, records = _run(local, tmp_path / "local")
  assert summary["algorithm"] == "ldp-fedavg"
  assert summary["epsilon"] > 0


def test_runner_exits_2_on_a_refused_combination(tmp_path):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  result = subprocess.run(
      [sys.executable, "-m", "experiments.run",
       "--config=configs/dp_mnist.py:tiny", f"--workdir={tmp_path}/w",
       "--config.sampling=fixed", "--config.privacy.accountant=pld"],
      cwd=root, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert "error:" in result.stderr and "Traceback" not in result.stderr


