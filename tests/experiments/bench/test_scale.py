"""experiments.bench.scale on a tiny population: the run, the numbers it
derives and a results file that names no machine path."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def test_tiny_scale_bench_writes_a_complete_redacted_report(tmp_path):
  data, runs, out = tmp_path / "data", tmp_path / "runs", tmp_path / "scale"
  command = [sys.executable, "-m", "experiments.bench.scale",
             f"--data_root={data}", f"--work_root={runs}", f"--out={out}",
             "--populations=40", "--rounds=2", "--cohort_size=4",
             "--process_rounds=0", "--dp_seconds=0"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  text = (tmp_path / "scale.json").read_text()
  assert str(tmp_path) not in text  # DATA / RUNS instead of machine paths
  report = json.loads(text)
  (population,) = report["populations"]
  assert population["num_clients"] == 40
  assert population["population"]["written_by_this_run"]
  run = population["run"]
  assert [r["round"] for r in run["rounds"]] == [1, 2]
  assert all(r["cohort_padded_size"] == 4 for r in run["rounds"])
  assert 0.0 <= run["host_share"] <= 1.0
  assert run["peak_rss_bytes"] > 10**7
  assert population["ideal_s_per_round"] == (
      report["ideal_step_s"] * population["real_steps"][1])
  assert population["ratio_to_ideal"] > 0
  # (1 vs 2 processes is tests/experiments/test_multiprocess.py's subject.)
  assert "processes" not in report
  markdown = (tmp_path / "scale.md").read_text()
  assert "| 40 |" in markdown
