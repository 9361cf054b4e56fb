r"""Accuracy vs epsilon: one config at several noise levels, plus no DP.

  python -m experiments.studies.dp_tradeoff [--config=configs/dp_mnist.py] \
      [--noise_multipliers=0.5,1,2,4,8 | --target_epsilons=0.5,1,2,4,8] \
      [--seeds=0,1] [--workdir=runs/dp_tradeoff] \
      [--out=experiments/results/dp_mnist_tradeoff]

Runs the config once per (noise multiplier, seed) — or, with
``--target_epsilons``, once per (target epsilon, seed) with the noise
multiplier calibrated to it before training — and once per seed with
``privacy.mechanism=none`` (the non-private baseline, same everything else),
each in its own ``workdir/<member>`` (members already finished there are
read back, not rerun), then writes ``OUT.json``, ``OUT.md`` (a table of final
accuracy, epsilon at delta, and seconds) and ``OUT.png`` (accuracy vs
epsilon). Extra ``--config.KEY=VALUE`` overrides apply to every member.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.lib import cli
from experiments.lib import paths
from experiments.studies import members as members_lib

# The command-line flags, once define_flags() ran: name -> FlagHolder.
_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command-line flags (only when run as a program: other
  experiments define flags of the same names in a shared test process)."""
  paths.ensure_configs_importable()
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", paths.config_file("dp_mnist.py"),
      "A DP config (its privacy.mechanism is kept for the DP members).",
      flag_values=flag_values)
  _FLAGS["noise_multipliers"] = flags.DEFINE_list(
      "noise_multipliers", ["0.5", "1", "2", "4", "8"],
      "Noise multipliers to run.", flag_values=flag_values)
  _FLAGS["target_epsilons"] = flags.DEFINE_list(
      "target_epsilons", [], "If set: calibrate z to each of these epsilons "
      "(privacy.calibrate=True) instead of sweeping --noise_multipliers.",
      flag_values=flag_values)
  _FLAGS["seeds"] = flags.DEFINE_list(
      "seeds", ["0"], "Seeds (config.seed) per setting.",
      flag_values=flag_values)
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", "runs/dp_tradeoff", "Folder for the members' runs.",
      flag_values=flag_values)
  _FLAGS["out"] = flags.DEFINE_string(
      "out", "experiments/results/dp_mnist_tradeoff",
      "Output path without extension.", flag_values=flag_values)


def _member(config, workdir: str) -> dict:
  """Runs (or reads back) one member; returns its summary."""
  return members_lib.run_or_read_back(config, workdir).summary


def _rows(results):
  """One row per setting: mean/min/max over seeds."""
  rows = []
  for label in dict.fromkeys(r["setting"] for r in results):
    members = [r for r in results if r["setting"] == label]
    accs = [m["final_eval_accuracy"] for m in members]
    rows.append({
        "setting": label, "noise_multiplier": members[0]["noise_multiplier"],
        "epsilon": members[0]["epsilon"], "delta": members[0]["delta"],
        "accuracy_mean": statistics.fmean(accs), "accuracy_min": min(accs),
        "accuracy_max": max(accs), "seeds": len(members),
        "rounds": members[0]["rounds"],
        "seconds_mean": (statistics.fmean(m["seconds"] for m in members)
                         if all(m["seconds"] is not None for m in members)
                         else None)})
  return rows


def _markdown(rows, command: str, config) -> str:
  lines = [
      f"# Accuracy vs epsilon: {config.data.name}, {config.model.name}, "
      f"{config.privacy.mechanism} DP",
      "",
      f"Command: `{command}`",
      "",
      f"{config.num_rounds} rounds, sampling {config.sampling} "
      f"(rate {config.sampling_rate}, cohort {config.cohort_size}), clip norm "
      f"{config.privacy.clip_norm}, accountant {config.privacy.accountant}. "
      "Accuracy is the final test accuracy (mean, and min-max over seeds). "
      "A DP run withholds its timings (they grow with the sampled clients' "
      "data; docs/PRIVACY.md): s/run is shown for the non-private runs.",
      "",
      "| setting | noise multiplier | epsilon | delta | accuracy | min-max |"
      " seeds | s/run |",
      "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    eps = "inf (no DP)" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
    delta = "-" if r["delta"] is None else f"{r['delta']:.2e}"
    z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:g}"
    lines.append(
        f"| {r['setting']} | {z} | {eps} | {delta} | "
        f"{100 * r['accuracy_mean']:.1f}% | {100 * r['accuracy_min']:.1f}-"
        f"{100 * r['accuracy_max']:.1f}% | {r['seeds']} | "
        + ("-" if r["seconds_mean"] is None else f"{r['seconds_mean']:.0f}")
        + " |")
  return "\n".join(lines) + "\n"


def _plot(rows, path: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  private = [r for r in rows if r["epsilon"] is not None]
  fig, ax = plt.subplots(figsize=(5.5, 4))
  ax.errorbar([r["epsilon"] for r in private],
              [100 * r["accuracy_mean"] for r in private],
              yerr=[[100 * (r["accuracy_mean"] - r["accuracy_min"])
                     for r in private],
                    [100 * (r["accuracy_max"] - r["accuracy_mean"])
                     for r in private]],
              marker="o", capsize=3, label="DP-FedAvg")
  for r in private:
    ax.annotate(f"z={r['noise_multiplier']:g}", (r["epsilon"],
                                                 100 * r["accuracy_mean"]),
                textcoords="offset points", xytext=(4, -10), fontsize=8)
  for r in rows:
    if r["epsilon"] is None:
      ax.axhline(100 * r["accuracy_mean"], color="gray", linestyle="--",
                 label="no DP")
  ax.set_xscale("log")
  ax.set_xlabel(f"epsilon at delta={private[0]['delta']:.2g}"
                if private else "epsilon")
  ax.set_ylabel("final test accuracy (%)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main(argv: Sequence[str]) -> None:
  """Command-line entry: every member, then the table and the plot."""
  cli.reject_extra_args(argv)
  value = {name: holder.value for name, holder in _FLAGS.items()}
  base = value["config"]
  results = []
  if value["target_epsilons"]:
    settings = [("no DP", None)] + [(f"eps={e}", float(e))
                                    for e in value["target_epsilons"]]
  else:
    settings = [("no DP", None)] + [(f"z={z}", float(z))
                                    for z in value["noise_multipliers"]]
  for label, level in settings:
    for seed in value["seeds"]:
      config = base.copy_and_resolve_references()
      config.seed = int(seed)
      if level is None:
        config.privacy.mechanism = "none"
        name = "nodp"
      elif value["target_epsilons"]:
        config.privacy.update({"calibrate": True, "target_epsilon": level})
        name = f"eps{level:g}"
      else:
        config.privacy.update({"calibrate": False, "target_epsilon": 0.0,
                               "noise_multiplier": level})
        name = f"z{level:g}"
      summary = _member(config, os.path.join(value["workdir"],
                                             f"{name}-seed{seed}"))
      privacy = summary.get("privacy") or {}
      results.append({"setting": label, "seed": int(seed),
                      "noise_multiplier": privacy.get("noise_multiplier"),
                      "epsilon": summary.get("epsilon"),
                      "delta": summary.get("delta"),
                      "final_eval_accuracy": summary["final_eval_accuracy"],
                      "rounds": summary["rounds"],
                      # Withheld by DP runs (a diagnostic).
                      "seconds": summary.get("seconds")})
      print(json.dumps(results[-1]), file=sys.stderr)
  rows = _rows(results)
  command = "python -m experiments.studies.dp_tradeoff " + " ".join(
      sys.argv[1:])
  os.makedirs(os.path.dirname(value["out"]) or ".", exist_ok=True)
  with open(value["out"] + ".json", "w") as f:
    json.dump({"command": command, "config": json.loads(
        base.to_json_best_effort()), "members": results, "rows": rows}, f,
              indent=2)
  with open(value["out"] + ".md", "w") as f:
    f.write(_markdown(rows, command, base))
  _plot(rows, value["out"] + ".png")
  print(json.dumps({"rows": rows}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
