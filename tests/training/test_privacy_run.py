"""DP runs end to end: per-round epsilon, budget stop, calibration, refusals."""

import json
import os

import jax
import numpy as np
import pytest

from configs import common
from fedjax_lab.privacy import accounting
from fedjax_lab.training import loop, metrics_io, setup
from fedjax_lab.training import workdir as workdir_lib


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
    # Un-noised statistics of the clients are withheld by default.
    for withheld in ("signal_to_noise", "train_loss", "update_norm",
                     "num_clients", "fraction_clipped", "seconds",
                     "local_steps_padded", "clipped_sum_norm"):
      assert withheld not in record and f"diagnostic/{withheld}" not in record
  epsilons = [r["epsilon"] for r in records]
  assert epsilons == sorted(epsilons) and epsilons[0] > 0
  assert summary["epsilon"] == records[-1]["epsilon"]
  assert summary["delta"] == 1e-3
  assert summary["privacy"]["sampling"] == "poisson"
  assert summary["algorithm"] == "dp-fedavg"
  assert "seconds" not in summary and "compilations" not in summary
  assert "train_loss" in summary["privacy"]["release"]["withheld"]


def test_released_diagnostics_are_labelled_everywhere(tmp_path):
  summary, records = _run(_dp_config(release_diagnostics=True), tmp_path)
  for record in records:
    # A Poisson cohort of 30 clients at q=0.2 is empty with probability
    # 0.8**30 (~0.1% a round; the seed is secret, so it happens): then the
    # clipped sum, and so its signal-to-noise ratio, is exactly zero.
    if record["diagnostic/num_clients"] == 0:
      assert record["diagnostic/signal_to_noise"] == 0
    else:
      assert 0 < record["diagnostic/signal_to_noise"] < np.inf
    assert "diagnostic/train_loss" in record and "train_loss" not in record
    assert "epsilon" in record  # released quantities keep their names
  assert "diagnostic/seconds" in summary
  assert "train_loss" in summary["privacy"]["release"][
      "diagnostics_released_not_private"]
  with open(tmp_path / "metrics.csv") as f:
    header = f.readline()
  assert "diagnostic/train_loss" in header and ",train_loss" not in header


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
  # A DP run releases the model parameters only; the full server state
  # (here: 3 rounds done) stays in the checkpoint.
  params = loop.load_final_state(str(tmp_path), template)
  assert jax.tree.structure(params) == jax.tree.structure(template.params)
  with np.load(tmp_path / loop.FINAL_STATE_FILE) as data:
    assert len(data.files) == len(jax.tree.leaves(template.params))
  checkpoints = workdir_lib.RunCheckpoints(
      str(tmp_path / workdir_lib.CHECKPOINT_DIR))
  rounds_done, state, _ = checkpoints.restore_latest((template, ()))
  checkpoints.close()
  assert rounds_done == 3 and int(state[0].round) == 3


def test_a_run_stopped_by_its_budget_resumes_without_a_round_more(tmp_path):
  spec = accounting.AccountingSpec(noise_multiplier=1.0, sampling="poisson",
                                   population=30, sampling_rate=0.2)
  target = (accounting.epsilon(spec, 3, 1e-3) +
            accounting.epsilon(spec, 4, 1e-3)) / 2  # room for 3 rounds
  config = _dp_config(target_epsilon=target, noise_seed=5)
  first, _ = _run(config, tmp_path)
  assert first["rounds"] == 3
  # A crash after the final checkpoint but before the summary was written.
  os.remove(tmp_path / loop.SUMMARY_FILE)
  os.remove(tmp_path / loop.FINAL_STATE_FILE)
  summary, records = _run(config, tmp_path)
  assert summary["rounds"] == 3 and len(records) == 3
  assert summary["epsilon"] <= target
  assert "privacy budget" in summary["stopped_early"]
  assert summary["final_eval_accuracy"] == first["final_eval_accuracy"]


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
  assert "hypothetical deployment" in privacy["note"]
  assert "a cohort of 200 clients" in privacy["note"]
  assert "a population of 10000" in privacy["note"]
  # The run as simulated: 30 clients, q = 0.2 (6 expected), and the noise of
  # 200 clients on 6: multiplier 1.0 * 6 / 200.
  simulated = accounting.AccountingSpec(noise_multiplier=6 / 200,
                                        sampling="poisson", population=30,
                                        sampling_rate=0.2)
  assert privacy["epsilon_simulated_run"] == pytest.approx(
      accounting.epsilon(simulated, 6, 1e-5), rel=1e-9)
  assert privacy["epsilon_simulated_run"] > 10 * summary["epsilon"]
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




# ------------------------------------------- secret noise, report, warnings


def _checkpoint_seed(workdir):
  checkpoints = workdir_lib.RunCheckpoints(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
  try:
    step = checkpoints.steps()[-1]
    record = checkpoints._manager.restore(  # pylint: disable=protected-access
        step, args=checkpoints._ocp.args.Composite(  # pylint: disable=protected-access
            record=checkpoints._ocp.args.JsonRestore())).record  # pylint: disable=protected-access
  finally:
    checkpoints.close()
  return int(record["noise_seed"])


def _released(records):
  return [{k: v for k, v in r.items() if k != "noise_seeded"}
          for r in records]


def test_secret_runs_differ_and_the_checkpointed_seed_reproduces_one(
    tmp_path):
  """Two runs of one config never share noise (or cohorts); the seed kept
  in the checkpoint — and only there — replays a run exactly."""
  config = _dp_config()
  first, first_records = _run(config, tmp_path / "first")
  _, second_records = _run(config, tmp_path / "second")
  assert first_records != second_records
  seed = _checkpoint_seed(str(tmp_path / "first"))
  assert str(seed) not in (tmp_path / "first" / "config.json").read_text()
  assert str(seed) not in (tmp_path / "first" / "summary.json").read_text()
  replay, replay_records = _run(_dp_config(noise_seed=seed),
                                tmp_path / "replay")
  assert _released(replay_records) == first_records
  assert all(r["noise_seeded"] == 1.0 for r in replay_records)
  assert replay["final_eval_accuracy"] == first["final_eval_accuracy"]
  assert "SEEDED" in replay["privacy"]["noise"]
  assert first["privacy"]["noise"].startswith("secret")


def test_a_checkpoint_without_its_noise_seed_is_not_resumed(tmp_path):
  """Checkpoints of older versions (noise from config.seed) are refused."""
  config = _dp_config()
  config.checkpoint_every = 2
  workdir = tmp_path / "run"
  _run(config, workdir)
  (workdir / "summary.json").unlink()  # as if interrupted after round 6
  for root, _, files in os.walk(workdir / workdir_lib.CHECKPOINT_DIR):
    for name in files:
      path = os.path.join(root, name)
      if os.path.basename(root) == "record":
        with open(path) as f:
          text = f.read()
        if "noise_seed" in text:
          record = json.loads(text)
          del record["noise_seed"]
          with open(path, "w") as f:
            json.dump(record, f)
  with pytest.raises(workdir_lib.ResumeError, match="no noise seed"):
    _run(config, workdir)


def test_config_json_records_the_resolved_delta_and_no_secret(tmp_path):
  config = _dp_config(delta=0.0)
  summary, _ = _run(config, tmp_path)
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["privacy"]["delta"] == pytest.approx(1 / 30**1.1)
  assert saved["privacy"]["delta"] == summary["delta"]
  assert saved["privacy"]["noise_seed"] == -1
  assert "1/population^1.1" in summary["privacy"]["delta_chosen"]
  assert summary["privacy"]["neighboring_relation"].startswith("add/remove")
  assert summary["privacy"]["unit"].startswith("user-level")


def test_fixed_cohort_report_names_replace_one(tmp_path):
  config = _dp_config()
  config.sampling, config.cohort_size = "fixed", 6
  plan = setup.build_experiment(config).privacy
  assert plan.describe()["neighboring_relation"].startswith("replace one")


@pytest.mark.parametrize("privacy, warning", [
    ({"noise_multiplier": 0.0}, "epsilon is infinite"),
    ({"target_epsilon": 1e-9, "calibrate": True}, "noise_multiplier="),
    ({"target_epsilon": 1e-3, "calibrate": True}, "target_epsilon=0.001"),
])
def test_meaningless_noise_levels_warn(privacy, warning, tmp_path, capsys):
  config = _dp_config(**privacy)
  config.num_rounds = 1
  summary, _ = _run(config, tmp_path)
  assert any(warning in w for w in summary["privacy"]["warnings"])
  assert "WARNING" in capsys.readouterr().err


def test_large_epsilon_warns_in_the_summary(tmp_path):
  summary, _ = _run(_dp_config(noise_multiplier=0.3), tmp_path)
  assert summary["epsilon"] > 10
  assert any("weak guarantee" in w for w in summary["privacy"]["warnings"])


def test_accounting_population_reports_the_simulated_runs_epsilon(
    tmp_path, capsys):
  """Issue repro: a population of 10^6 in the accounting makes epsilon tiny;
  the summary gives the simulated run's epsilon beside it."""
  config = _dp_config(accounting_population=1_000_000, delta=0.0)
  summary, _ = _run(config, tmp_path)
  delta = 1 / 1_000_000**1.1
  real = accounting.AccountingSpec(noise_multiplier=1.0, sampling="poisson",
                                   population=30, sampling_rate=0.2)
  assert summary["privacy"]["epsilon_simulated_run"] == pytest.approx(
      accounting.epsilon(real, 6, delta), rel=1e-9)
  assert summary["privacy"]["epsilon_simulated_run"] > 10 * summary["epsilon"]
  assert "hypothetical deployment" in capsys.readouterr().err
