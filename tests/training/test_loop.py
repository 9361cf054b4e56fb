"""End-to-end: configs, the round loop, the runner's on-disk contract, and
exact resume after a crash, SIGKILL, SIGTERM or a full disk."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fedjax_lab.data import image_population
from fedjax_lab.training import loop, metrics_io, setup
from fedjax_lab.training import workdir as workdir_lib
from tests.training.conftest import (crashed_run, csv_table, fix_secret,
                                     no_space, resume_config, run_records)

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
  return [{k: v for k, v in r.items() if not k.endswith("seconds")}
          for r in records]


# Configs whose two tiny rounds repeat what another config's run covers (the
# same model and algorithm with another server optimizer, or DP on a larger
# model than dp_mnist's) run only with -m slow; every config is still loaded
# and validated by default (test_every_config_is_valid).
_SLOW_CONFIGS = {"dp_shakespeare", "dp_shakespeare_nwp", "shakespeare_fedadam",
                 "shakespeare_fedadagrad", "shakespeare_fedavgm",
                 "shakespeare_fedyogi", "shakespeare_nwp_fedadam"}


def test_every_config_is_valid():
  assert _SLOW_CONFIGS < set(CONFIGS)
  for name in CONFIGS:
    for mode in ("", "tiny"):
      setup.validate(_load_config(name, mode))


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.slow) if name in _SLOW_CONFIGS
    else name for name in CONFIGS])
def test_every_config_runs_two_rounds_tiny(name, tmp_path):
  config = _load_config(name)
  if config.data.name == "disk" and not config.data.path:
    # A config for a population written beforehand (the scale workload):
    # run it on a small one of the same kind.
    config.data.path = image_population.write_image_population(
        str(tmp_path / "population"), num_clients=20)
    tmp_path = tmp_path / "run"
  if config.data.name == "tff_h5" and not config.data.path:
    # A config for TFF files a user downloaded: run it on miniature ones.
    from tests.data import test_tff_h5  # pylint: disable=g-import-not-at-top
    config.data.path = str(test_tff_h5.stackoverflow_files(tmp_path / "so"))
    tmp_path = tmp_path / "run"
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


def test_resumed_run_equals_uninterrupted_run(uninterrupted, tmp_path,
                                              monkeypatch):
  whole, whole_summary = uninterrupted
  workdir = str(tmp_path / "run")
  crashed_run(workdir, monkeypatch, 8)
  # Checkpoints after rounds 3 and 6; rounds 7 was written after the last.
  assert [r["round"] for r in run_records(workdir)] == list(range(1, 8))
  summary = loop.run_experiment(setup.build_experiment(resume_config()),
                                workdir, show_progress=False)
  assert summary["resumed_from_round"] == 6
  assert run_records(workdir) == run_records(whole)
  assert summary["final_eval_accuracy"] == whole_summary["final_eval_accuracy"]
  assert summary["epsilon"] == whole_summary["epsilon"]
  # The CSV holds each round once, in order.
  with open(os.path.join(workdir, "metrics.csv")) as f:
    rounds = [int(line.split(",")[0]) for line in f.readlines()[1:]]
  assert rounds == list(range(1, 9))


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
  written = len(run_records(killed))
  assert written < rounds, "the run finished before it could be killed"
  resumed = _launch(killed, rounds)
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-2000:]
  assert json.loads(out.strip().splitlines()[-1])["resumed_from_round"]
  assert run_records(killed) == run_records(whole)


def test_sigterm_writes_a_checkpoint_and_exits(tmp_path):
  workdir = tmp_path / "run"
  process = _launch(workdir, 100000)
  _wait_for_checkpoint(str(workdir), process)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 130, err[-2000:]
  assert "SIGTERM received" in err and "re-run the same command" in err
  records = run_records(workdir)
  steps = workdir_lib.RunCheckpoints(
      str(workdir / workdir_lib.CHECKPOINT_DIR)).steps()
  assert steps[-1] == records[-1]["round"]  # the last round is checkpointed
  assert not (workdir / loop.SUMMARY_FILE).exists()


def test_full_disk_mid_line_and_at_the_summary_then_resume_exactly(
    uninterrupted, tmp_path, monkeypatch):
  whole, whole_summary = uninterrupted
  workdir = tmp_path / "run"
  fix_secret(monkeypatch)
  with pytest.MonkeyPatch.context() as full:
    original = metrics_io.JsonlWriter.write

    def write(self, record):
      if record["round"] == 5:  # half the line reaches the disk
        self._file.write(metrics_io.record_line(record)[:30])
        self._file.flush()
        raise no_space(self.path)
      original(self, record)

    full.setattr(metrics_io.JsonlWriter, "write", write)
    with pytest.raises(workdir_lib.WorkdirError, match="no space left"):
      loop.run_experiment(setup.build_experiment(resume_config()), str(workdir),
                          show_progress=False)
  assert not (workdir / "metrics.jsonl").read_text().endswith("\n")
  with pytest.MonkeyPatch.context() as full:
    original_json = metrics_io.write_json

    def write_json(path, obj):
      if path.endswith(loop.SUMMARY_FILE):
        with open(path + ".tmp", "w") as f:
          f.write("{")
        raise no_space(path + ".tmp")
      original_json(path, obj)

    full.setattr(metrics_io, "write_json", write_json)
    with pytest.raises(workdir_lib.WorkdirError, match="no space left"):
      loop.run_experiment(setup.build_experiment(resume_config()), str(workdir),
                          show_progress=False)
  assert not (workdir / loop.SUMMARY_FILE).exists()
  assert (workdir / loop.FINAL_STATE_FILE).exists()
  # Every round was written.
  assert run_records(str(workdir)) == run_records(whole)
  summary = loop.run_experiment(setup.build_experiment(resume_config()),
                                str(workdir), show_progress=False)
  assert summary["resumed_from_round"] == 8
  assert summary["final_eval_accuracy"] == whole_summary["final_eval_accuracy"]
  assert run_records(str(workdir)) == run_records(whole)
  assert csv_table(str(workdir)) == csv_table(whole)


@pytest.mark.parametrize("name", [
    "shakespeare_nwp_fedavg",
    pytest.param("dp_shakespeare_nwp", marks=pytest.mark.slow)])
def test_word_nwp_configs_run_with_the_word_lstm(name, tmp_path):
  """The ``:lstm`` argument swaps in Reddi et al.'s word LSTM (the default
  runs above use the transformer)."""
  config = _load_config(name, "lstm,tiny")
  assert config.model.name == "word_lstm"
  summary = loop.run_experiment(setup.build_experiment(config),
                                str(tmp_path), show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert [r["round"] for r in records] == [1, 2] and summary["rounds"] == 2
  assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in records)
  assert ("epsilon" in records[-1]) == (config.privacy.mechanism != "none")
