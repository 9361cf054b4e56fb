r"""DP-FedAvg noise x clip grid on MNIST, as one vectorised sweep and as processes.

  python -m experiments.studies.dp_grid [--workdir=runs/dp_grid] \
      [--noise_multipliers=0.5,1,2,4,8] [--clip_norms=0.1,0.5,2] \
      [--seeds=0,1,2] [--rounds=100] [--modes=vectorize,parallel2] \
      [--out=experiments/results/dp_mnist_grid]

Runs ``configs/dp_mnist.py`` (DP-FedAvg, Poisson sampling, RDP accounting,
each member with its own secret noise and sampling seed) over the grid,
evaluating at the end only, twice: ``experiments.sweep --vectorize`` (the
members as compiled programs with a member axis) in ``WORKDIR/vectorize``
and ``experiments.sweep --parallel=2`` (one process per member, two at a
time) in ``WORKDIR/parallel2``, timing each sweep's wall clock. A mode whose
sweep is already finished there is read back, not rerun (its time from the
previous ``OUT.json``). Writes ``OUT.json``, ``OUT.md`` (accuracy and epsilon
per (noise, clip), mean and min-max over seeds, and the two wall clocks) and
``OUT.png`` (accuracy vs epsilon, one line per clip norm).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from experiments.lib import paths
from experiments.lib import sweep_summary

_WORKDIR = flags.DEFINE_string("workdir", "runs/dp_grid", "Sweeps' root.")
_NOISE = flags.DEFINE_list("noise_multipliers", ["0.5", "1", "2", "4", "8"],
                           "Noise multipliers z.")
_CLIP = flags.DEFINE_list("clip_norms", ["0.1", "0.5", "2"], "Clip norms C.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (model init, "
                           "data order; DP noise is secret per member).")
_ROUNDS = flags.DEFINE_integer("rounds", 100, "Rounds per member.")
_MAX_MEMBERS = flags.DEFINE_integer(
    "max_members", 9, "--vectorize_max_members of the vectorised sweep (DP "
    "members train on their own cohorts: K stacked cohorts per program).")
_MODES = flags.DEFINE_list("modes", ["vectorize", "parallel2"],
                           "Sweeps to run: vectorize and/or parallel2.")
_OUT = flags.DEFINE_string("out", None, "Results path without extension "
                           "(default experiments/results/dp_mnist_grid).")



def sweep_command(workdir: str, mode: str) -> list[str]:
  """The ``experiments.sweep`` command of one mode."""
  spec = (f"privacy.noise_multiplier={','.join(_NOISE.value)} "
          f"privacy.clip_norm={','.join(_CLIP.value)} "
          f"seed={','.join(_SEEDS.value)}")
  return [sys.executable, "-m", "experiments.sweep",
          "--config=configs/dp_mnist.py",
          f"--workdir={workdir}", f"--sweep={spec}", "--quiet",
          f"--config.num_rounds={_ROUNDS.value}", "--config.eval_every=0",
          *({"vectorize": ["--vectorize",
                           f"--vectorize_max_members={_MAX_MEMBERS.value}"],
             "parallel2": ["--parallel=2"]}[mode])]


def read_members(workdir: str) -> list[dict[str, Any]]:
  """Each finished member's overrides, final accuracy and epsilon."""
  record = sweep_summary.read_json(os.path.join(workdir, "sweep.json"))
  rows = []
  for member in record["members"]:
    summary = sweep_summary.read_json(
        os.path.join(workdir, member["slug"], "summary.json"))
    if summary is not None:
      rows.append({**member["overrides"],
                   "accuracy": summary["final_eval_accuracy"],
                   "epsilon": summary["epsilon"], "delta": summary["delta"]})
  return rows


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (noise multiplier, clip norm): mean / min / max accuracy over seeds
  and the (seed-independent) epsilon."""
  cells: dict[tuple, list] = {}
  for row in rows:
    key = (row["privacy.noise_multiplier"], row["privacy.clip_norm"])
    cells.setdefault(key, []).append(row)
  out = []
  for (noise, clip), members in sorted(cells.items()):
    accuracy = [m["accuracy"] for m in members]
    out.append({"noise_multiplier": noise, "clip_norm": clip,
                "epsilon": members[0]["epsilon"], "delta": members[0]["delta"],
                "accuracy_mean": statistics.mean(accuracy),
                "accuracy_min": min(accuracy), "accuracy_max": max(accuracy),
                "seeds": len(members)})
  return out


def agreement(by_mode: dict[str, list[dict[str, Any]]]
              ) -> dict[str, Any] | None:
  """How two modes' grids agree (their members drew other secret seeds, so
  accuracies agree up to DP noise and sampling): largest and mean absolute
  difference of the cells' mean accuracy; whether every epsilon is equal."""
  if len(by_mode) != 2:
    return None
  first, second = by_mode.values()
  gaps = [abs(a["accuracy_mean"] - b["accuracy_mean"])
          for a, b in zip(first, second)]
  return {"max_accuracy_gap": max(gaps),
          "mean_accuracy_gap": statistics.mean(gaps),
          "epsilons_equal": all(a["epsilon"] == b["epsilon"]
                                for a, b in zip(first, second))}


def write_plot(cells: Sequence[dict[str, Any]], path: str) -> None:
  """Accuracy vs epsilon (log x), one line per clip norm, min-max bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6, 4))
  for clip in sorted({c["clip_norm"] for c in cells}):
    line = sorted((c for c in cells if c["clip_norm"] == clip),
                  key=lambda c: c["epsilon"])
    eps = [c["epsilon"] for c in line]
    mean = [100 * c["accuracy_mean"] for c in line]
    err = [[100 * (c["accuracy_mean"] - c["accuracy_min"]) for c in line],
           [100 * (c["accuracy_max"] - c["accuracy_mean"]) for c in line]]
    ax.errorbar(eps, mean, yerr=err, marker="o", capsize=3,
                label=f"clip norm {clip:g}")
  ax.set_xscale("log")
  ax.set_xlabel("epsilon (RDP, delta = 1/500^1.1)")
  ax.set_ylabel("final test accuracy (%)")
  ax.set_title("DP-FedAvg on MNIST: noise x clip grid")
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(out: str, cells: Sequence[dict[str, Any]],
                 seconds: dict[str, float], members: int,
                 agreed: dict[str, Any] | None) -> None:
  """``out.json`` and ``out.md``."""
  args = ["--workdir=RUNS" if arg.startswith("--workdir=") else arg
          for arg in sys.argv[1:]]  # no machine paths in the results
  command = " ".join(["python -m experiments.studies.dp_grid", *args])
  with open(out + ".json", "w") as f:
    json.dump({"command": command, "members": members, "rounds": _ROUNDS.value,
               "wall_seconds": seconds, "agreement": agreed,
               "cells": list(cells)}, f, indent=1)
  lines = [
      "# DP-FedAvg noise x clip grid on MNIST (one vectorised sweep)", "",
      f"Command: `{command}`", "",
      f"`configs/dp_mnist.py` ({_ROUNDS.value} rounds, Poisson sampling "
      "q = 0.2 of 500 clients, MLP 784-64-10, RDP accounting, each member "
      "with its own secret noise and sampling seed), final evaluation only; "
      f"{members} members = noise multipliers x clip norms x seeds. "
      "Accuracy: final test accuracy, mean and min-max over seeds; epsilon "
      "does not depend on the clip norm or the seed.", "",
      "| noise multiplier | clip norm | epsilon | accuracy | min-max |",
      "|---|---|---|---|---|"]
  for c in cells:
    lines.append(
        f"| {c['noise_multiplier']:g} | {c['clip_norm']:g} | "
        f"{c['epsilon']:.2f} | {100 * c['accuracy_mean']:.1f}% | "
        f"{100 * c['accuracy_min']:.1f}-{100 * c['accuracy_max']:.1f}% |")
  lines += ["", "Wall clock of the whole sweep (2-core CPU):", ""]
  for mode, value in seconds.items():
    how = {"vectorize": "`experiments.sweep --vectorize "
                        f"--vectorize_max_members={_MAX_MEMBERS.value}` (one "
                        "process, programs of at most that many members)",
           "parallel2": "`experiments.sweep --parallel=2` (a process per "
                        "member, two at a time)"}[mode]
    lines.append(f"* {how}: {value:.0f} s")
  if agreed is not None:
    lines += ["", "The two sweeps' members drew their own secret seeds, so "
              "they agree up to DP noise and sampling: cell mean accuracies "
              f"differ by {100 * agreed['mean_accuracy_gap']:.2f} points on "
              f"average, {100 * agreed['max_accuracy_gap']:.2f} at most; "
              "every epsilon is " + ("identical." if agreed["epsilons_equal"]
                                      else "NOT identical.")]
  lines += ["", f"![accuracy vs epsilon]({os.path.basename(out)}.png)"]
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str]) -> None:
  del argv
  out = _OUT.value or os.path.join(paths.REPO_ROOT, "experiments", "results",
                                   "dp_mnist_grid")
  previous = sweep_summary.read_json(out + ".json") or {}
  seconds = dict(previous.get("wall_seconds", {}))
  rows, by_mode = None, {}
  for mode in _MODES.value:
    workdir = os.path.join(_WORKDIR.value, mode)
    done = os.path.exists(os.path.join(workdir, "sweep_summary.csv")) and (
        mode in seconds)
    if not done:
      start = time.perf_counter()
      result = subprocess.run(sweep_command(workdir, mode), cwd=paths.REPO_ROOT,
                              check=False)
      if result.returncode != 0:
        sys.exit(f"the {mode} sweep failed (exit {result.returncode}); see "
                 f"{workdir}/*/log.txt")
      seconds[mode] = time.perf_counter() - start
    members = read_members(workdir)
    by_mode[mode] = aggregate(members)
    if rows is None:
      rows = members
  cells = aggregate(rows)
  write_report(out, cells, seconds, len(rows), agreement(by_mode))
  write_plot(cells, out + ".png")
  print(json.dumps({"out": out + ".md", "wall_seconds": seconds}))


if __name__ == "__main__":
  app.run(main)
