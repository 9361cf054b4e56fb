"""experiments.run: the summary a run ends with, and its usage errors."""

import json
import os
import subprocess
import sys

import pytest

from experiments.lib import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = "--config=configs/synthetic_logreg_fedavg.py:tiny"


def _run(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.run",
                         "--noprogress", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_a_run_ends_with_a_summary_on_stderr_and_json_last(tmp_path):
  workdir = tmp_path / "run"
  result = _run(TINY, f"--workdir={workdir}")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  report = result.stderr[result.stderr.index("run finished:"):]
  assert f"run finished: {summary['rounds']} rounds in " in report
  assert f"accuracy {summary['final_eval_accuracy']:.4f}" in report
  assert f"loss {summary['final_eval_loss']:.4f}" in report
  assert f"results: {workdir}" in report
  assert "epsilon" not in report  # not a DP run


def test_run_report_of_a_dp_run_names_epsilon_and_delta():
  text = cli.run_report(
      {"rounds": 100, "final_eval_accuracy": 0.868, "final_eval_loss": 0.45,
       "epsilon": 4.0123, "delta": 1.07e-3,
       "privacy": {"neighboring_relation": "add/remove one client"}},
      "runs/dp")
  assert "seconds withheld" in text  # a DP summary has no seconds
  assert "epsilon 4.012 at delta 0.00107 (add/remove one client)" in text
  assert "accuracy 0.8680, loss 0.4500" in text
  assert "results: runs/dp" in text


@pytest.mark.parametrize("body, expected", [
    ("def get_config(mode=''):\n  return {'num_rounds': 2}\n",
     "get_config() returned a dict, not an ml_collections.ConfigDict"),
    ("def get_config():\n  return None\n",
     "get_config() returned None, not an ml_collections.ConfigDict"),
])
def test_a_config_that_is_not_a_config_dict_exits_2(tmp_path, body,
                                                      expected):
  (tmp_path / "bad.py").write_text(body)
  result = _run(f"--config={tmp_path / 'bad.py'}",
                f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      f"error: config file '{tmp_path / 'bad.py'}': {expected}"]


def test_an_unknown_mode_exits_2_with_one_line(tmp_path):
  result = _run("--config=configs/default.py:nosuchmode",
                f"--workdir={tmp_path / 'run'}")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: config 'configs/default.py:nosuchmode': unknown config mode "
      "'nosuchmode'; use ':tiny' or nothing."]


def test_an_extra_positional_argument_exits_2_with_one_line(tmp_path):
  result = _run(TINY, f"--workdir={tmp_path / 'run'}", "extra")
  assert result.returncode == 2
  assert result.stderr.strip().splitlines() == [
      "error: unexpected arguments: extra (every option is a --flag; see "
      "--help)"]
  assert not (tmp_path / "run").exists()
