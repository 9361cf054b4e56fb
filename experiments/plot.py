r"""PNG plots of one or more runs' metrics (matplotlib, Agg backend).

  python -m experiments.plot --workdir=DIR [DIR ...] [--out_dir=OUT]
  fedjax-lab plot ...                    (the same)

Each DIR is one of
* a run's workdir: ``metrics.jsonl`` (``config.json`` and ``summary.json``
  are read when present);
* a sweep root (has ``sweep.json`` or subfolders holding ``metrics.jsonl``):
  its members, in ``sweep.json``'s order or else natural name order
  (members moved aside as ``*.interrupted-N`` are left out);
* a folder of saved runs ``<name>.metrics.jsonl`` (+ ``<name>.summary.json``),
  as in ``experiments/results/dp_mnist``;
* one ``*metrics.jsonl`` file.
A run is labelled by its folder (or file) name, without the time stamp of
default workdirs, prefixed by its parent folder where names collide.

Writes into OUT (default ``<first DIR>/plots``), skipping a plot no run has
data for: ``eval_accuracy.png``, ``eval_loss.png`` and ``train_loss.png`` vs
rounds (one line per run; with more than 100 rounds the per-round values are
drawn faint under a moving average); ``epsilon.png`` vs rounds (DP runs
only; the axis names the neighbouring relation, or the legend each run's
when they differ: add/remove and replace-one epsilons are not comparable);
``accuracy_vs_epsilon.png`` (final accuracy against final epsilon, one
point per DP run; runs without DP as dashed lines; relations named the same
way); ``per_client_accuracy.png``
(ECDF of per-client accuracies where a summary's ``personalization`` block or
a record holds lists of them under keys naming an accuracy, e.g.
``global_accuracy`` and ``personalized_accuracy``). Prints the paths written.
A DIR without metrics ends the process with ``error: ...`` naming it and exit
code 2. Finding and reading the runs is :mod:`experiments.lib.runs`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Sequence

import numpy as np

from experiments.lib import cli
from experiments.lib.runs import (PlotError, Run, as_number, discover_runs,
                                  final_value, is_private,
                                  per_client_accuracies, relation_labels,
                                  series)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _colors(count: int) -> list[Any]:
  plt = _pyplot()
  cmap = plt.get_cmap("tab10" if count <= 10 else "tab20")
  return [cmap(i % cmap.N) for i in range(count)]


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
  kernel = np.ones(window) / window
  padded = np.pad(values, (window // 2, window - 1 - window // 2), "edge")
  return np.convolve(padded, kernel, mode="valid")


def _finish(fig, ax, path: str, legend_entries: int) -> str:
  if legend_entries > 8:  # beside the axes, not over the lines
    fig.set_size_inches(fig.get_size_inches()[0] + 2.2,
                        fig.get_size_inches()[1])
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  elif legend_entries:
    ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  _pyplot().close(fig)
  return path


def plot_vs_rounds(runs: Sequence[Run], key: str, ylabel: str, path: str,
                   log_y_above: float = math.inf,
                   vary_style: bool = False,
                   labels: dict[str, str] | None = None) -> str | None:
  """``key`` against rounds, one line per run; None if no run has ``key``.

  The y axis is logarithmic when the positive values span more than a factor
  ``log_y_above``; ``vary_style`` cycles line styles so that runs with equal
  curves (e.g. the same accountant) stay visible. ``labels`` maps run names
  to legend labels.
  """
  labels = labels or {}
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  drawn, smoothed, positive = 0, False, []
  for index, (run, color) in enumerate(zip(runs, _colors(len(runs)))):
    rounds, values = series(run, key)
    if not rounds.size:
      continue
    drawn += 1
    positive.append(values[np.isfinite(values) & (values > 0)])
    style = ("-", "--", "-.", ":")[index % 4] if vary_style else "-"
    if rounds.size > 100:
      window = max(2, rounds.size // 50)
      ax.plot(rounds, values, color=color, alpha=0.25, linewidth=0.7)
      ax.plot(rounds, _moving_average(values, window), color=color,
              label=labels.get(run.name, run.name), linewidth=1.5,
              linestyle=style)
      smoothed = True
    else:
      ax.plot(rounds, values, color=color, label=labels.get(run.name, run.name),
              linestyle=style, marker="o" if rounds.size <= 30 else None,
              markersize=3)
  if not drawn:
    plt.close(fig)
    return None
  positive = np.concatenate(positive)
  if positive.size and positive.max() > log_y_above * positive.min():
    ax.set_yscale("log")
  ax.set_xlabel("round")
  ax.set_ylabel(ylabel)
  ax.set_title(ylabel + (" (faint: per round; bold: moving average)"
                         if smoothed else ""), fontsize=9)
  return _finish(fig, ax, path, drawn)


def plot_accuracy_vs_epsilon(runs: Sequence[Run], path: str) -> str | None:
  """Final accuracy vs final epsilon, a point per DP run; None if none."""
  points = []
  for run in runs:
    accuracy = final_value(run, "eval_accuracy", "final_eval_accuracy")
    epsilon = (final_value(run, "epsilon", "epsilon") if is_private(run)
               else None)
    points.append((run, accuracy, epsilon))
  private = [(r, a, e) for r, a, e in points
             if a is not None and e is not None and math.isfinite(e)]
  if not private:
    return None
  suffix, labels = relation_labels([r for r, _, _ in private])
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  colors = _colors(len(runs))
  in_legend = len(private) > 8  # too many points to annotate legibly
  for (run, accuracy, epsilon), color in zip(points, colors):
    if accuracy is None:
      continue
    if epsilon is None:
      ax.axhline(100 * accuracy, color=color, linestyle="--",
                 label=f"{run.name} (no DP)")
    elif math.isfinite(epsilon):
      ax.scatter([epsilon], [100 * accuracy], color=color, zorder=3,
                 label=labels[run.name] if in_legend else None)
      if not in_legend:
        ax.annotate(labels[run.name], (epsilon, 100 * accuracy), fontsize=7,
                    textcoords="offset points", xytext=(5, -3))
  epsilons = [e for _, _, e in private]
  if max(epsilons) > 10 * min(epsilons):
    import matplotlib.ticker  # pylint: disable=g-import-not-at-top
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(
        lambda value, _: f"{value:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  deltas = {as_number((r.summary or {}).get("delta")) for r, _, _ in private}
  delta = deltas.pop() if len(deltas) == 1 else None
  ax.set_xlabel("final epsilon" + (f" at delta={delta:.2g}" if delta else "")
                + suffix)
  ax.set_ylabel("final eval accuracy (%)")
  ax.set_title("accuracy vs privacy (one point per run)", fontsize=9)
  return _finish(fig, ax, path, len(points) - len(private) +
                 (len(private) if in_legend else 0))


def plot_per_client(runs: Sequence[Run], path: str) -> str | None:
  """ECDFs of per-client accuracies; None if no run reports them."""
  curves = [(f"{run.name}: {key}" if len(runs) > 1 else key, values)
            for run in runs
            for key, values in per_client_accuracies(run).items()]
  if not curves:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4.2))
  for (label, values), color in zip(curves, _colors(len(curves))):
    ordered = np.sort(values)
    fractions = np.arange(1, ordered.size + 1) / ordered.size
    ax.step(np.concatenate([ordered[:1], ordered]),
            np.concatenate([[0.0], fractions]), where="post", color=color,
            label=f"{label} (n={ordered.size}, "
            f"median {np.median(ordered):.3f})")
  ax.set_xlabel("client accuracy")
  ax.set_ylabel("fraction of clients with accuracy <= x")
  ax.set_title("per-client accuracy (ECDF)", fontsize=9)
  return _finish(fig, ax, path, len(curves))


def make_plots(runs: Sequence[Run], out_dir: str) -> list[str]:
  """Writes every plot the runs have data for; returns the paths written."""
  os.makedirs(out_dir, exist_ok=True)
  out = lambda name: os.path.join(out_dir, name)  # noqa: E731
  private = [run for run in runs if is_private(run)]
  written = [
      plot_vs_rounds(runs, "eval_accuracy", "eval accuracy",
                     out("eval_accuracy.png")),
      plot_vs_rounds(runs, "eval_loss", "eval loss", out("eval_loss.png"),
                     log_y_above=20),
      plot_vs_rounds(runs, "train_loss", "train loss (cohort mean)",
                     out("train_loss.png"), log_y_above=20),
      plot_vs_rounds(private, "epsilon",
                     "epsilon (accountant)" + relation_labels(private)[0],
                     out("epsilon.png"), log_y_above=20, vary_style=True,
                     labels=relation_labels(private)[1])
      if private else None,
      plot_accuracy_vs_epsilon(runs, out("accuracy_vs_epsilon.png")),
      plot_per_client(runs, out("per_client_accuracy.png")),
  ]
  return [path for path in written if path is not None]


def main(argv: Sequence[str] | None = None,
         prog: str = "python -m experiments.plot") -> int:
  """The CLI (see the module docstring); returns the exit code."""
  parser = argparse.ArgumentParser(
      prog=prog,
      description="Plot runs' metrics.jsonl files as PNGs.")
  parser.add_argument("--workdir", nargs="+", action="extend", default=[],
                      help="run workdirs, sweep roots or metrics files")
  parser.add_argument("more_workdirs", nargs="*", help=argparse.SUPPRESS)
  parser.add_argument("--out_dir", default=None,
                      help="where to write the PNGs (default: "
                      "<first workdir>/plots)")
  args = parser.parse_args(argv)
  paths = args.workdir + args.more_workdirs
  if not paths:
    parser.error("give at least one --workdir")
  try:
    runs = discover_runs(paths)
  except PlotError as e:
    cli.fail(str(e), 2)
  first = paths[0]
  out_dir = args.out_dir or os.path.join(
      first if os.path.isdir(first) else os.path.dirname(first) or ".",
      "plots")
  for path in make_plots(runs, out_dir):
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
