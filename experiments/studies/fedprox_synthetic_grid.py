"""The FedProx Synthetic grid's members: the methods compared, the
Synthetic(alpha, beta) settings, one member's name, config and record (its
finals and curves, read from its ``metrics.jsonl``), and the mean +- std
rows over seeds. Run by :mod:`experiments.studies.fedprox_synthetic`.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any, Sequence

from experiments.lib import paths
from fedjax_lab.training import metrics_io

# Method name -> (label, FedProx mu, drop_stragglers).
METHODS = {"fedavg": ("FedAvg", 0.0, True),
           "fedprox_mu0": ("FedProx mu=0", 0.0, False),
           "fedprox_mu1": ("FedProx mu=1", 1.0, False)}


def parse_setting(setting: str) -> tuple[float, float]:
  """``"0.5_0.5"`` -> ``(alpha, beta) = (0.5, 0.5)``."""
  alpha, beta = setting.split("_")
  return float(alpha), float(beta)


def member_name(setting: str, stragglers: float, method: str,
                seed: int) -> str:
  """Folder name of one grid member, e.g. ``syn1_1-strag0.9-fedavg-seed0``."""
  return f"syn{setting}-strag{stragglers:g}-{method}-seed{seed}"


def member_config(setting: str, stragglers: float, method: str, seed: int,
                  rounds: int, eval_every: int):
  """``configs/synthetic_fedprox.py`` for one member. The dataset stays fixed
  per setting (``data.seed=0``); ``seed`` varies the initial model, client
  sampling, stragglers and shuffling."""
  paths.ensure_configs_importable()
  from configs import synthetic_fedprox  # pylint: disable=g-import-not-at-top
  alpha, beta = parse_setting(setting)
  _, mu, drop_stragglers = METHODS[method]
  config = synthetic_fedprox.get_config()
  config.seed = seed
  config.num_rounds = rounds
  config.eval_every = eval_every
  config.eval_train_split = True
  config.data.update({"alpha": alpha, "beta": beta, "iid": False})
  config.fedprox.update({"mu": mu, "straggler_fraction": stragglers,
                         "drop_stragglers": drop_stragglers})
  return config


def member_record(workdir: str, summary: dict[str, Any]) -> dict[str, Any]:
  """Final numbers and curves of one member from its ``metrics.jsonl``.

  ``final_train_loss`` is the global model's loss on all training examples
  after the last round (inf if training diverged); ``max_loss_increase`` is
  the largest rise of that loss between consecutive evaluations.
  """
  records = metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  evals = [r for r in records if "train_eval_loss" in r]
  curve_rounds = [r["round"] for r in evals]
  losses = [float(r["train_eval_loss"]) for r in evals]
  accuracies = [float(r["eval_accuracy"]) for r in evals]
  diverged = bool(summary.get("diverged")) or not all(
      math.isfinite(v) for v in losses)
  increases = [b - a for a, b in zip(losses, losses[1:])]
  return {
      "diverged": diverged,
      "rounds": len(records),
      "final_train_loss": math.inf if diverged or not losses else losses[-1],
      "final_test_accuracy": (math.nan if diverged or not accuracies
                              else accuracies[-1]),
      "max_loss_increase": max([0.0, *increases]),
      "loss_increases": sum(d > 0 for d in increases),
      "mean_stragglers": statistics.fmean(
          [r.get("straggler", 0.0) for r in records]) if records else 0.0,
      "rounds_without_update": sum(r.get("total_weight", 1.0) == 0
                                   for r in records),
      "seconds": summary.get("seconds"),
      "curve": {"round": curve_rounds, "train_loss": losses,
                "test_accuracy": accuracies},
  }


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  mean = statistics.fmean(values)
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return mean, std


def summarize(members: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (setting, stragglers, method): mean/std/min/max over seeds."""
  rows, groups = [], {}
  for m in members:
    groups.setdefault((m["setting"], m["stragglers"], m["method"]),
                      []).append(m)
  for (setting, stragglers, method), group in groups.items():
    loss_mean, loss_std = _mean_std([m["final_train_loss"] for m in group])
    acc_mean, acc_std = _mean_std([m["final_test_accuracy"] for m in group])
    rows.append({
        "setting": setting, "stragglers": stragglers, "method": method,
        "seeds": len(group), "diverged": sum(m["diverged"] for m in group),
        "train_loss_mean": loss_mean, "train_loss_std": loss_std,
        "test_accuracy_mean": acc_mean, "test_accuracy_std": acc_std,
        "max_loss_increase": max(m["max_loss_increase"] for m in group),
        "loss_increases_mean": statistics.fmean(
            [m["loss_increases"] for m in group])})
  return rows
