"""Helpers shared by the experiments' tests: hand-made run folders."""

import json
import os


def write_run(folder, num_rounds=6, dp=False, summary=None, config=None,
               prefix=""):
  """A hand-made run: eval every 2 rounds; DP runs add epsilon = 0.5 * round."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, f"{prefix}metrics.jsonl"), "w") as f:
    for r in range(1, num_rounds + 1):
      record = {"round": r, "train_loss": 2.0 / r, "seconds": 0.1}
      if r % 2 == 0:
        record.update(eval_accuracy=0.5 + 0.05 * r, eval_loss=1.0 / r)
      if dp:
        record.update(epsilon=0.5 * r, delta=1e-3, clip_norm=1.0)
      f.write(json.dumps(record) + "\n")
  if summary is not None:
    with open(os.path.join(folder, f"{prefix}summary.json"), "w") as f:
      json.dump(summary, f)
  if config is not None:
    with open(os.path.join(folder, f"{prefix}config.json"), "w") as f:
      json.dump(config, f)
  return str(folder)
