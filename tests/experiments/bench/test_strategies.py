"""experiments.bench.strategies in --quick mode: files and their structure."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

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


def test_resnet_workload_has_reddi_et_al_cifar100_shapes():
  """W4 is named, not default, and times ResNet-18 at Reddi et al. 2021's
  CIFAR-100 settings: 100-image clients, 24x24 crops, cohort 10, batch 20."""
  assert "w4" not in workloads.WORKLOADS and "w4" in workloads.EXTRA_WORKLOADS
  workload = workloads.build_workload("w4")
  assert workload.store.features["x"].shape[1:] == (24, 24, 3)
  assert set(np.diff(workload.store.offsets)) == {100}
  assert (workload.cohort_size, workload.batch_size, workload.num_epochs) == (
      10, 20, 1)
  assert workload.family == "conv"
  cohort = workload.cohort(0)
  # 5 full batches a client (the step axis may be padded to a bucket).
  assert cohort.num_steps.tolist() == [5] * 10
  assert cohort.example_mask.shape[::2] == (10, 20)
  assert cohort.example_mask.sum() == 10 * 100
  model = workload.make_model()
  params = jax.eval_shape(model.init, jax.random.key(0))
  assert sum(p.size for p in jax.tree.leaves(params)) == 11_227_812
