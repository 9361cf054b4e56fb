"""experiments.lib.runs: finding runs in workdirs, sweep roots and saved
folders, their labels, series and final values."""

import json

import numpy as np
import pytest

from experiments.lib import runs as runs_lib
from tests.experiments.conftest import write_run


def test_sweep_roots_and_saved_runs_expand_to_members(tmp_path):
  sweep = tmp_path / "sweep"
  for member in ("z10-seed0", "z2-seed0", "nodp-seed0"):
    write_run(sweep / member, dp=member != "nodp-seed0")
  (sweep / "notes").mkdir()  # a subfolder without metrics is ignored
  write_run(sweep / "z2-seed0.interrupted-1")  # moved aside by a rerun
  saved = tmp_path / "saved"
  write_run(saved, prefix="dp_mnist.", dp=True,
             summary={"final_eval_accuracy": 0.9, "epsilon": 4.0})
  write_run(saved, prefix="nodp.")
  (saved / "README.md").write_text("a shell glob picks this up too")
  runs = runs_lib.discover_runs([str(sweep), str(saved),
                                 *sorted(str(p) for p in saved.iterdir())])
  # The glob's files: README.md and summaries skipped, two saved runs again.
  assert [run.name for run in runs] == [
      "nodp-seed0", "z2-seed0", "z10-seed0", "saved/dp_mnist",
      "saved/nodp", "saved/dp_mnist (2)", "saved/nodp (2)"]
  assert [runs_lib.is_private(run) for run in runs] == [
      False, True, True, True, False, True, False]
  dp_mnist = runs[3]
  # The summary's final values win over the last records'.
  assert runs_lib.final_value(dp_mnist, "epsilon", "epsilon") == 4.0
  assert runs_lib.final_value(runs[1], "epsilon", "epsilon") == 3.0
  assert runs_lib.final_value(runs[1], "eval_accuracy",
                              "final_eval_accuracy") == pytest.approx(0.8)
  # sweep.json (experiments/sweep.py) fixes the members and their order.
  (sweep / "sweep.json").write_text(json.dumps({"members": [
      {"slug": "z10-seed0", "overrides": {}},
      {"slug": "nodp-seed0", "overrides": {}}]}))
  assert [run.name for run in runs_lib.discover_runs([str(sweep)])] == [
      "z10-seed0", "nodp-seed0"]


def test_labels_drop_time_stamps_and_add_parents_on_collisions(tmp_path):
  first = write_run(tmp_path / "a" / "run-20240101-120000")
  second = write_run(tmp_path / "b" / "run-20240102-120000")
  other = write_run(tmp_path / "c" / "other-20240102-120000")
  assert [r.name for r in runs_lib.discover_runs([first, other])] == [
      "run", "other"]
  # Stamps are kept where they are what tells two runs apart.
  assert [r.name for r in runs_lib.discover_runs([first, second])] == [
      "run-20240101-120000", "run-20240102-120000"]
  left = write_run(tmp_path / "a" / "fedavg")
  right = write_run(tmp_path / "b" / "fedavg")
  assert [r.name for r in runs_lib.discover_runs([left, right, other])] == [
      "a/fedavg", "b/fedavg", "other"]


def test_series_skips_missing_keys_and_reads_non_finite_strings(tmp_path):
  folder = tmp_path / "run"
  folder.mkdir()
  records = [{"round": 1, "train_loss": 1.5}, {"round": 2},
             {"round": 3, "train_loss": "nan"},
             {"round": 4, "train_loss": "inf", "note": "text"}]
  (folder / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in records))
  run, = runs_lib.discover_runs([str(folder)])
  rounds, values = runs_lib.series(run, "train_loss")
  np.testing.assert_array_equal(rounds, [1, 3, 4])
  np.testing.assert_array_equal(values, [1.5, np.nan, np.inf])
  assert runs_lib.series(run, "note")[0].size == 0
  assert runs_lib.final_value(run, "eval_accuracy",
                              "final_eval_accuracy") is None
