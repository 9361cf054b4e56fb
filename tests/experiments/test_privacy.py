"""experiments.privacy, the privacy calculator: epsilon, calibration, JSON,
errors."""

import json
import os
import subprocess
import sys

import pytest

from fedjax_lab.privacy import accounting

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def _run(*args):
  return subprocess.run([sys.executable, "-m", "experiments.privacy", *args],
                        cwd=ROOT, capture_output=True, text=True, timeout=120)


def _last_json(result):
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_epsilon_poisson_rdp_json():
  result = _run("--noise_multiplier=1.1", "--sampling_rate=0.01",
                "--rounds=500", "--delta=1e-5", "--json")
  record = _last_json(result)
  spec = accounting.AccountingSpec(noise_multiplier=1.1, sampling="poisson",
                                   population=1, sampling_rate=0.01)
  assert record["epsilon"] == pytest.approx(
      accounting.epsilon(spec, 500, 1e-5), rel=1e-12)
  assert {"epsilon": record["epsilon"], "delta": 1e-5,
          "noise_multiplier": 1.1, "accountant": "rdp",
          "sampling": "poisson", "rounds": 500}.items() <= record.items()
  assert record["epsilon_rdp_classic"] > record["epsilon"]
  assert result.stdout.startswith("epsilon: ")


def test_epsilon_fixed_cohort_uses_q_from_cohort():
  record = _last_json(_run(
      "--noise_multiplier=1.1", "--sampling=fixed", "--population=1000",
      "--cohort_size=10", "--rounds=100", "--delta=1e-5", "--json"))
  spec = accounting.AccountingSpec(noise_multiplier=1.1, sampling="fixed",
                                   population=1000, cohort_size=10)
  assert record["epsilon"] == pytest.approx(
      accounting.epsilon(spec, 100, 1e-5), rel=1e-12)
  assert record["sampling_rate"] == pytest.approx(0.01)
  assert record["cohort_size"] == 10 and record["population"] == 1000


def test_calibration_prints_noise_multiplier():
  result = _run("--target_epsilon=2.0", "--sampling_rate=0.01",
                "--rounds=1000", "--delta=1e-5", "--json")
  record = _last_json(result)
  assert result.stdout.startswith("noise_multiplier: ")
  assert record["target_epsilon"] == 2.0
  assert 1.9999 <= record["epsilon"] <= 2.0
  spec = accounting.AccountingSpec(
      noise_multiplier=record["noise_multiplier"] * 0.98, sampling="poisson",
      population=1, sampling_rate=0.01)
  assert accounting.epsilon(spec, 1000, 1e-5) > 2.0


def test_tree_mechanism():
  record = _last_json(_run(
      "--noise_multiplier=1.0", "--sampling=shuffle", "--population=1000",
      "--cohort_size=10", "--mechanism=tree", "--rounds_per_tree=25",
      "--rounds=260", "--delta=1e-5", "--json"))
  assert record["mechanism"] == "tree" and record["rounds_per_tree"] == 25
  assert record["epsilon"] > 0


@pytest.mark.parametrize("args,message", [
    (["--noise_multiplier=1", "--sampling=fixed", "--population=1000",
      "--cohort_size=10", "--accountant=pld"], "accountant=rdp"),
    (["--noise_multiplier=1", "--sampling=shuffle", "--population=1000",
      "--cohort_size=10"], "shuffl"),
    (["--sampling_rate=0.01"], "exactly one of"),
    (["--noise_multiplier=1", "--sampling_rate=0.01", "--accountant=moments"],
     "rdp, pld"),
    (["--noise_multiplier=1", "--sampling_rate=0.01", "--sampling=fixed",
      "--population=1000", "--cohort_size=20"], "disagrees"),
    (["--noise_multiplier=x", "--sampling_rate=0.01"], "noise_multiplier"),
])
def test_refused_inputs_exit_2_with_a_message(args, message):
  result = _run(*args, "--rounds=10", "--delta=1e-5")
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and message in result.stderr
  assert "Traceback" not in result.stderr
