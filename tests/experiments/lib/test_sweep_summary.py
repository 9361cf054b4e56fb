"""experiments.lib.sweep_summary: ranking the members' rows."""

from experiments.lib import sweep_summary


def test_rank_rows_orders_and_leaves_missing_values_last():
  rows = [{"member": "a", "acc": 0.5}, {"member": "b", "acc": None},
          {"member": "c", "acc": 0.9}, {"member": "d", "acc": 0.5},
          {"member": "e", "acc": float("nan")}]
  best_first = sweep_summary.rank_rows(rows, "acc", "max")
  assert [(r["rank"], r["member"]) for r in best_first] == [
      (1, "c"), (2, "a"), (3, "d"), (None, "b"), (None, "e")]
  worst_first = sweep_summary.rank_rows(rows, "acc", "min")
  assert [r["member"] for r in worst_first][:3] == ["a", "d", "c"]
