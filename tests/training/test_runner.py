"""End-to-end: configs, the round loop, the runner's on-disk contract."""

import glob
import json
import os
import subprocess
import sys

import pytest

from fedjax_lab.training import loop, metrics_io, setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
CONFIGS = sorted(
    os.path.basename(p)[:-3]
    for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
    if not os.path.basename(p).startswith(("_", "common")))


def _load_config(name, mode="tiny"):
  sys.path.insert(0, ROOT)
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  return module.get_config(mode)


def _without_time(records):
  return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_runs_two_rounds_tiny(name, tmp_path):
  config = _load_config(name)
  summary = loop.run_experiment(setup.build_experiment(config),
                                str(tmp_path), show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2]
  private = config.privacy.mechanism != "none"
  for record in records:
    assert {"round", "eval_loss", "eval_accuracy"} <= set(record)
    assert 0.0 <= record["eval_accuracy"] <= 1.0
    # A DP run withholds the clients' un-noised statistics and timings.
    assert ({"train_loss", "seconds"} <= set(record)) != private
    assert ("epsilon" in record) == private
  assert summary["rounds"] == 2
  if not private:
    assert summary["compilations"] <= 2
  assert json.load(open(tmp_path / "config.json"))["num_rounds"] == 2


def test_same_seed_gives_identical_metrics(tmp_path):
  config = _load_config("synthetic_logreg_fedavg")
  config.num_rounds = 3
  for run in ("a", "b"):
    loop.run_experiment(setup.build_experiment(config), str(tmp_path / run),
                        show_progress=False)
  a = metrics_io.read_jsonl(str(tmp_path / "a" / "metrics.jsonl"))
  b = metrics_io.read_jsonl(str(tmp_path / "b" / "metrics.jsonl"))
  assert _without_time(a) == _without_time(b)
  config.seed = 1
  loop.run_experiment(setup.build_experiment(config), str(tmp_path / "c"),
                      show_progress=False)
  c = metrics_io.read_jsonl(str(tmp_path / "c" / "metrics.jsonl"))
  assert _without_time(a) != _without_time(c)


def test_poisson_sampling_runs_with_variable_cohorts(tmp_path):
  config = _load_config("synthetic_logreg_fedavg")
  config.sampling = "poisson"
  config.sampling_rate = 0.2
  config.num_rounds = 6
  summary = loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                                show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  sizes = {r["num_clients"] for r in records}
  assert len(sizes) > 1  # the cohort size varies from round to round
  # One compilation per distinct bucketed shape, none per round.
  shapes = {(r["cohort_padded_size"], r["local_steps_padded"]) for r in records}
  assert summary["compilations"] == len(shapes)
  assert all(r["cohort_padded_size"] >= r["num_clients"] for r in records)


def test_divergence_stops_with_message_and_keeps_metrics(tmp_path):
  config = _load_config("synthetic_logreg_fedavg")
  config.num_rounds = 5
  config.client.learning_rate = 1e37
  with pytest.raises(loop.DivergedError, match="learning_rate"):
    loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                        show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert records  # the diverged round (and any before it) are on disk


def test_bad_configs_are_refused_with_a_reason():
  config = _load_config("synthetic_logreg_fedavg")
  config.cohort_size = 1000
  with pytest.raises(setup.ConfigError, match="cohort_size"):
    setup.build_experiment(config)
  config = _load_config("synthetic_logreg_fedavg")
  config.sampling = "poisson"
  with pytest.raises(setup.ConfigError, match="sampling_rate"):
    setup.build_experiment(config)
  config = _load_config("synthetic_logreg_fedavg")
  config.server.optimizer = "adamm"
  with pytest.raises(ValueError, match="adam"):
    setup.build_experiment(config)


def test_cli_contract(tmp_path):
  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.run",
       "--config=configs/synthetic_logreg_fedavg.py:tiny",
       f"--workdir={workdir}", "--config.num_rounds=3",
       "--config.eval_every=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert {"final_eval_accuracy", "final_eval_loss", "rounds",
          "seconds"} <= set(summary)
  assert summary["rounds"] == 3
  records = metrics_io.read_jsonl(str(workdir / "metrics.jsonl"))
  assert ["eval_loss" in r for r in records] == [False, True, True]
  assert json.load(open(workdir / "config.json"))["num_rounds"] == 3


def test_cli_reports_bad_config_and_exits_nonzero(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "experiments.run",
       "--config=configs/synthetic_logreg_fedavg.py:tiny",
       f"--workdir={tmp_path}", "--config.cohort_size=500"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert "cohort_size" in result.stderr


def test_max_seconds_stops_cleanly_with_final_eval(tmp_path):
  config = _load_config("synthetic_logreg_fedavg")
  config.num_rounds = 50
  config.eval_every = 0
  config.max_seconds = 1e-9
  summary = loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                                show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert summary["rounds"] == 1 and len(records) == 1
  assert "max_seconds" in summary["stopped_early"]
  assert records[-1]["eval_accuracy"] == summary["final_eval_accuracy"]


def test_existing_run_is_never_overwritten(tmp_path):
  config = _load_config("synthetic_logreg_fedavg")
  loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                      show_progress=False)
  before = (tmp_path / "metrics.jsonl").read_text()
  with pytest.raises(FileExistsError, match="new --workdir"):
    loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                        show_progress=False)
  assert (tmp_path / "metrics.jsonl").read_text() == before


def test_train_split_evaluation_is_recorded_on_eval_rounds(tmp_path):
  config = _load_config("synthetic_logreg_fedavg")
  config.num_rounds = 4
  config.eval_every = 2
  config.eval_train_split = True
  loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                      show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  with_train = [r["round"] for r in records if "train_eval_loss" in r]
  assert with_train == [2, 4]
  # The training examples are not the test examples: the numbers differ.
  assert records[-1]["train_eval_loss"] != records[-1]["eval_loss"]
  assert 0.0 <= records[-1]["train_eval_accuracy"] <= 1.0


def test_adaptive_fedprox_records_mu_and_refuses_dp(tmp_path):
  config = _load_config("synthetic_fedprox")
  config.num_rounds = 3
  config.fedprox.adaptive_mu = True
  config.fedprox.mu = 0.5
  loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                      show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert all(0.0 <= r["mu"] <= 1.0 for r in records)
  # Round 1 has no previous loss to beat: mu stays at its start, unless
  # decrease_after is 1 — with the default of 5 it cannot move down yet.
  assert records[0]["mu"] == pytest.approx(0.5)
  config.privacy.mechanism = "gaussian"
  config.weighting = "uniform"
  with pytest.raises(setup.ConfigError, match="adaptive_mu"):
    setup.build_experiment(config)


def test_nan_midway_stops_and_keeps_the_last_good_checkpoint(tmp_path,
                                                             monkeypatch):
  from fedjax_lab.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = _load_config("synthetic_logreg_fedavg")
  config.num_rounds, config.checkpoint_every = 8, 2
  config.client.num_epochs = 1
  original = loop._to_python  # pylint: disable=protected-access
  calls = []

  def nan_at_round_five(metrics):
    out = original(metrics)
    calls.append(1)
    if len(calls) == 5:
      out["train_loss"] = float("nan")
    return out

  monkeypatch.setattr(loop, "_to_python", nan_at_round_five)
  with pytest.raises(loop.DivergedError,
                     match=r"round 5: train_loss is nan.*checkpoint \(round 4\)"):
    loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                        show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
  steps = workdir_lib.RunCheckpoints(str(tmp_path / "checkpoints")).steps()
  assert steps == [2, 4]
  assert not (tmp_path / "summary.json").exists()
