"""The run's callbacks: stops, evaluation order, a user's own callback."""

import os
import time

import pytest

from configs import common
from fedjax_lab.training import callbacks, loop, metrics_io, setup


class _Run:
  """The few RunState fields the stopping callbacks read."""

  def __init__(self, rounds_done, start_round=0, started=None):
    self.rounds_done = rounds_done
    self.start_round = start_round
    self.started = time.perf_counter() if started is None else started


class _Accountant:
  def __init__(self, per_round):
    self.per_round = per_round

  def epsilon(self, rounds):
    return self.per_round * rounds


def test_time_limit_stops_after_the_round_that_passes_it():
  limit = callbacks.TimeLimit(max_seconds=5.0)
  assert limit.should_stop(_Run(3, started=time.perf_counter())) is None
  late = _Run(3, started=time.perf_counter() - 10)
  assert "max_seconds=5 reached after round 3" in limit.should_stop(late)
  # Never before this process trained a round, however late it starts.
  assert limit.should_stop(_Run(3, start_round=3,
                                started=time.perf_counter() - 10)) is None
  assert callbacks.TimeLimit(0).should_stop(late) is None


def test_privacy_budget_stops_before_the_round_that_would_exceed_it():
  budget = callbacks.PrivacyBudget(_Accountant(1.0), target_epsilon=2.5,
                                   delta=1e-5, num_rounds=10)
  assert budget.should_stop(_Run(0)) is None
  assert budget.should_stop(_Run(1)) is None  # round 2: epsilon 2
  reason = budget.should_stop(_Run(2))  # round 3 would give 3 > 2.5
  assert "round 3 would bring epsilon to 3" in reason
  assert "stopped after round 2" in reason
  # Asked before a resumed process's first round as well.
  assert budget.should_stop(_Run(2, start_round=2)) == reason
  # Past the last round there is nothing to stop.
  assert budget.should_stop(_Run(10)) is None


def _config(**privacy):
  config = common.base_config()
  config.num_rounds = 3
  config.eval_every = 2
  config.metrics_sinks = ""
  config.data.update({"name": "synthetic", "num_clients": 12})
  config.model.name = "logistic"
  config.cohort_size = 4
  config.client.max_steps = 2
  if privacy:
    config.weighting = "uniform"
    config.privacy.update({"mechanism": "gaussian", "noise_multiplier": 1.0,
                           "delta": 1e-3, "noise_seed": 1, **privacy})
  return config


class _Recorder(callbacks.Callback):
  """Records the hooks it sees and adds a key to each round's record."""

  def __init__(self, fail_at=None):
    self.events = []
    self.fail_at = fail_at

  def on_start(self, run):
    self.events.append(("start", run.rounds_done))

  def after_round(self, run):
    # Evaluation ran before this callback: eval keys are already there.
    self.events.append(("round", run.rounds_done, "eval_loss" in run.record,
                        run.is_last))
    if run.rounds_done == self.fail_at:
      raise RuntimeError("user callback failed")
    run.record["user_statistic"] = 1.0

  def on_end(self, run):
    self.events.append(("end", run.rounds_done))

  def close(self):
    self.events.append(("close",))


def _records(workdir):
  return metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def test_hooks_run_in_order_and_user_keys_reach_the_metrics(tmp_path):
  recorder = _Recorder()
  loop.run_experiment(setup.build_experiment(_config()), str(tmp_path),
                      show_progress=False, callbacks=[recorder])
  assert recorder.events == [
      ("start", 0), ("round", 1, False, False), ("round", 2, True, False),
      ("round", 3, True, True), ("end", 3), ("close",)]
  assert [r["user_statistic"] for r in _records(tmp_path)] == [1.0] * 3


def test_a_failing_callback_closes_every_callback_and_keeps_checkpoints(
    tmp_path):
  config = _config()
  config.checkpoint_every = 1
  recorder = _Recorder(fail_at=2)
  with pytest.raises(RuntimeError, match="user callback failed"):
    loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                        show_progress=False, callbacks=[recorder])
  assert recorder.events[-1] == ("close",)
  assert ("end", 2) not in recorder.events
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  # Re-running resumes after round 1 and finishes.
  summary = loop.run_experiment(setup.build_experiment(config),
                                str(tmp_path), show_progress=False)
  assert summary["rounds"] == 3 and summary["resumed_from_round"] == 1


def test_a_user_key_in_a_dp_run_is_withheld_unless_labelled(tmp_path):
  for release, workdir in ((False, tmp_path / "default"),
                           (True, tmp_path / "diagnostics")):
    summary = loop.run_experiment(
        setup.build_experiment(_config(release_diagnostics=release)),
        str(workdir), show_progress=False, callbacks=[_Recorder()])
    records = _records(workdir)
    # The strategy report depends on the padded step count (data sizes).
    assert "strategy_effective" not in summary
    assert ("diagnostic/strategy_effective" in summary) == release
    assert all("user_statistic" not in r for r in records)
    labelled = [r.get("diagnostic/user_statistic") for r in records]
    assert labelled == ([1.0] * 3 if release else [None] * 3)
