"""The FedProx Synthetic report: the paper's findings checked on hand-made
rows, and the markdown tables that show them."""

import math

from experiments.studies import fedprox_synthetic_report as report


def _row(fraction, method, loss, accuracy=0.5, loss_std=0.01):
  """A row as ``fedprox_synthetic_grid.summarize`` gives it (one seed)."""
  return {"setting": "1_1", "stragglers": fraction, "method": method,
          "seeds": 1, "diverged": int(not math.isfinite(loss)),
          "train_loss_mean": loss, "train_loss_std": loss_std,
          "test_accuracy_mean": accuracy, "test_accuracy_std": 0.0,
          "max_loss_increase": 0.0, "loss_increases_mean": 0.0}


def _member(fraction, method, curve):
  return {"setting": "1_1", "stragglers": fraction, "method": method,
          "seed": 0, "curve": {"train_loss": curve}}


def _finding(findings, start):
  (finding,) = [f for f in findings if f["claim"].startswith(start)]
  return finding


def test_findings_hold_fail_or_are_not_in_the_grid():
  rows = [_row(0.0, "fedavg", 0.6), _row(0.0, "fedprox_mu1", 0.5),
          _row(0.9, "fedavg", 0.9), _row(0.9, "fedprox_mu1", 1.2)]
  members = [_member(0.0, "fedavg", [1.0, 0.6]),
             _member(0.0, "fedprox_mu1", [1.0, 0.5])]
  findings = report.check_findings(members, rows)
  ninety = _finding(findings, "With 90% stragglers")
  assert ninety["holds"] is False
  assert ninety["detail"] == ("(1,1) 1.200 ± 0.010 vs 0.900 ± 0.010: no")
  # FedAvg vs FedProx mu=0 without stragglers needs mu=0 members.
  same = _finding(findings, "Without stragglers")
  assert same["holds"] is None and same["detail"] == "not in this grid"


def test_markdown_tables_show_rows_and_divergence():
  rows = [_row(0.0, "fedavg", 0.6), _row(0.9, "fedavg", math.inf)]
  findings = report.check_findings([], rows)
  text = report.markdown(rows, findings, "python -m x", [0], 10, 5)
  lines = [line for line in text.splitlines()
           if line.startswith("| Synthetic(1,1) |")]
  assert lines[0] == "| Synthetic(1,1) | 0% | 0.600 ± 0.010 | 50.0 ± 0.0 |"
  assert lines[1].startswith("| Synthetic(1,1) | 90% | diverged |")
  assert "Command: `python -m x`" in text
