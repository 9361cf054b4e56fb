"""The installed ``fedjax-lab`` command: subcommands from any directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from experiments import main as main_lib

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "synthetic_logreg_fedavg.py")


def _command() -> list[str]:
  """The console script if installed (``pip install -e .``), else main.py."""
  script = shutil.which("fedjax-lab")
  return [script] if script else [sys.executable, "-m", "experiments.main"]


def _run(cwd, *args, timeout=300):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([*_command(), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_console_script_is_installed():
  assert shutil.which("fedjax-lab"), "run pip install -e '.[test]'"


@pytest.mark.parametrize("args", [(), ("nosuchcommand",)])
def test_no_or_unknown_subcommand_prints_usage_and_exits_2(tmp_path, args):
  result = _run(tmp_path, *args)
  assert result.returncode == 2
  assert ("usage: fedjax-lab "
          "{run|sweep|plot|privacy|audit|population|prepare-tfds}"
          in result.stderr)
  assert "Traceback" not in result.stderr


def test_usage_names_every_command():
  text = main_lib.usage()
  for name in ("run", "sweep", "plot", "privacy", "audit", "population",
               "prepare-tfds"):
    assert f"  {name} " in text


def test_run_from_another_directory_with_a_relative_config(tmp_path):
  # A user's config in the working directory, building on the repo's.
  (tmp_path / "my_config.py").write_text(
      "from configs import synthetic_logreg_fedavg\n\n\n"
      "def get_config(mode=''):\n"
      "  return synthetic_logreg_fedavg.get_config('tiny')\n")
  result = _run(tmp_path, "run", "--config=my_config.py", "--workdir=out",
                "--noprogress")
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads(result.stdout.strip().splitlines()[-1])
  assert summary["rounds"] == 2
  assert (tmp_path / "out" / "summary.json").exists()
  assert "run finished: 2 rounds" in result.stderr


def test_default_config_resolves_relative_to_the_repo(tmp_path):
  # An unknown key is only reported after the default config was found.
  result = _run(tmp_path, "run", "--config.no_such_key=1")
  assert result.returncode == 2
  assert "unknown config key 'no_such_key'" in result.stderr
  assert "not found" not in result.stderr


def test_privacy_and_plot_take_their_modules_flags(tmp_path):
  result = _run(tmp_path, "privacy", "--noise_multiplier=1.1",
                "--sampling_rate=0.01", "--rounds=500", "--delta=1e-5",
                "--json")
  assert result.returncode == 0, result.stderr
  direct = subprocess.run(
      [sys.executable, "-m", "experiments.privacy", "--noise_multiplier=1.1",
       "--sampling_rate=0.01", "--rounds=500", "--delta=1e-5", "--json"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.stdout == direct.stdout
  result = _run(tmp_path, "plot", "--workdir", str(tmp_path / "missing"))
  assert result.returncode == 2
  assert result.stderr.startswith("error: ")


def test_sweep_and_audit_errors_are_one_line(tmp_path):
  result = _run(tmp_path, "sweep", f"--config={TINY}:tiny",
                "--sweep=client.learning_rat=0.1", "--workdir=w")
  assert result.returncode == 2
  assert result.stderr.strip().startswith("error: unknown config key")
  result = _run(tmp_path, "audit", "stray")
  assert result.returncode == 2
  assert result.stderr.strip() == (
      "error: unexpected arguments: stray (every option is a --flag; see "
      "--help)")


def test_population_writes_a_population_from_another_directory(tmp_path):
  result = _run(tmp_path, "population", "--kind=synthetic",
                "--num_clients=30", "--out=pop", "--noprogress")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (tmp_path / "pop" / "dataset.json").exists()
