"""experiments.plot: the PNGs each run gets, and the CLI's exit codes."""

import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import plot
from experiments.lib import runs as runs_lib
from tests.experiments.conftest import write_run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _assert_valid_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
  assert pixels.std() > 0.01  # something was drawn


def test_dp_and_plain_runs_get_every_plot(tmp_path, capsys):
  plain = write_run(tmp_path / "plain")
  private = write_run(tmp_path / "private", dp=True,
                       summary={"final_eval_accuracy": 0.81, "epsilon": 3.0,
                                "delta": 1e-3})
  out = tmp_path / "out"
  assert plot.main(["--workdir", plain, private, "--out_dir", str(out)]) == 0
  expected = {"eval_accuracy.png", "eval_loss.png", "train_loss.png",
              "epsilon.png", "accuracy_vs_epsilon.png"}
  assert set(os.listdir(out)) == expected
  assert sorted(capsys.readouterr().out.split()) == sorted(
      str(out / name) for name in expected)
  for name in expected:
    _assert_valid_png(out / name)


def test_non_dp_run_has_no_epsilon_plot_and_default_out_dir(tmp_path):
  workdir = write_run(tmp_path / "fedavg-20240101-120000")
  assert plot.main([f"--workdir={workdir}"]) == 0
  assert set(os.listdir(tmp_path / "fedavg-20240101-120000" / "plots")) == {
      "eval_accuracy.png", "eval_loss.png", "train_loss.png"}


def test_bad_paths_exit_2_naming_the_path(tmp_path):
  missing = str(tmp_path / "no_such_run")
  result = subprocess.run(
      [sys.executable, "-m", "experiments.plot", f"--workdir={missing}"],
      cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and missing in result.stderr
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(runs_lib.PlotError, match=f"no metrics.jsonl in {empty}"):
    runs_lib.discover_runs([str(empty)])
  notes = tmp_path / "README.md"
  notes.write_text("not metrics")
  with pytest.raises(runs_lib.PlotError, match="no run among"):
    runs_lib.discover_runs([str(notes)])
  (empty / "metrics.jsonl").write_text("")
  with pytest.raises(runs_lib.PlotError, match="holds no records"):
    runs_lib.discover_runs([str(empty)])


def test_per_client_accuracy_ecdf_only_when_reported(tmp_path):
  accuracies = [0.2, 0.9, 0.5, 0.7]
  personalized = write_run(
      tmp_path / "pfl", summary={"personalization": {
          "personalized_accuracy": accuracies,
          "global_accuracy": {"c0": 0.1, "c1": 0.3},
          "global_accuracy_median": 0.2, "num_clients_evaluated": 4}})
  run, = runs_lib.discover_runs([personalized])
  found = runs_lib.per_client_accuracies(run)
  assert set(found) == {"personalized_accuracy", "global_accuracy"}
  np.testing.assert_array_equal(found["personalized_accuracy"], accuracies)
  np.testing.assert_array_equal(found["global_accuracy"], [0.1, 0.3])
  out = tmp_path / "out"
  plot.main(["--workdir", personalized, "--out_dir", str(out)])
  _assert_valid_png(out / "per_client_accuracy.png")
  plain = write_run(tmp_path / "plain")
  plot.main(["--workdir", plain, "--out_dir", str(tmp_path / "out2")])
  assert not os.path.exists(tmp_path / "out2" / "per_client_accuracy.png")


def test_epsilon_axes_name_the_neighbouring_relation(tmp_path):
  """Replace-one (fixed cohorts) and add/remove (Poisson) epsilons are
  different statements: one relation goes on the axis, mixed ones into
  the legend with a warning that they are not comparable."""
  poisson = write_run(tmp_path / "poisson", dp=True, summary={
      "final_eval_accuracy": 0.8, "epsilon": 3.0, "delta": 1e-3,
      "privacy": {"neighboring_relation": "add/remove one client (all of "
                                          "its data)"}})
  fixed = write_run(tmp_path / "fixed", dp=True, config={
      "sampling": "fixed", "privacy": {"mechanism": "gaussian"}})
  ftrl = write_run(tmp_path / "ftrl", dp=True, config={
      "sampling": "shuffle", "privacy": {"mechanism": "tree"}})
  runs = runs_lib.discover_runs([poisson, fixed, ftrl])
  assert [runs_lib.neighboring_relation(r) for r in runs] == [
      "add/remove", "replace-one", "replace-special"]
  suffix, labels = runs_lib.relation_labels(runs[:1])
  assert suffix == " (add/remove neighbours)" and labels == {
      runs[0].name: runs[0].name}
  suffix, labels = runs_lib.relation_labels(runs)
  assert "not comparable" in suffix
  assert labels[runs[1].name].endswith("[replace-one]")
  out = tmp_path / "out"
  assert plot.main(["--workdir", poisson, fixed, "--out_dir", str(out)]) == 0
  _assert_valid_png(out / "epsilon.png")
