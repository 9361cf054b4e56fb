r"""What differential privacy costs per federated round, against plain FedAvg.

  python -m experiments.bench.privacy [--workloads=w1,w2] [--rounds=5] \
      [--repeats=5] [--quick] \
      [--out=experiments/results/bench_privacy_<backend>]

For each workload of ``experiments/bench/workloads.py`` (W1 EMNIST CNN,
cohort 50; W2 logistic regression on Synthetic(1,1), cohort 10, 20 local
epochs), with the
backend's default strategy for the workload's model family, the same rounds
are timed for FedAvg with uniform weighting (the baseline) and each DP
aggregator of ``fedjax_lab.privacy.aggregators`` (clip norm C = 1, noise
multiplier z = 1, expected cohort = the cohort size):

* ``dp_gaussian``: DP-FedAvg, ``gaussian_sum`` (clip per client, noise once).
* ``dp_adaptive``: ``adaptive_clipping`` (plus the unclipped-count leaf and its
  noise, and a clip norm carried in the server state).
* ``dp_local``: ``local_gaussian`` (clipping per client; the reports' summed
  noise, N(0, K (zC)^2), drawn once per round — the same distribution as K
  per-client draws).
* ``dp_zero_noise``: ``gaussian_sum`` with z = 0, C = inf. Its parameters must
  equal the baseline's (a correctness check); its time is that of clipping
  alone (the norm and the scaling run as for a finite C).
* profile variants (not in ``--quick``): ``norm_only`` / ``noise_only``,
  only each client's global norm (kept as a metric) or only the central
  noise draw; ``baseline_again``, the
  baseline timed a second time (an A/A control: its ratio shows the noise).

Cohorts, warm-up and timing are ``experiments/bench/workloads.py``'s: warm-up
runs the first round of each padded shape for every variant; then,
``--repeats`` times, every variant restarts from a fresh state and the rounds
run interleaved (round r of every variant, in an order rotated at each step,
before round r + 1), so load changes hit all variants alike. "round_fn" is the
compiled round alone, "full" adds the host-side cohort work. A variant's
s/round is the median over rounds of each round's best run of the repeats
(other processes only add time); ratios divide it by the baseline's, measured
in this process. The median of all runs and the median of per-(repeat, round)
ratios to the baseline are reported too.

The host-side accountant is timed too: ``RoundAccountant(spec,
delta).epsilon(t)`` for t = 1..R (and up to ``--accountant_horizon``), RDP and
PLD, for Poisson sampling q = 0.05 of 1,000 clients and z = 1, as the training
loop calls it (once per round, a new t each time). The requirement checked: a
DP round, accounting included, costs at most 10% more than a non-DP round
(compiled rounds compared: the runner overlaps host-side cohort work, and
the accountant's next values, with them).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import optax

from experiments.bench import privacy_report
from experiments.bench import report as report_lib
from experiments.bench import workloads
from experiments.bench.privacy_report import CLIP_NORM
from experiments.bench.privacy_report import DELTA
from experiments.bench.privacy_report import NOISE_MULTIPLIER
from experiments.bench.privacy_report import REQUIREMENT
from experiments.bench.workloads import Workload
from experiments.lib import cli
from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import fedavg
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import default_strategy
from fedjax_lab.privacy import accounting
from fedjax_lab.privacy import aggregators
from fedjax_lab.privacy.clipping import clip_to_norm
from fedjax_lab.privacy.clipping import global_norm

ACCOUNTING = {"noise_multiplier": NOISE_MULTIPLIER, "sampling": "poisson",
              "population": 1000, "sampling_rate": 0.05}
# The command-line flags, once define_flags() ran: name -> FlagHolder.
_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the benchmark's flags (only when run as a program)."""
  _FLAGS.update(workloads.define_common_flags(flag_values, ("w1", "w2")))
  _FLAGS["repeats"] = flags.DEFINE_integer(
      "repeats", 5, "Timed passes per variant (interleaved).",
      flag_values=flag_values)
  _FLAGS["accountant_horizon"] = flags.DEFINE_integer(
      "accountant_horizon", 100, "Also time epsilon(t) up to this t (a "
      "longer run).", flag_values=flag_values)
  _FLAGS["variants"] = flags.DEFINE_list(
      "variants", None, "Variants to time (the baseline is always added); "
      "default: all.", flag_values=flag_values)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One aggregation to time: how to build it and what it shows."""

  name: str
  kind: str  # "baseline" | "dp" | "check" | "profile" | "control"
  description: str
  make_aggregator: Callable[[int], base.Aggregator | None]


def norm_only(expected_cohort_size: float) -> base.Aggregator:
  """Profile aggregator: each client's global norm (a metric), no clipping."""

  def client_transform(delta, weight, state, rng):
    del weight, state, rng
    return delta, jnp.ones([], jnp.float32), {"update_norm": global_norm(delta)}

  def finalize(weighted_sum, total_weight, num_clients, state, rng):
    del total_weight, num_clients, rng
    return (jax.tree.map(lambda s: s / expected_cohort_size, weighted_sum),
            state, {})

  return base.Aggregator(init=lambda: (), client_transform=client_transform,
                         finalize=finalize)


def noise_only(expected_cohort_size: float, noise_std: float = 1.0
               ) -> base.Aggregator:
  """Profile aggregator: Gaussian noise on the plain sum, no clipping."""

  def client_transform(delta, weight, state, rng):
    del weight, state, rng
    return delta, jnp.ones([], jnp.float32), {}

  def finalize(weighted_sum, total_weight, num_clients, state, rng):
    del total_weight, num_clients
    noisy = aggregators.add_gaussian_noise(weighted_sum, noise_std, rng)
    return (jax.tree.map(lambda s: s / expected_cohort_size, noisy), state,
            {})

  return base.Aggregator(init=lambda: (), client_transform=client_transform,
                         finalize=finalize)


def count_stddev(expected_cohort_size: float) -> float:
  """Adaptive clipping's count-noise std: Andrew et al.'s m / 20, at least z.

  ``split_noise_multiplier`` needs ``2 sigma_b > z``; m / 20 alone fails that
  for cohorts of 10 at z = 1. With sigma_b = z the update sum keeps
  multiplier ``z / sqrt(3/4)``.
  """
  return max(expected_cohort_size / 20.0, NOISE_MULTIPLIER)


VARIANTS = (
    Variant("baseline", "baseline", "FedAvg, uniform weighting, plain mean",
            lambda m: None),
    Variant("dp_gaussian", "dp", "DP-FedAvg: gaussian_sum(C=1, z=1, "
            "expected cohort m)",
            lambda m: aggregators.gaussian_sum(CLIP_NORM, NOISE_MULTIPLIER, m)),
    Variant("dp_adaptive", "dp", "adaptive_clipping(C0=1, z=1, m, count "
            "noise max(m/20, z))",
            lambda m: aggregators.adaptive_clipping(
                CLIP_NORM, NOISE_MULTIPLIER, m,
                clipped_count_stddev=count_stddev(m))),
    Variant("dp_local", "dp", "local_gaussian(C=1, z=1): summed noise drawn "
            "once",
            lambda m: aggregators.local_gaussian(CLIP_NORM, NOISE_MULTIPLIER)),
    Variant("dp_zero_noise", "check", "gaussian_sum(C=inf, z=0): equals the "
            "baseline; times clipping alone",
            lambda m: aggregators.gaussian_sum(float("inf"), 0.0, m)),
    Variant("norm_only", "profile", "profile: per-client global norm only",
            norm_only),
    Variant("noise_only", "profile", "profile: central noise only (std 1)",
            noise_only),
    Variant("baseline_again", "control", "A/A control: the baseline timed "
            "again as a separate variant (shows the timing noise)",
            lambda m: None),
)
QUICK_VARIANTS = ("baseline", "dp_gaussian", "dp_adaptive", "dp_local",
                  "dp_zero_noise")


def select_variants(names: list[str] | None, quick: bool) -> list[Variant]:
  """The variants to time, baseline first, in ``VARIANTS`` order."""
  known = {v.name: v for v in VARIANTS}
  names = list(names or (QUICK_VARIANTS if quick else known))
  unknown = [n for n in names if n not in known]
  if unknown:
    raise ValueError(f"unknown variants {unknown}; choose from {list(known)}.")
  return [v for v in VARIANTS if v.name == "baseline" or v.name in names]


def make_algorithm(w: Workload, model, aggregator
                   ) -> base.FederatedAlgorithm:
  """The workload's FedAvg with uniform weighting and ``aggregator``."""
  return fedavg.fedavg(model, optax.sgd(w.client_lr), 1.0,
                       weighting="uniform", aggregator=aggregator)


def time_variants(w: Workload, variants: list[Variant],
                  rounds: list[int], warmup_rounds: list[int], repeats: int,
                  log=print) -> tuple[list[dict[str, Any]], dict[str, Any]]:
  """Warm-up of every variant, then ``repeats`` interleaved timed passes
  (``workloads.time_interleaved``).

  Returns ``(rows, final_params)``; each row holds the variant's timings per
  ``[repeat][round]`` and their medians.
  """
  model = w.make_model()
  strategy = default_strategy(w.family)
  runs, rows = {}, {}
  for v in variants:
    algorithm = make_algorithm(w, model, v.make_aggregator(w.cohort_size))
    fn = round_lib.build_round(algorithm, strategy)
    if jax.tree.leaves(workloads.fresh_state(w, model, algorithm)[1]):
      raise ValueError("the interleaved timing assumes stateless clients.")
    rows[v.name] = workloads.new_row(
        v.name, v.kind, v.description, repeats,
        **workloads.warm_up(w, model, algorithm, fn, None, warmup_rounds))
    runs[v.name] = (algorithm, fn, None)
    log(f"[{w.name}] {v.name}: warm-up {rows[v.name]['warmup_s']:.1f} s "
        f"(compile {rows[v.name]['compile_s']:.1f} s)")
  final_params = workloads.time_interleaved(w, model, runs, rows, rounds,
                                            repeats)
  return list(rows.values()), final_params


def _median_call_s(fn, *args, calls: int = 20, samples: int = 5) -> float:
  """Median over ``samples`` of the mean seconds per call of ``fn``."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(samples):
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / calls)
  return statistics.median(times)


def time_components(w: Workload) -> dict[str, Any]:
  """The DP parts alone, jitted, on one update shaped like the model."""
  params = w.make_model().init(jax.random.key(0))
  key = jax.random.key(3)
  norm_s = _median_call_s(jax.jit(global_norm), params)
  clip_s = _median_call_s(jax.jit(lambda t: clip_to_norm(t, CLIP_NORM)),
                          params)
  noise_s = _median_call_s(jax.jit(
      lambda t, k: aggregators.add_gaussian_noise(t, 1.0, k)), params, key)
  return {"num_params": int(sum(leaf.size
                                for leaf in jax.tree.leaves(params))),
          "num_leaves": len(jax.tree.leaves(params)),
          "norm_one_client_s": norm_s, "clip_one_client_s": clip_s,
          "noise_one_draw_s": noise_s,
          "clip_cohort_s": clip_s * w.cohort_size,
          "noise_cohort_s": noise_s * w.cohort_size}


def time_accountant(kind: str, rounds: int, horizon: int, repeats: int
                    ) -> dict[str, Any]:
  """Seconds of ``RoundAccountant.epsilon(t)`` for t = 1, 2, ... in order.

  Each repeat starts a fresh accountant (so t = 1 includes building the
  one-round RDP vector or PLD); the per-t median over repeats is reported.
  """
  spec = accounting.AccountingSpec(accountant=kind, **ACCOUNTING)
  last_t = max(rounds, horizon)
  per_repeat, epsilons = [], []
  for _ in range(repeats):
    accountant = accounting.RoundAccountant(spec, DELTA)
    calls, epsilons = [], []
    for t in range(1, last_t + 1):
      start = time.perf_counter()
      epsilons.append(accountant.epsilon(t))
      calls.append(time.perf_counter() - start)
    per_repeat.append(calls)
  per_t = [statistics.median(c) for c in zip(*per_repeat)]
  tail = per_t[max(0, last_t - 10):]
  return {"accountant": kind, "spec": dict(ACCOUNTING, accountant=kind),
          "delta": DELTA, "repeats": repeats, "call_s": per_t,
          "first_call_s": per_t[0],
          "median_call_s": statistics.median(per_t[1:rounds] or per_t[:1]),
          "mean_call_s": statistics.fmean(per_t[:rounds]),
          "epsilon_at_rounds": epsilons[rounds - 1],
          "horizon": last_t, "horizon_call_s": statistics.median(tail),
          "epsilon_at_horizon": epsilons[-1]}


def bench_workload(w: Workload, variants: list[Variant],
                   num_rounds: int, repeats: int, full_warmup: bool = False,
                   log=print) -> dict[str, Any]:
  """Times every variant on ``w``; the report's entry for the workload."""
  rounds = list(range(num_rounds))
  cohorts = [w.cohort(r) for r in rounds]
  shapes = [c.padded_shape for c in cohorts]
  warmup = rounds if full_warmup else [shapes.index(s)
                                       for s in dict.fromkeys(shapes)]
  strategy = default_strategy(w.family)
  entry = {
      "title": w.title, "data": w.data_note, "family": w.family,
      "strategy": strategy.label,
      "settings": {"cohort_size": w.cohort_size, "batch_size": w.batch_size,
                   "num_epochs": w.num_epochs, "client_lr": w.client_lr,
                   "timed_rounds": rounds, "warmup_rounds": warmup,
                   "repeats": repeats, "clip_norm": CLIP_NORM,
                   "noise_multiplier": NOISE_MULTIPLIER,
                   "expected_cohort_size": w.cohort_size},
      "cohorts": [{"round": r, "padded_shape": list(s),
                   "real_steps": int(c.num_steps.sum())}
                  for r, s, c in zip(rounds, shapes, cohorts)],
      "load_average_start": list(os.getloadavg())}
  log(f"[{w.name}] {strategy.label}, shapes {sorted(set(shapes))}")
  entry["components"] = time_components(w)
  rows, params = time_variants(w, variants, rounds, warmup, repeats, log)
  for row in rows:
    row["max_abs_param_diff_vs_baseline"] = workloads.max_abs_diff(
        params[row["variant"]], params["baseline"])
    log(f"[{w.name}] {row['variant']}: {row['median_round_s']:.4f} s/round "
        f"(round_fn {row['median_round_fn_s']:.4f}), ratio "
        f"{row['ratio_to_baseline']:.3f}, diff vs baseline "
        f"{row['max_abs_param_diff_vs_baseline']:.1e}")
  entry["results"] = rows
  entry["load_average_end"] = list(os.getloadavg())
  return entry


def run_bench(workload_names: Sequence[str], rounds: int = 5, repeats: int = 5,
              quick: bool = False, variants: list[str] | None = None,
              accountant_horizon: int = 100, full_warmup: bool = False,
              command: str = "", out: str | None = None,
              log=print) -> dict[str, Any]:
  """Runs the privacy benchmark; returns the report (JSON-able).

  ``quick``: tiny workloads, at most 2 rounds, 2 repeats, no profile
  variants and no accountant horizon. ``out``: rewrite ``<out>.{json,md}``
  after every workload.
  """
  chosen = select_variants(variants, quick)
  if quick:
    rounds, repeats, accountant_horizon = min(rounds, 2), 2, 0
  report = {"machine": report_lib.machine_info(), "command": command,
            "quick": quick,
            "date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"),
            "variants": [v.name for v in chosen], "rounds": rounds,
            "repeats": repeats, "requirement": REQUIREMENT, "workloads": {}}
  start = time.perf_counter()
  report["accountant"] = {
      kind: time_accountant(kind, rounds, accountant_horizon,
                            1 if quick else 3) for kind in ("rdp", "pld")}
  for kind, a in report["accountant"].items():
    log(f"[accountant] {kind}: first {a['first_call_s']:.4f} s, then "
        f"{a['median_call_s']:.5f} s/round, {a['horizon_call_s']:.5f} at "
        f"t={a['horizon']}")
  for name in workload_names:
    report["workloads"][name] = bench_workload(
        workloads.build_workload(name, quick), chosen, rounds, repeats,
        full_warmup, log)
    privacy_report.assess(report)
    report["total_seconds"] = time.perf_counter() - start
    if out:
      report_lib.write_outputs(report, out, privacy_report.render_markdown)
  return report


def main(argv: Sequence[str]) -> None:
  """Command-line entry: the benchmark the flags describe."""
  cli.reject_extra_args(argv)
  value = {name: holder.value for name, holder in _FLAGS.items()}
  out = value["out"] or os.path.join(
      "experiments", "results", f"bench_privacy_{jax.default_backend()}")
  run_bench(value["workloads"], value["rounds"], value["repeats"],
            value["quick"], value["variants"], value["accountant_horizon"],
            value["full_warmup"],
            f"python -m experiments.bench.privacy {' '.join(sys.argv[1:])}"
            .strip(), out, functools.partial(print, flush=True))
  print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit())
