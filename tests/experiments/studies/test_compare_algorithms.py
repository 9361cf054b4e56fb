"""The algorithm comparison on a tiny grid: rows, table, resumability."""

import json

from experiments.studies import compare_algorithms
from fedjax_lab.training import loop


def test_tiny_comparison_writes_report_and_resumes(tmp_path, monkeypatch):
  names = ["fedavg", "hypcluster", "fedavg_top1"]
  rows = compare_algorithms.run(names, [0], 2, str(tmp_path), "test",
                                tiny=True)
  assert [r["name"] for r in rows] == names
  by_name = {r["name"]: r for r in rows}
  # Per-client distributions where there is one global model; none for
  # HypCluster (scored with each client's best cluster).
  assert 0 <= by_name["fedavg"]["personalized_worst"] <= (
      by_name["fedavg"]["personalized_p10"])
  assert "personalized_worst" not in by_name["hypcluster"]
  # top-1% of 1.2M parameters with 32-bit values and 21-bit indices.
  assert by_name["fedavg_top1"]["bits_uploaded"] == 11999 * (32 + 21)
  assert by_name["fedavg"]["bits_uploaded"] is None
  table = (tmp_path / "compare_algorithms.md").read_text()
  for name in ("fedavg (s0)", "hypcluster (s0)", "fedavg_top1 (s0)"):
    assert name in table
  assert (tmp_path / "compare_algorithms.png").stat().st_size > 0
  saved = json.loads((tmp_path / "compare_algorithms.json").read_text())
  assert len(saved["rows"]) == 3
  # A second call reads the finished members back and trains nothing.
  monkeypatch.setattr(loop, "run_experiment", lambda *a, **k: 1 / 0)
  again = compare_algorithms.run(names, [0], 2, str(tmp_path), "test",
                                 tiny=True)
  assert [r["accuracy"] for r in again] == [r["accuracy"] for r in rows]
