"""The accuracy-vs-epsilon driver: members, resume, outputs."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def _run(tmp_path, *flags):
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "experiments.studies.dp_tradeoff",
       "--config=configs/dp_mnist_sweep.py:tiny", f"--workdir={tmp_path}/w",
       f"--out={out}", "--seeds=0", *flags],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  return json.loads((tmp_path / "out.json").read_text())


def test_target_epsilons_are_met_and_finished_members_are_reused(tmp_path):
  report = _run(tmp_path, "--target_epsilons=1,4")
  rows = {r["setting"]: r for r in report["rows"]}
  assert set(rows) == {"no DP", "eps=1", "eps=4"}
  assert rows["no DP"]["epsilon"] is None
  for target in (1, 4):
    row = rows[f"eps={target}"]
    assert target * 0.99 <= row["epsilon"] <= target
    assert 0.0 <= row["accuracy_mean"] <= 1.0
  assert rows["eps=1"]["noise_multiplier"] > rows["eps=4"]["noise_multiplier"]
  for ext in ("md", "png"):
    assert (tmp_path / f"out.{ext}").stat().st_size > 0
  # A second call reads the finished members back instead of rerunning.
  mtime = os.path.getmtime(tmp_path / "w" / "eps1-seed0" / "summary.json")
  again = _run(tmp_path, "--target_epsilons=1,4")
  assert again["rows"] == report["rows"]
  assert os.path.getmtime(
      tmp_path / "w" / "eps1-seed0" / "summary.json") == mtime
