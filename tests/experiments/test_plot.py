"""experiments.plot: run discovery, labels, and the PNGs each run gets."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments import plot

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_run(folder, num_rounds=6, dp=False, summary=None, config=None,
               prefix=""):
  """A hand-made run: eval every 2 rounds; DP runs add epsilon = 0.5 * round."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"{prefix}metrics.jsonl"), "w") as f:
    for r in range(1, num_rounds + 1):
      record = {"round": r, "train_loss": 2.0 / r, "seconds": 0.1}
      if r % 2 == 0:
        record.update(eval_accuracy=0.5 + 0.05 * r, eval_loss=1.0 / r)
      if dp:
        record.update(epsilon=0.5 * r, delta=1e-3, clip_norm=1.0)
      f.write(json.dumps(record) + "\n")
  if summary is not None:
    with open(os.path.join(folder, f"{prefix}summary.json"), "w") as f:
      json.dump(summary, f)
  if config is not None:
    with open(os.path.join(folder, f"{prefix}config.json"), "w") as f:
      json.dump(config, f)
  return str(folder)


def _assert_valid_png(path):
  with open(path, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  pixels = matplotlib.image.imread(path)
  assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
  assert pixels.std() > 0.01  # something was drawn


def test_dp_and_plain_runs_get_every_plot(tmp_path, capsys):
  plain = _write_run(tmp_path / "plain")
  private = _write_run(tmp_path / "private", dp=True,
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
  workdir = _write_run(tmp_path / "fedavg-20240101-120000")
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
  with pytest.raises(plot.PlotError, match=f"no metrics.jsonl in {empty}"):
    plot.discover_runs([str(empty)])
  notes = tmp_path / "README.md"
  notes.write_text("not metrics")
  with pytest.raises(plot.PlotError, match="no run among"):
    plot.discover_runs([str(notes)])
  (empty / "metrics.jsonl").write_text("")
  with pytest.raises(plot.PlotError, match="holds no records"):
    plot.discover_runs([str(empty)])


def test_sweep_roots_and_saved_runs_expand_to_members(tmp_path):
  sweep = tmp_path / "sweep"
  for member in ("z10-seed0", "z2-seed0", "nodp-seed0"):
    _write_run(sweep / member, dp=member != "nodp-seed0")
  (sweep / "notes").mkdir()  # a subfolder without metrics is ignored
  _write_run(sweep / "z2-seed0.interrupted-1")  # moved aside by a rerun
  saved = tmp_path / "saved"
  _write_run(saved, prefix="dp_mnist.", dp=True,
             summary={"final_eval_accuracy": 0.9, "epsilon": 4.0})
  _write_run(saved, prefix="nodp.")
  (saved / "README.md").write_text("a shell glob picks this up too")
  runs = plot.discover_runs([str(sweep), str(saved),
                             *sorted(str(p) for p in saved.iterdir())])
  # The glob's files: README.md and summaries skipped, two saved runs again.
  assert [run.name for run in runs] == [
      "nodp-seed0", "z2-seed0", "z10-seed0", "saved/dp_mnist",
      "saved/nodp", "saved/dp_mnist (2)", "saved/nodp (2)"]
  assert [plot.is_private(run) for run in runs] == [
      False, True, True, True, False, True, False]
  dp_mnist = runs[3]
  # The summary's final values win over the last records'.
  assert plot.final_value(dp_mnist, "epsilon", "epsilon") == 4.0
  assert plot.final_value(runs[1], "epsilon", "epsilon") == 3.0
  assert plot.final_value(runs[1], "eval_accuracy",
                          "final_eval_accuracy") == pytest.approx(0.8)
  # sweep.json (experiments/sweep.py) fixes the members and their order.
  (sweep / "sweep.json").write_text(json.dumps({"members": [
      {"slug": "z10-seed0", "overrides": {}},
      {"slug": "nodp-seed0", "overrides": {}}]}))
  assert [run.name for run in plot.discover_runs([str(sweep)])] == [
      "z10-seed0", "nodp-seed0"]


def test_labels_drop_time_stamps_and_add_parents_on_collisions(tmp_path):
  first = _write_run(tmp_path / "a" / "run-20240101-120000")
  second = _write_run(tmp_path / "b" / "run-20240102-120000")
  other = _write_run(tmp_path / "c" / "other-20240102-120000")
  assert [r.name for r in plot.discover_runs([first, other])] == [
      "run", "other"]
  # Stamps are kept where they are what tells two runs apart.
  assert [r.name for r in plot.discover_runs([first, second])] == [
      "run-20240101-120000", "run-20240102-120000"]
  left = _write_run(tmp_path / "a" / "fedavg")
  right = _write_run(tmp_path / "b" / "fedavg")
  assert [r.name for r in plot.discover_runs([left, right, other])] == [
      "a/fedavg", "b/fedavg", "other"]


def test_series_skips_missing_keys_and_reads_non_finite_strings(tmp_path):
  folder = tmp_path / "run"
  folder.mkdir()
  records = [{"round": 1, "train_loss": 1.5}, {"round": 2},
             {"round": 3, "train_loss": "nan"},
             {"round": 4, "train_loss": "inf", "note": "text"}]
  (folder / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records))
  run, = plot.discover_runs([str(folder)])
  rounds, values = plot.series(run, "train_loss")
  np.testing.assert_array_equal(rounds, [1, 3, 4])
  np.testing.assert_array_equal(values, [1.5, np.nan, np.inf])
  assert plot.series(run, "note")[0].size == 0
  assert plot.final_value(run, "eval_accuracy", "final_eval_accuracy") is None


def test_per_client_accuracy_ecdf_only_when_reported(tmp_path):
  accuracies = [0.2, 0.9, 0.5, 0.7]
  personalized = _write_run(
      tmp_path / "pfl", summary={"personalization": {
          "personalized_accuracy": accuracies,
          "global_accuracy": {"c0": 0.1, "c1": 0.3},
          "global_accuracy_median": 0.2, "num_clients_evaluated": 4}})
  run, = plot.discover_runs([personalized])
  found = plot.per_client_accuracies(run)
  assert set(found) == {"personalized_accuracy", "global_accuracy"}
  np.testing.assert_array_equal(found["personalized_accuracy"], accuracies)
  np.testing.assert_array_equal(found["global_accuracy"], [0.1, 0.3])
  out = tmp_path / "out"
  plot.main(["--workdir", personalized, "--out_dir", str(out)])
  _assert_valid_png(out / "per_client_accuracy.png")
  plain = _write_run(tmp_path / "plain")
  plot.main(["--workdir", plain, "--out_dir", str(tmp_path / "out2")])
  assert not os.path.exists(tmp_path / "out2" / "per_client_accuracy.png")


def test_epsilon_axes_name_the_neighbouring_relation(tmp_path):
  """Replace-one (fixed cohorts) and add/remove (Poisson) epsilons are
  different statements: one relation goes on the axis, mixed ones into
  the legend with a warning that they are not comparable."""
  poisson = _write_run(tmp_path / "poisson", dp=True, summary={
      "final_eval_accuracy": 0.8, "epsilon": 3.0, "delta": 1e-3,
      "privacy": {"neighboring_relation": "add/remove one client (all of "
                                          "its data)"}})
  fixed = _write_run(tmp_path / "fixed", dp=True, config={
      "sampling": "fixed", "privacy": {"mechanism": "gaussian"}})
  ftrl = _write_run(tmp_path / "ftrl", dp=True, config={
      "sampling": "shuffle", "privacy": {"mechanism": "tree"}})
  runs = plot.discover_runs([poisson, fixed, ftrl])
  assert [plot.neighboring_relation(r) for r in runs] == [
      "add/remove", "replace-one", "replace-special"]
  suffix, labels = plot._relation_labels(runs[:1])  # pylint: disable=protected-access
  assert suffix == " (add/remove neighbours)" and labels == {
      runs[0].name: runs[0].name}
  suffix, labels = plot._relation_labels(runs)  # pylint: disable=protected-access
  assert "not comparable" in suffix
  assert labels[runs[1].name].endswith("[replace-one]")
  out = tmp_path / "out"
  assert plot.main(["--workdir", poisson, fixed, "--out_dir", str(out)]) == 0
  _assert_valid_png(out / "epsilon.png")
