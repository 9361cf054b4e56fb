"""experiments.bench.vectorized_sweep on W2 with two rounds: the rows it
measures, members equal to their separate runs, --update, and the members
timed as experiments.run processes."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def _bench(out, *flags):
  command = [sys.executable, "-m", "experiments.bench.vectorized_sweep",
             f"--out={out}", "--workloads=w2", "--w2_rounds=2", *flags]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((out.parent / (out.name + ".json")).read_text())


def test_tiny_bench_measures_each_sweep_and_updates_rows(tmp_path):
  out = tmp_path / "vectorized"
  report = _bench(out, "--members=1,2", "--noprocesses")
  rows = {(r["kind"], r["members"]): r for r in report["rows"]}
  assert set(rows) == {("lr", 1), ("lr", 2), ("seeds", 2)}
  for row in rows.values():
    assert row["sequential_seconds"] > 0 and row["vectorized_seconds"] > 0
    assert row["throughput"] == (row["sequential_seconds"] /
                                 row["vectorized_seconds"])
    assert row["max_rel_diff"] < 1e-5  # the same runs, either way
    assert row["processes_seconds"] is None
    assert len(row["final_eval_accuracy"]) == row["members"]
  assert rows[("lr", 1)]["compilations_vectorized"] == (
      rows[("lr", 1)]["compilations_sequential"])
  markdown = (tmp_path / "vectorized.md").read_text()
  assert markdown.count("| W2 logistic regression") == 3
  updated = _bench(out, "--members=1", "--update")
  assert len(updated["rows"]) == 3
  assert updated["meta"]["updates"][0]["command"].endswith("--update")
  assert [r for r in updated["rows"] if r["members"] == 2] == [
      rows[("lr", 2)], rows[("seeds", 2)]]
  (one,) = [r for r in updated["rows"] if r["members"] == 1]
  assert one["processes_seconds"] > 0  # timed as experiments.run processes
  assert one["vs_processes"] == (one["processes_seconds"] /
                                 one["vectorized_seconds"])
