"""The FedProx Synthetic grid's report: the paper's findings checked on
the grid's rows, the markdown tables, and the Figure-1-like grid of
training-loss curves. Written by :mod:`experiments.studies.fedprox_synthetic`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from experiments.studies.fedprox_synthetic_grid import METHODS, parse_setting


def _curve_gap(members, setting: str) -> float | None:
  """Largest |FedAvg - FedProx mu=0| between their 0%-straggler loss curves,
  seed by seed (None if the grid lacks them)."""
  curves = {(m["method"], m["seed"]): m["curve"]["train_loss"] for m in members
            if (m["setting"], m["stragglers"]) == (setting, 0.0)}
  gaps = [abs(x - y) for (method, seed), c in curves.items()
          if method == "fedavg" and ("fedprox_mu0", seed) in curves
          for x, y in zip(c, curves[("fedprox_mu0", seed)])]
  return max(gaps) if gaps else None


def check_findings(members: list[dict[str, Any]],
                   rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """The paper's qualitative claims (Li et al., MLSys 2020, Sec. 5.2 and
  Figures 1-2), each checked on our numbers.

  Returns a list of ``{claim, check, holds, detail}``: ``holds`` is whether
  every case holds (None when the grid lacks the members a claim needs),
  ``detail`` lists the cases with their numbers.
  """
  table = {(r["setting"], r["stragglers"], r["method"]): r for r in rows}
  settings = list(dict.fromkeys(r["setting"] for r in rows))
  fractions = sorted({r["stragglers"] for r in rows})
  hetero = [s for s in settings if parse_setting(s) != (0.0, 0.0)]
  name = lambda s: f"({s.replace('_', ',')})"
  findings = []

  def value(key, setting, fraction, method):
    row = table.get((setting, fraction, method))
    return None if row is None else row[key]

  def with_std(key, *where):
    """(mean, std over seeds) of ``key``, or None if not in the grid."""
    mean = value(f"{key}_mean", *where)
    return None if mean is None else (mean, value(f"{key}_std", *where))

  def add(claim, check, cases):
    """cases: (label, a, b, holds(a, b)); ``a``, ``b`` are numbers or
    (mean, std) pairs; cases missing a value are skipped."""
    show = lambda x: (f"{x[0]:.3f} ± {x[1]:.3f}" if isinstance(x, tuple)
                      else f"{x:.3f}")
    mean = lambda x: x[0] if isinstance(x, tuple) else x
    # Differences within the two stds summed are flagged as seed noise.
    noise = lambda a, b: isinstance(a, tuple) and abs(a[0] - b[0]) < (
        a[1] + b[1])
    shown = [(f"{label} {show(a)} vs {show(b)}", ok(mean(a), mean(b)),
              noise(a, b)) for label, a, b, ok in cases
             if a is not None and b is not None]
    findings.append({
        "claim": claim, "check": check,
        "holds": all(ok for _, ok, _ in shown) if shown else None,
        "detail": "; ".join(
            f"{text}: {'yes' if ok else 'no'}{' (within noise)' * noisy}"
            for text, ok, noisy in shown) or "not in this grid"})

  loss = lambda *k: value("train_loss_mean", *k)
  lstd = lambda *k: with_std("train_loss", *k)
  less = lambda a, b: a < b
  add("Without stragglers FedAvg and FedProx mu=0 are the same algorithm.",
      "0% stragglers: largest difference between the FedAvg and FedProx "
      "mu=0 training-loss curves (same seed) vs 0: equal",
      [(name(s), _curve_gap(members, s), 0.0, lambda a, b: a == b)
       for s in settings])
  add("Heterogeneous data slows FedAvg (Figure 2).",
      "0% stragglers: FedAvg's final training loss grows from one setting to "
      "the next more heterogeneous one (caveat: different datasets, whose "
      "optimal losses differ too)",
      [(f"{name(a)}->{name(b)}", lstd(a, 0.0, "fedavg"),
        lstd(b, 0.0, "fedavg"), less) for a, b in zip(settings, settings[1:])])
  add("mu > 0 counters statistical heterogeneity (Figure 2).",
      "0% stragglers, Synthetic(0.5,0.5) and (1,1): final training loss "
      "FedProx mu=1 < mu=0",
      [(name(s), lstd(s, 0.0, "fedprox_mu1"), lstd(s, 0.0, "fedprox_mu0"),
        less) for s in hetero])
  add("Keeping stragglers' partial work (FedProx mu=0) converges better than "
      "dropping them (FedAvg).",
      "every setting, 50% and 90% stragglers: final training loss FedProx "
      "mu=0 < FedAvg",
      [(f"{name(s)} {f:.0%}", lstd(s, f, "fedprox_mu0"),
        lstd(s, f, "fedavg"), less) for s in settings for f in fractions
       if f > 0])
  add("With 90% stragglers FedProx mu=1 reaches a lower training loss than "
      "FedAvg.",
      "90% stragglers: final training loss FedProx mu=1 < FedAvg in every "
      "setting",
      [(name(s), lstd(s, 0.9, "fedprox_mu1"), lstd(s, 0.9, "fedavg"), less)
       for s in settings])
  add("The proximal term stabilises training on heterogeneous data.",
      "Synthetic(0.5,0.5) and (1,1), every straggler fraction: largest rise "
      "of the training loss between evaluations (max over seeds) mu=1 <= "
      "mu=0",
      [(f"{name(s)} {f:.0%}", value("max_loss_increase", s, f, "fedprox_mu1"),
        value("max_loss_increase", s, f, "fedprox_mu0"),
        lambda a, b: a <= b) for s in hetero for f in fractions])
  gap = lambda s, f: (None if None in (loss(s, f, "fedavg"),
                                       loss(s, f, "fedprox_mu1"))
                      else loss(s, f, "fedavg") - loss(s, f, "fedprox_mu1"))
  add("Statistical heterogeneity hurts FedAvg more than FedProx mu=1.",
      "each straggler fraction: the gap FedAvg - FedProx mu=1 in final "
      "training loss, Synthetic(0,0) vs (1,1): larger on (1,1)",
      [(f"{f:.0%}", gap("0_0", f), gap("1_1", f), less) for f in fractions])
  rise = lambda s, m: (None if len(fractions) < 2 or None in (
      loss(s, fractions[0], m), loss(s, fractions[-1], m)) else
                       loss(s, fractions[-1], m) - loss(s, fractions[0], m))
  add("Systems heterogeneity hurts FedAvg more than FedProx mu=1.",
      "each setting: rise of the final training loss from the fewest to the "
      "most stragglers, FedProx mu=1 vs FedAvg: smaller for mu=1",
      [(name(s), rise(s, "fedprox_mu1"), rise(s, "fedavg"), less)
       for s in settings])
  add("FedProx raises test accuracy over FedAvg in highly heterogeneous "
      "settings (paper: +22% absolute on average over all its datasets).",
      "90% stragglers: mean test accuracy FedProx mu=1 > FedAvg in every "
      "setting",
      [(name(s), with_std("test_accuracy", s, 0.9, "fedprox_mu1"),
        with_std("test_accuracy", s, 0.9, "fedavg"), lambda a, b: a > b)
       for s in settings])
  add("(not a paper claim) With 20 local epochs, stragglers' shorter local "
      "work may also mean less client drift.",
      "each setting: FedProx mu=0's final training loss, most stragglers vs "
      "none: lower with stragglers",
      [(name(s), lstd(s, fractions[-1], "fedprox_mu0"),
        lstd(s, fractions[0], "fedprox_mu0"), less) for s in settings
       if len(fractions) > 1])
  return findings


def _cell(mean: float, std: float, scale: float = 1.0, digits: int = 3) -> str:
  if not math.isfinite(mean):
    return "diverged"
  return f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def _table(rows, columns: Sequence[str], cell) -> list[str]:
  """Markdown table, one line per (setting, stragglers); ``cell(row)`` gives
  a method's cells (a row of ``summarize``, or None if not run)."""
  methods = [m for m in METHODS if any(r["method"] == m for r in rows)]
  by_key = {(r["setting"], r["stragglers"], r["method"]): r for r in rows}
  lines = ["| setting | stragglers | " + " | ".join(
      f"{METHODS[m][0]} {c}".strip() for m in methods for c in columns) + " |",
           "|---|---|" + "---|" * len(columns) * len(methods)]
  for setting, fraction in dict.fromkeys((r["setting"], r["stragglers"])
                                         for r in rows):
    cells = [c for m in methods for c in cell(by_key.get(
        (setting, fraction, m)))]
    lines.append(f"| Synthetic({setting.replace('_', ',')}) | {fraction:.0%} "
                 "| " + " | ".join(cells) + " |")
  return lines


def markdown(rows: list[dict[str, Any]], findings: list[dict[str, Any]],
             command: str, seeds: Sequence[int], rounds: int,
             eval_every: int) -> str:
  """The report: results table, stability table and the findings checked."""
  lines = [
      "# FedProx vs FedAvg on Synthetic(alpha, beta) with stragglers", "",
      "Li et al., \"Federated Optimization in Heterogeneous Networks\", MLSys "
      "2020, Figure 1 (and Figure 2 at 0% stragglers): 30 clients, "
      "multinomial logistic regression, 10 clients a round, 20 local epochs, "
      f"batch 10, lr 0.01, {rounds} rounds, seeds {list(seeds)}.", "",
      f"Command: `{command}`", "",
      "Training loss: the global model's loss on all training examples after "
      "the last round (the quantity the paper plots); test accuracy: on the "
      "held-out 20% of each client's examples. Mean ± std over seeds (the "
      "dataset is fixed per setting; seeds vary the initial model, sampling, "
      "stragglers and shuffling). Curves: `fedprox_synthetic.png`.", ""]
  lines += _table(rows, ["loss", "acc (%)"], lambda r: ("-", "-") if r is None
                  else (_cell(r["train_loss_mean"], r["train_loss_std"]),
                        _cell(r["test_accuracy_mean"], r["test_accuracy_std"],
                              100, 1)))
  lines += [
      "", "## Stability", "",
      "Largest rise of the training loss between consecutive evaluations "
      f"({eval_every} rounds apart), max over seeds; in brackets, the mean "
      "number of evaluations at which the loss went up; members whose loss "
      "became non-finite are counted as diverged.", ""]
  lines += _table(rows, [""], lambda r: ["-" if r is None else (
      f"{r['max_loss_increase']:.3f} ({r['loss_increases_mean']:.1f})" +
      (f", diverged {r['diverged']}/{r['seeds']}" if r["diverged"] else ""))])
  lines += ["", "## The paper's findings, checked on these numbers", "",
            "| paper's finding | our check | holds here | cases (a vs b) |",
            "|---|---|---|---|"]
  for f in findings:
    verdict = {True: "yes", False: "**no**", None: "n/a"}[f["holds"]]
    lines.append(f"| {f['claim']} | {f['check']} | {verdict} | "
                 f"{f['detail']} |")
  paper = [f for f in findings if not f["claim"].startswith("(not")]
  disagree = sum(f["holds"] is False for f in paper)
  lines += ["", ("Every finding checked holds on this grid." if not disagree
                 else f"{disagree} of {len(paper)} findings do not hold on "
                 "this grid (marked **no**): there our numbers disagree with "
                 "the paper. \"within noise\": the two means differ by less "
                 "than their seed stds summed, so 3 seeds cannot order them."),
            "",
            "Differences from the paper's setup: a client straggles with "
            "probability equal to the straggler fraction (independently, so "
            "a round's count varies; the paper fixes it), and a straggler "
            "stops after a uniformly random number of its local steps rather "
            "than epochs. When FedAvg drops every client of a round, the "
            "global model is unchanged that round.", ""]
  return "\n".join(lines)


def plot(members: list[dict[str, Any]], path: str) -> None:
  """3x3 grid like the paper's Figure 1: rows stragglers, columns settings;
  training loss vs round, mean over seeds, shaded min-max."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  settings = list(dict.fromkeys(m["setting"] for m in members))
  fractions = sorted({m["stragglers"] for m in members})
  colors = {"fedavg": "tab:green", "fedprox_mu0": "tab:blue",
            "fedprox_mu1": "tab:red"}
  styles = {"fedavg": ("-", 2.4), "fedprox_mu0": ("--", 1.3),
            "fedprox_mu1": ("-", 1.3)}  # FedAvg = mu=0 without stragglers
  fig, axes = plt.subplots(len(fractions), len(settings), squeeze=False,
                           figsize=(4 * len(settings),
                                    3 * len(fractions) + 0.6))
  handles = {}
  for i, fraction in enumerate(fractions):
    for j, setting in enumerate(settings):
      ax = axes[i][j]
      top = 0.0
      for method, (label, _, _) in METHODS.items():
        group = [m for m in members if (m["setting"], m["stragglers"],
                                        m["method"]) == (setting, fraction,
                                                         method)]
        if not group:
          continue
        length = min(len(m["curve"]["round"]) for m in group)
        x = group[0]["curve"]["round"][:length]
        y = np.array([m["curve"]["train_loss"][:length] for m in group])
        handles[label], = ax.plot(x, y.mean(0), styles[method][0],
                                  color=colors[method],
                                  linewidth=styles[method][1])
        ax.fill_between(x, y.min(0), y.max(0), color=colors[method],
                        alpha=0.2, linewidth=0)
        finite = y[np.isfinite(y)]
        if finite.size:
          top = max(top, float(np.percentile(finite, 99)))
      if top > 0:
        ax.set_ylim(0, 1.05 * top)
      ax.set_title(f"Synthetic({setting.replace('_', ',')}), "
                   f"{fraction:.0%} stragglers", fontsize=9)
      ax.grid(alpha=0.3)
      if i == len(fractions) - 1:
        ax.set_xlabel("round")
      if j == 0:
        ax.set_ylabel("training loss")
  fig.legend(handles.values(), handles.keys(), loc="upper center",
             ncol=len(handles), fontsize=9)
  fig.suptitle("training loss of the global model: mean over seeds, shaded "
               "min-max", y=0.962, fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 0.955))
  fig.savefig(path, dpi=110)
  plt.close(fig)
