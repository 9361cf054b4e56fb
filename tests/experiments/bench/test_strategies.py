"""experiments.bench.strategies in --quick mode: files and their structure."""

import json
import os
import subprocess
import sys

from experiments.bench import strategies
from experiments.bench import workloads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
REQUESTED = ["vmap+scan", "vmap+unroll", "map+scan", "chunked+scan"]


def test_quick_bench_writes_complete_report(tmp_path):
  out = tmp_path / "bench_test"
  command = [sys.executable, "-m", "experiments.bench.strategies", "--quick",
             "--workloads=w2", f"--strategies={','.join(REQUESTED)}",
             "--max_unroll_steps=16", f"--out={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]

  report = json.loads((tmp_path / "bench_test.json").read_text())
  assert report["quick"] is True
  assert report["machine"]["backend"] == "cpu"
  assert "experiments.bench.strategies" in report["command"]
  entry = report["workloads"]["w2"]
  assert entry["settings"]["timed_rounds"] == [0, 1]
  assert entry["ideal"]["ideal_s_per_round"] > 0
  rows = {row["strategy"]: row for row in entry["results"]}
  assert set(rows) == {"vmap+scan", "vmap+unroll", "map+scan",
                       "chunked5+scan"}
  # W2's padded step count exceeds the (lowered) unroll limit.
  assert "unrolled compile" in rows["vmap+unroll"]["skipped"]
  for label, row in rows.items():
    if row["skipped"]:
      continue
    assert row["ratio_to_ideal"] > 0, label
    assert row["round_fn_ratio_to_ideal"] > 0, label
    assert len(row["round_s"]) == 2, label
    assert row["compiles_in_timed_pass"] == 0, label
    assert row["max_abs_param_diff_vs_reference"] < 1e-4, label
  assert entry["fastest"] in rows

  markdown = (tmp_path / "bench_test.md").read_text()
  assert "| strategy | compile s | median s/round |" in markdown
  assert "skipped: padded steps" in markdown
  assert "## Reading" in markdown


def test_plan_marks_long_unrolls_and_names_chunks():
  workload = workloads.build_workload("w2", quick=True)
  plan = strategies.plan_strategies(["chunked+unroll", "map+scan"], workload,
                               max_steps=100, max_unroll=64)
  assert [(label, reason is None) for label, _, reason in plan] == [
      ("chunked5+unroll", False), ("map+scan", True)]
  plan = strategies.plan_strategies(["vmap+unroll"], workload, max_steps=48,
                               max_unroll=64, chunk_size=3)
  assert plan[0][2] is None
