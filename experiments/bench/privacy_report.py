"""The privacy benchmark's settings, verdicts and tables.

Split from ``experiments/bench/privacy.py`` (which times the rounds):
the DP settings and the 10% requirement both use, :func:`assess` (per
workload, the DP cost checked against the requirement and a profile of
where the time goes) and :func:`render_markdown` (the report's tables and
its reading in words).
"""

from __future__ import annotations

from typing import Any

REQUIREMENT = 0.10  # The privacy machinery may add at most this to a round.
# The DP settings of every variant (clip norm C, noise multiplier z) and the
# accountant's delta.
CLIP_NORM = 1.0
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5


def assess(report: dict[str, Any]) -> None:
  """Adds, per workload, the DP cost verdicts against ``REQUIREMENT``.

  On the compiled round (the runner overlaps host-side cohort work with it):
  for each DP variant and accountant, the in-round overhead (round_fn ratio -
  1), the accountant's per-round call (t = 2..R) as a fraction of the DP round,
  and the total ``(dp round_fn + accountant) / baseline round_fn - 1``. The
  A/A control's deviation from 1 is recorded as the timing resolution.
  """
  for entry in report["workloads"].values():
    rows = {r["variant"]: r for r in entry["results"]}
    base_fn = rows["baseline"]["median_round_fn_s"]
    control = rows.get("baseline_again")
    entry["resolution"] = (abs(control["round_fn_ratio_to_baseline"] - 1)
                           if control else None)
    checks = []
    for row in entry["results"]:
      if row["kind"] != "dp":
        continue
      for kind, acc in report["accountant"].items():
        acc_s = acc["median_call_s"]
        total = (row["median_round_fn_s"] + acc_s) / base_fn - 1
        checks.append({
            "variant": row["variant"], "accountant": kind,
            "in_round_overhead": row["round_fn_ratio_to_baseline"] - 1,
            "in_round_overhead_full": row["ratio_to_baseline"] - 1,
            "accountant_s": acc_s,
            "accountant_fraction_of_dp_round": acc_s / row["median_round_fn_s"],
            "accountant_fraction_of_dp_full_round":
                acc_s / row["median_round_s"],
            "accountant_at_horizon_fraction_of_dp_round":
                acc["horizon_call_s"] / row["median_round_fn_s"],
            "total_overhead": total, "meets_requirement": total <= REQUIREMENT})
    entry["requirement_checks"] = checks
    entry["profile"] = _profile(rows, entry["components"],
                                entry["settings"]["cohort_size"])


# (label, variant, what it isolates: the variant minus this one, or None for
# the baseline; the matching "alone" component cost per round, if any).
_PROFILE = (
    ("A/A control (baseline timed again)", "baseline_again", None, None),
    ("each client's norm", "norm_only", None, "norm_cohort_s"),
    ("clipping (norm + scale), all clients", "dp_zero_noise", None,
     "clip_cohort_s"),
    ("central noise (one draw)", "noise_only", None, "noise_one_draw_s"),
    ("DP-FedAvg in all (clip + noise + metrics)", "dp_gaussian", None, None),
    ("adaptive minus DP-FedAvg (extra leaf, count noise, clip state)",
     "dp_adaptive", "dp_gaussian", None),
    ("local DP in all (clip + one summed noise draw)", "dp_local", None,
     None),
)


def _profile(rows: dict[str, dict[str, Any]], components: dict[str, Any],
             cohort_size: int) -> list[dict[str, Any]]:
  """Seconds per round each DP part adds, in the round and alone."""
  base_fn = rows["baseline"]["median_round_fn_s"]
  parts = []
  for label, name, minus, alone_key in _PROFILE:
    if name not in rows or (minus and minus not in rows):
      continue
    extra = rows[name]["round_fn_extra_s"] - (
        rows[minus]["round_fn_extra_s"] if minus else 0.0)
    alone = None
    if alone_key == "norm_cohort_s":
      alone = components["norm_one_client_s"] * cohort_size
    elif alone_key:
      alone = components[alone_key]
    parts.append({"part": label, "variant": name, "minus": minus,
                  "in_round_s": extra, "alone_s": alone,
                  "fraction_of_baseline_round_fn": extra / base_fn})
  return parts


def _f(x: float, digits: int = 3) -> str:
  return f"{x:.{digits}g}" if abs(x) < 1e-2 else f"{x:.{digits}f}"


def _pct(x: float) -> str:
  return f"{100 * x:+.1f}%"


def _share(x: float) -> str:
  return f"{100 * x:.2f}%" if x < 0.01 else f"{100 * x:.1f}%"


def _ms(x: float) -> str:
  return f"{1000 * x:.3g} ms" if abs(x) >= 1e-4 else f"{1e6 * x:.3g} µs"


def render_markdown(report: dict[str, Any]) -> str:
  """The report: a table per workload, the accountant, the verdicts."""
  m = report["machine"]
  lines = [f"# Cost of differential privacy per round ({m['backend']}, "
           f"{m['device_kind']})", "",
           f"`{report['command']}` ({report['date']}); {m['cpu_model']}, "
           f"{m['cpu_cores']} cores; jax {m['jax']}." +
           (" **Quick mode.**" if report["quick"] else ""), "",
           f"DP settings: clip norm C = {CLIP_NORM}, noise multiplier z = "
           f"{NOISE_MULTIPLIER}, expected cohort = the cohort size. Every "
           "variant runs the same cohorts, restarted from the same state for "
           "each repeat, the variants' rounds interleaved. s/round = median "
           "over rounds of each round's best run of the repeats (other "
           "processes only add time); \"full\" includes host-side cohort "
           "building (run sequentially, an upper bound), \"round_fn\" is the "
           "compiled round alone. Ratios are to the baseline measured in the "
           "same process; \"all runs\" uses the median of every run instead "
           "of the best, \"paired\" the median of per-run ratios to the "
           "baseline's run of the same round. The 10% check is made on the "
           "compiled round (the runner overlaps the host-side cohort work "
           "with it), the accountant's host-side call added.", ""]
  for e in report["workloads"].values():
    s, c = e["settings"], e["components"]
    lines += [
        f"## {e['title']} ({e['strategy']})", "",
        f"Data: {e['data']}. Cohort {s['cohort_size']}, batch "
        f"{s['batch_size']}, {s['num_epochs']} epoch(s); {c['num_params']:,} "
        f"parameters in {c['num_leaves']} leaves; timed rounds "
        f"{s['timed_rounds']} x {s['repeats']} repeats, warm-up rounds "
        f"{s['warmup_rounds']}; load average (1 min) "
        f"{e['load_average_start'][0]:.1f} before, "
        f"{e['load_average_end'][0]:.1f} after.", "",
        "| variant | full s/round | round_fn s | ratio (full) | ratio "
        "(round_fn) | ratio, all runs (full) | paired ratio (round_fn) | "
        "compile s | max abs diff vs baseline | what |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in e["results"]:
      what = r["description"]
      if r["compiles_in_timed_pass"]:
        what += f"; {r['compiles_in_timed_pass']} compiles while timed"
      lines.append(
          f"| {r['variant']} | {_f(r['median_round_s'], 4)} | "
          f"{_f(r['median_round_fn_s'], 4)} | {r['ratio_to_baseline']:.3f} | "
          f"{r['round_fn_ratio_to_baseline']:.3f} | "
          f"{r['all_samples_ratio_to_baseline']:.3f} | "
          f"{r['paired_round_fn_ratio']:.3f} | {r['compile_s']:.1f} | "
          f"{r['max_abs_param_diff_vs_baseline']:.1e} | {what} |")
    lines += ["", "Where the time goes (per round; in the round = the "
              "variant's round_fn s/round minus the baseline's; alone = the "
              "part jitted by itself on one model-sized update, times the "
              "clients that run it):", "",
              "| part | in the round | % of baseline round_fn | alone |",
              "|---|---|---|---|"]
    for part in e["profile"]:
      alone = "" if part["alone_s"] is None else _ms(part["alone_s"])
      lines.append(f"| {part['part']} | {_ms(part['in_round_s'])} | "
                   f"{_pct(part['fraction_of_baseline_round_fn'])} | "
                   f"{alone} |")
    lines += ["", "| DP variant | accountant | in-round overhead (round_fn; "
              "full) | accountant / DP round (round_fn; full) | total vs "
              "baseline round_fn | ≤ 10%? |", "|---|---|---|---|---|---|"]
    for ch in e["requirement_checks"]:
      lines.append(
          f"| {ch['variant']} | {ch['accountant']} | "
          f"{_pct(ch['in_round_overhead'])}; "
          f"{_pct(ch['in_round_overhead_full'])} | "
          f"{_share(ch['accountant_fraction_of_dp_round'])}; "
          f"{_share(ch['accountant_fraction_of_dp_full_round'])} | "
          f"{_pct(ch['total_overhead'])} | "
          f"{'yes' if ch['meets_requirement'] else '**no**'} |")
    lines.append("")
  lines += ["## Accountant (host side)", "",
            f"`RoundAccountant(AccountingSpec(noise_multiplier=1.0, "
            f"sampling=\"poisson\", population=1000, sampling_rate=0.05, "
            f"accountant=...), delta={DELTA:g}).epsilon(t)`, called for t = "
            "1, 2, ... in order as the training loop does (one new t per "
            "round; the first call also builds the one-round RDP vector or "
            "PLD, once per run); medians over fresh accountants. The 10% "
            "check uses the per-round cost at t = 2..R.", "",
            "| accountant | first call (t=1) | per round, t=2..R | mean over "
            "t=1..R | per round near t=horizon | epsilon at R | epsilon at "
            "horizon |", "|---|---|---|---|---|---|---|"]
  for kind, a in report["accountant"].items():
    lines.append(
        f"| {kind} | {_ms(a['first_call_s'])} | {_ms(a['median_call_s'])} | "
        f"{_ms(a['mean_call_s'])} | {_ms(a['horizon_call_s'])} (t≈"
        f"{a['horizon']}) | {a['epsilon_at_rounds']:.3f} (R="
        f"{report['rounds']}) | {a['epsilon_at_horizon']:.3f} |")
  lines += ["", "## Reading", "", _reading(report), ""]
  return "\n".join(lines)


def _reading(report: dict[str, Any]) -> str:
  """The verdict per workload, in words, from the numbers."""
  parts = []
  for name, e in report["workloads"].items():
    checks = e["requirement_checks"]
    rows = {r["variant"]: r for r in e["results"]}
    base_fn = rows["baseline"]["median_round_fn_s"]
    text = f"**{name.upper()}** (baseline round_fn {_ms(base_fn)}"
    if e.get("resolution") is not None:
      text += f"; the A/A control deviates by {100 * e['resolution']:.1f}%"
    text += "): "
    noise = e.get("resolution") or 0.0

    def verdict(check):
      if not check["meets_requirement"]:
        return "FAILS"
      if check["total_overhead"] > REQUIREMENT - noise:
        return "meets, within the timing noise of the limit"
      return "meets"

    verdicts = []
    for variant in dict.fromkeys(c["variant"] for c in checks):
      by_kind = {c["accountant"]: c for c in checks if c["variant"] == variant}
      verdicts.append(f"{variant} {_pct(by_kind['rdp']['in_round_overhead'])}"
                      " in the round, " + ", ".join(
                          f"{_pct(c['total_overhead'])} with {kind} "
                          f"({verdict(c)})" for kind, c in by_kind.items()))
    text += "; ".join(verdicts) + "."
    causes = []
    local = [c for c in checks if c["variant"] == "dp_local" and
             c["in_round_overhead"] > REQUIREMENT]
    if local:
      causes.append(" dp_local: clipping plus one model-sized noise draw, "
                    "like DP-FedAvg; profile the rows above to see which "
                    "part grew.")
    cheapest = min(report["accountant"].items(),
                   key=lambda item: item[1]["median_call_s"])
    for kind, acc in report["accountant"].items():
      slow = [c for c in checks if c["accountant"] == kind and
              not c["meets_requirement"] and
              c["accountant_fraction_of_dp_round"] > REQUIREMENT / 2]
      if slow:
        share = slow[0]["accountant_fraction_of_dp_round"]
        causes.append(
            f" The {kind} accountant: epsilon(t) takes "
            f"{_ms(acc['median_call_s'])} per round on the host "
            f"({_ms(acc['horizon_call_s'])} near t = {acc['horizon']}), "
            f"{100 * share:.0f}% of the DP round by itself ({cheapest[0]}: "
            f"{_ms(cheapest[1]['median_call_s'])}). The runner computes the "
            "next rounds' epsilon in its prefetch thread while the device "
            "runs the round, so this host time is hidden whenever the host "
            "has a core to spare; where it does not (this 2-core CPU with a "
            f"~10 ms round), use {cheapest[0]}.")
    parts.append(text + "".join(causes))
  return "\n\n".join(parts)
