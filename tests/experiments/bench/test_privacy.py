"""experiments.bench.privacy in --quick mode: files, variants, numbers."""

import json
import math
import os
import subprocess
import sys

import pytest

from experiments.bench import privacy as bench_privacy

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
DP_VARIANTS = ("dp_gaussian", "dp_adaptive", "dp_local")


def test_quick_privacy_bench_writes_complete_report(tmp_path):
  out = tmp_path / "bench_privacy_test"
  command = [sys.executable, "-m", "experiments.bench.privacy", "--quick",
             "--workloads=w2", "--rounds=1", f"--out={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]

  report = json.loads((tmp_path / "bench_privacy_test.json").read_text())
  assert report["quick"] is True
  assert "experiments.bench.privacy" in report["command"]
  entry = report["workloads"]["w2"]
  assert entry["strategy"] == "chunked5+scan"  # The CPU default for "dense".
  assert entry["settings"]["timed_rounds"] == [0]
  rows = {row["variant"]: row for row in entry["results"]}
  assert set(rows) == set(bench_privacy.QUICK_VARIANTS)
  for name, row in rows.items():
    for key in ("ratio_to_baseline", "round_fn_ratio_to_baseline",
                "paired_round_fn_ratio", "median_round_s",
                "median_round_fn_s"):
      assert 0 < row[key] < math.inf, (name, key)
    assert [len(times) for times in row["round_s"]] == [1, 1], name
    assert row["compiles_in_timed_pass"] == 0, name
  assert rows["baseline"]["ratio_to_baseline"] == 1.0
  # Numbers, not timing: noise changes the model, zero noise and an infinite
  # clip norm give back plain FedAvg with uniform weighting.
  for name in DP_VARIANTS:
    assert rows[name]["max_abs_param_diff_vs_baseline"] > 1e-3, name
  assert rows["dp_zero_noise"]["max_abs_param_diff_vs_baseline"] <= 1e-5

  for kind in ("rdp", "pld"):
    accountant = report["accountant"][kind]
    assert 0 < accountant["first_call_s"] < math.inf, kind
    assert accountant["epsilon_at_rounds"] > 0, kind
  checks = entry["requirement_checks"]
  assert {(c["variant"], c["accountant"]) for c in checks} == {
      (v, k) for v in DP_VARIANTS for k in ("rdp", "pld")}
  for check in checks:
    assert math.isfinite(check["total_overhead"])
    assert check["accountant_fraction_of_dp_round"] > 0

  markdown = (tmp_path / "bench_privacy_test.md").read_text()
  assert "| variant | full s/round |" in markdown
  assert "## Accountant (host side)" in markdown
  assert "## Reading" in markdown
  for name in rows:
    assert f"| {name} |" in markdown


def test_variant_selection_keeps_the_baseline_first():
  names = [v.name for v in bench_privacy.select_variants(["dp_local"], False)]
  assert names == ["baseline", "dp_local"]
  quick = [v.name for v in bench_privacy.select_variants(None, True)]
  assert quick == list(bench_privacy.QUICK_VARIANTS)
  full = [v.name for v in bench_privacy.select_variants(None, False)]
  assert full[0] == "baseline" and {"norm_only", "noise_only",
                                    "baseline_again"} <= set(full)
  with pytest.raises(ValueError, match="unknown variants"):
    bench_privacy.select_variants(["dp_nope"], False)


def test_adaptive_count_noise_is_valid_for_small_cohorts():
  # m / 20 alone is too small for z = 1 at a cohort of 10 (2 sigma_b <= z).
  for cohort in (8, 10, 50, 1000):
    assert 2 * bench_privacy.count_stddev(cohort) > (
        bench_privacy.NOISE_MULTIPLIER)
  assert bench_privacy.count_stddev(1000) == 50.0
