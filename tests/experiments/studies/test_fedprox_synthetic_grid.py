"""The FedProx Synthetic grid's members: a member's record from its
metrics, and the rows over seeds, hand-computed."""

import json
import math
import os

from experiments.studies import fedprox_synthetic_grid


def _write_member(workdir, losses, accuracies, total_weights, summary):
  """A member folder by hand: evaluations every 5 rounds."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i, weight in enumerate(total_weights):
      record = {"round": i + 1, "total_weight": weight, "straggler": 0.5}
      if (i + 1) % 5 == 0:
        record.update(train_eval_loss=losses[(i + 1) // 5 - 1],
                      eval_accuracy=accuracies[(i + 1) // 5 - 1])
      f.write(json.dumps(record) + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)


def test_member_record_and_summary_hand_computed(tmp_path):
  weights = [3.0, 0.0, 2.0, 0.0, 1.0, 4.0, 4.0, 4.0, 4.0, 0.0, 5.0, 5.0, 5.0,
             5.0, 5.0]
  _write_member(tmp_path / "a", [1.0, 1.3, 0.8], [0.5, 0.4, 0.7], weights,
                {"seconds": 2.0})
  _write_member(tmp_path / "b", [1.0, 0.9, 0.6], [0.5, 0.6, 0.9], weights,
                {"seconds": 2.0})
  a = fedprox_synthetic_grid.member_record(str(tmp_path / "a"),
                                           {"seconds": 2.0})
  b = fedprox_synthetic_grid.member_record(str(tmp_path / "b"),
                                           {"seconds": 2.0})
  assert a["curve"]["round"] == [5, 10, 15]
  assert a["final_train_loss"] == 0.8 and a["final_test_accuracy"] == 0.7
  assert math.isclose(a["max_loss_increase"], 0.3)
  assert a["loss_increases"] == 1 and a["rounds_without_update"] == 3
  assert b["max_loss_increase"] == 0.0 and b["loss_increases"] == 0
  assert not a["diverged"]
  members = [{"setting": "1_1", "stragglers": 0.5, "method": "fedavg",
              "seed": seed, **record} for seed, record in enumerate((a, b))]
  (row,) = fedprox_synthetic_grid.summarize(members)
  assert math.isclose(row["train_loss_mean"], 0.7)
  assert math.isclose(row["train_loss_std"], math.sqrt(0.02))  # stdev, n-1
  assert math.isclose(row["test_accuracy_mean"], 0.8)
  assert math.isclose(row["max_loss_increase"], 0.3)
  # A diverged member counts as finished, with an infinite final loss.
  diverged = fedprox_synthetic_grid.member_record(str(tmp_path / "a"),
                                                  {"diverged": True})
  assert diverged["diverged"] and diverged["final_train_loss"] == math.inf
