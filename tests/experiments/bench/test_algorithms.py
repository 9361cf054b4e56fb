"""experiments.bench.algorithms in --quick mode: every algorithm, every file."""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments.bench import algorithms

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def test_quick_algorithm_bench_times_every_algorithm(tmp_path):
  out = tmp_path / "bench_algorithms_test"
  command = [sys.executable, "-m", "experiments.bench.algorithms", "--quick",
             "--workloads=w2", "--rounds=1", f"--out={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "bench_algorithms_test.json").read_text())
  rows = {row["variant"]: row for row in report["workloads"]["w2"]["results"]}
  assert set(rows) == {v.name for v in algorithms.VARIANTS}
  assert rows["fedavg"]["ratio_to_baseline"] == 1.0
  for name, row in rows.items():
    assert 0 < row["ratio_to_baseline"] < math.inf, name
    assert len(row["round_s"]) == 1 and len(row["round_s"][0]) == 1, name
  table = (tmp_path / "bench_algorithms_test.md").read_text()
  for name in rows:
    assert f"| {name} |" in table


def test_unknown_algorithm_is_refused():
  with pytest.raises(ValueError, match="nope.*scaffold"):
    algorithms.select(["fedavg", "nope"])
