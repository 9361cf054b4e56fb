r"""Seconds per federated round for every execution strategy, against an ideal.

  python -m experiments.bench.strategies [--workloads=w1,w2,w3] \
      [--strategies=...] [--rounds=5] [--quick] \
      [--out=experiments/results/bench_<backend>]

Workloads: W1 EMNIST CNN, W2 logistic regression on Synthetic(1,1), W3
Shakespeare char-LSTM; W4 ResNet-18 (GroupNorm) at CIFAR-100 shapes when
named (``--workloads=w4``; ``experiments/bench/workloads.py``).

Every strategy gets the same cohorts (rounds ``0..R-1``, one seeded sampler),
built as the runner builds them. Warm-up runs the first round of each padded
shape (compiling every bucket; ``--full_warmup``: all R), then the R rounds are
timed from a fresh state. "Full round" adds host-side cohort building and
client-state bookkeeping, run sequentially (the runner overlaps them with
compute, so it is an upper bound); "round_fn" is the compiled round alone. The
ideal is the same real client steps as pure jitted SGD on device-resident
batches: min(serial step x real steps, vmapped step x real steps / cohort).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import statistics
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import report as report_lib
from experiments.bench import workloads
from experiments.bench.workloads import Workload
from experiments.lib import cli
from fedjax_lab.data.cohort import CohortBatch
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy, parse_strategy

ALL_STRATEGIES = ("vmap+scan", "vmap+unroll", "vmap+host", "map+scan",
                  "map+unroll", "chunked+scan", "chunked+unroll")
QUICK_STRATEGIES = ("vmap+scan", "vmap+unroll", "map+scan", "chunked+scan")
_COMPILED = workloads.COMPILED
# The command-line flags, once define_flags() ran: name -> FlagHolder.
_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the benchmark's flags (only when run as a program, and by
  ``device_check``, which runs this benchmark with them)."""
  _FLAGS.update(workloads.define_common_flags(flag_values))
  define = lambda kind, name, default, text, **kw: kind(
      name, default, text, flag_values=flag_values, **kw)
  _FLAGS.update(
      strategies=define(flags.DEFINE_list, "strategies", None, "Labels "
                        "('chunked' = the workload's chunk size); default: "
                        "all."),
      max_rounds=define(flags.DEFINE_string, "max_rounds", "w1=3,w3=2",
                        "Per-workload caps on --rounds (runtime)."),
      chunk_size=define(flags.DEFINE_integer, "chunk_size", 0,
                        "Chunk size (0: per workload)."),
      max_unroll_steps=define(flags.DEFINE_integer, "max_unroll_steps", 64,
                              "Skip unroll above this many padded steps."),
      time_budget_s=define(flags.DEFINE_float, "time_budget_s", 0.0,
                           "Skip the remaining strategies after this many "
                           "seconds (0: never)."))


def time_strategy(w: Workload, strategy: Strategy, rounds: list[int],
                  warmup_rounds: list[int], conv_impl: str | None = None):
  """Warm-up pass, then the timed pass; returns (timings, final params)."""
  model = w.make_model(conv_impl)
  algorithm = w.algorithm(model)
  fn = round_lib.build_round(algorithm, strategy)
  state, states = workloads.fresh_state(w, model, algorithm)
  before, start = dict(_COMPILED), time.perf_counter()
  workloads.run_rounds(w, fn, state, states, warmup_rounds)
  timings = {"warmup_s": time.perf_counter() - start,
             "compile_s": _COMPILED["seconds"] - before["seconds"],
             "compiles_in_warmup": _COMPILED["count"] - before["count"]}
  state, states = workloads.fresh_state(w, model, algorithm)
  before = _COMPILED["count"]
  state, full, only = workloads.run_rounds(w, fn, state, states, rounds)
  timings.update(compiles_in_timed_pass=_COMPILED["count"] - before,
                 median_round_s=statistics.median(full),
                 median_round_fn_s=statistics.median(only), round_s=full,
                 round_fn_s=only)
  return timings, jax.device_get(state.params)


def _median_call_s(fn, carry, *args, target_s: float = 0.25) -> float:
  """Median seconds per call of ``carry = fn(carry, *args)`` (donated)."""
  carry = jax.block_until_ready(fn(carry, *args))  # compile
  start = time.perf_counter()
  carry = jax.block_until_ready(fn(carry, *args))
  once = time.perf_counter() - start
  calls, samples = max(1, min(200, int(target_s / max(once, 1e-6)))), []
  for _ in range(5 if once < 1.0 else 3):
    start = time.perf_counter()
    for _ in range(calls):
      carry = fn(carry, *args)
    jax.block_until_ready(carry)
    samples.append((time.perf_counter() - start) / calls)
  return statistics.median(samples)


def measure_ideal(w: Workload, cohorts: list[CohortBatch]) -> dict[str, Any]:
  """Pure-compute time of the cohorts' real steps (serial, perfectly packed)."""
  model = w.make_model()
  lr, size, k = w.client_lr, w.batch_size, w.cohort_size

  sgd_step = workloads.sgd_step_fn(model, lr)
  rows = {n: np.resize(a, (k * size,) + a.shape[1:])
          for n, a in w.store.features.items()}
  one = jax.device_put({n: a[:size] for n, a in rows.items()})
  packed_batch = jax.device_put(
      {n: a.reshape((k, size) + a.shape[1:]) for n, a in rows.items()})
  params, rng = model.init(jax.random.key(0)), jax.random.key(2)
  stacked = jax.tree.map(lambda p: jnp.repeat(p[None], k, axis=0), params)
  serial_s = _median_call_s(jax.jit(sgd_step, donate_argnums=0), params, one,
                            rng)
  packed_s = _median_call_s(
      jax.jit(jax.vmap(sgd_step, in_axes=(0, 0, None)), donate_argnums=0),
      stacked, packed_batch, rng)
  steps = [int(c.num_steps.sum()) for c in cohorts]
  serial = statistics.median(serial_s * s for s in steps)
  packed = statistics.median(packed_s * s / k for s in steps)
  return {"serial_step_s": serial_s, "packed_step_s": packed_s,
          "serial_s_per_round": serial, "packed_s_per_round": packed,
          "kind": "serial" if serial <= packed else "packed",
          "ideal_s_per_round": min(serial, packed)}


def plan_strategies(labels, w: Workload, max_steps: int, max_unroll: int = 64,
                    chunk_size: int = 0):
  """``[(label, Strategy, skip reason or None)]`` for a workload."""
  plan = []
  for label in labels:
    if label.startswith("chunked+"):
      label = f"chunked{chunk_size or w.chunk_size}+{label.split('+')[1]}"
    # The engine falls back to scan past Strategy.max_unroll_steps (32 by
    # default); raise it to our limit so "unroll" rows really unroll.
    strategy = dataclasses.replace(parse_strategy(label, w.family),
                                   max_unroll_steps=max_unroll)
    reason = None
    if strategy.step_loop == "unroll" and max_steps > max_unroll:
      reason = (f"padded steps {max_steps} > {max_unroll}: unrolled compile "
                "time explodes")
    plan.append((strategy.label, strategy, reason))
  if w.alt_conv_impl:
    plan.append((f"vmap+unroll [conv={w.alt_conv_impl}]",
                 Strategy("vmap", "unroll", max_unroll_steps=max_unroll),
                 None))
  return plan


def bench_workload(w: Workload, labels, num_rounds: int, max_unroll: int = 64,
                   full_warmup: bool = False, deadline: float | None = None,
                   chunk_size: int = 0, log=print,
                   checkpoint=None) -> dict[str, Any]:
  """Times every strategy on ``w``; the report's entry for the workload.

  ``checkpoint(entry)`` is called after every timed strategy (partial
  results survive an interrupted run).
  """
  rounds = list(range(num_rounds))
  cohorts = [w.cohort(r) for r in rounds]
  shapes = [c.padded_shape for c in cohorts]
  warmup = rounds if full_warmup else [shapes.index(s)
                                       for s in dict.fromkeys(shapes)]
  real = [int(c.num_steps.sum()) for c in cohorts]
  padded = [c.padded_shape[0] * c.padded_shape[1] for c in cohorts]
  entry = {
      "title": w.title, "data": w.data_note, "family": w.family,
      "settings": {"cohort_size": w.cohort_size, "batch_size": w.batch_size,
                   "num_epochs": w.num_epochs, "client_lr": w.client_lr,
                   "max_steps": w.max_steps, "timed_rounds": rounds,
                   "warmup_rounds": warmup,
                   "chunk_size": chunk_size or w.chunk_size},
      "cohorts": [{"round": r, "padded_shape": list(s), "real_steps": n,
                   "padded_client_steps": p}
                  for r, s, n, p in zip(rounds, shapes, real, padded)],
      "padding_factor": sum(padded) / max(sum(real), 1),
      "load_average_start": list(os.getloadavg())}
  log(f"[{w.name}] shapes {sorted(set(shapes))}, real steps {real}")
  entry["ideal"] = measure_ideal(w, cohorts)
  entry["ideal"]["measurements_s"] = [entry["ideal"]["ideal_s_per_round"]]
  entry["results"], reference, last_s = [], None, 0.0
  for label, strategy, reason in plan_strategies(
      labels, w, max(s[1] for s in shapes), max_unroll, chunk_size):
    # Skip a strategy unless one more like the last one fits in the budget.
    if reason is None and deadline is not None and (time.time() + last_s >
                                                    deadline):
      reason = "time budget exhausted"
    row = {"strategy": label, "skipped": reason}
    entry["results"].append(row)
    if reason:
      log(f"[{w.name}] {label}: skipped ({reason})")
      continue
    impl = w.alt_conv_impl if "[conv=" in label else None
    start = time.time()
    timing, params = time_strategy(w, strategy, rounds, warmup, impl)
    last_s = time.time() - start
    row.update(timing)
    if reference is None:
      reference, row["reference"] = params, True
    row["max_abs_param_diff_vs_reference"] = workloads.max_abs_diff(
        params, reference)
    _finish_entry(entry)
    log(f"[{w.name}] {label}: {timing['median_round_s']:.3f} s/round, ratio "
        f"{row['ratio_to_ideal']:.2f}, compile {timing['compile_s']:.1f} s")
    if checkpoint:
      checkpoint(entry)
  if deadline is None or time.time() < deadline:
    # Measured again after the strategies; the less disturbed (smaller) wins.
    again = measure_ideal(w, cohorts)
    again["measurements_s"] = entry["ideal"]["measurements_s"] + [
        again["ideal_s_per_round"]]
    if again["ideal_s_per_round"] < entry["ideal"]["ideal_s_per_round"]:
      entry["ideal"] = again
    entry["ideal"]["measurements_s"] = again["measurements_s"]
  _finish_entry(entry)
  entry["load_average_end"] = list(os.getloadavg())
  return entry


def _finish_entry(entry: dict[str, Any]) -> None:
  """Ratios to the current ideal and the fastest strategy (in place)."""
  ideal_s = entry["ideal"]["ideal_s_per_round"]
  timed = [r for r in entry["results"] if not r["skipped"]]
  for row in timed:
    row["ratio_to_ideal"] = row["median_round_s"] / ideal_s
    row["round_fn_ratio_to_ideal"] = row["median_round_fn_s"] / ideal_s
  timed = [r for r in timed if "[" not in r["strategy"]]
  if timed:
    best = min(timed, key=lambda r: r["median_round_s"])
    entry["fastest"] = best["strategy"]
    entry["fastest_ratio_to_ideal"] = best["ratio_to_ideal"]


def _f(x: float, digits: int = 3) -> str:
  return f"{x:.{digits}g}" if x < 1e-2 else f"{x:.{digits}f}"


def _reading(report) -> str:
  """One paragraph on the results, quoting ratios only."""
  parts = []
  for name, e in report["workloads"].items():
    rows = {r["strategy"]: r for r in e["results"] if not r["skipped"]}
    if "fastest" not in e:
      continue
    secs = lambda label: rows[label]["median_round_s"]  # noqa: E731
    text = (f"{name.upper()}: fastest is {e['fastest']} at "
            f"{e['fastest_ratio_to_ideal']:.2f}x the {e['ideal']['kind']} "
            f"ideal; padded cohorts hold {e['padding_factor']:.2f}x the real "
            "client-steps (a step no client of a group needs is skipped)")
    if "vmap+scan" in rows and "map+scan" in rows:
      text += (f"; map+scan takes {secs('map+scan') / secs('vmap+scan'):.2f}x"
               " the time of vmap+scan")
    alt = [label for label in rows if "[conv=" in label]
    if alt and "vmap+unroll" in rows:
      text += (f"; under vmap+unroll the default conv is "
               f"{secs(alt[0]) / secs('vmap+unroll'):.1f}x faster than "
               f"{alt[0].split('=')[1][:-1]}")
    share = 1 - rows[e["fastest"]]["median_round_fn_s"] / secs(e["fastest"])
    parts.append(text + f"; host-side work is {100 * share:.0f}% of the "
                 "fastest round.")
  m = report["machine"]
  return " ".join(parts) + (
      f" Machine: {m['cpu_cores']} cores ({m['cpu_model']}), backend "
      f"{m['backend']}; load averages before/after each workload are in the "
      "JSON (other processes inflate absolute times, not compile counts).")


def render_markdown(report) -> str:
  """The report as one markdown table per workload plus a reading."""
  m = report["machine"]
  lines = [f"# Round benchmark ({m['backend']}, {m['device_kind']})", "",
           f"`{report['command']}` ({report['date']}); {m['cpu_model']}, "
           f"{m['cpu_cores']} cores; jax {m['jax']}, flax {m['flax']}, optax "
           f"{m['optax']}." + (" **Quick mode.**" if report["quick"] else ""),
           ""]
  for e in report["workloads"].values():
    s, i = e["settings"], e["ideal"]
    lines += [
        f"## {e['title']}", "",
        f"Data: {e['data']}. Cohort {s['cohort_size']}, batch "
        f"{s['batch_size']}, {s['num_epochs']} epoch(s), client lr "
        f"{s['client_lr']}; timed rounds {s['timed_rounds']}, warm-up rounds "
        f"{s['warmup_rounds']}; padded [C, S, B] "
        f"{sorted({tuple(c['padded_shape']) for c in e['cohorts']})}; real "
        f"client-steps per round {[c['real_steps'] for c in e['cohorts']]} "
        f"(padding factor {e['padding_factor']:.2f}).", "",
        "| strategy | compile s | median s/round | round_fn-only s | ratio to "
        "ideal | round_fn ratio | max abs diff vs ref | notes |",
        "|---|---|---|---|---|---|---|---|"]
    for r in e["results"]:
      if r["skipped"]:
        lines.append(f"| {r['strategy']} | | | | | | | skipped: "
                     f"{r['skipped']} |")
        continue
      notes = ["reference"] if r.get("reference") else []
      if r["compiles_in_timed_pass"]:
        notes.append(f"{r['compiles_in_timed_pass']} compiles while timed")
      lines.append(
          f"| {r['strategy']} | {r['compile_s']:.1f} | "
          f"{_f(r['median_round_s'])} | {_f(r['median_round_fn_s'])} | "
          f"{r['ratio_to_ideal']:.2f} | {r['round_fn_ratio_to_ideal']:.2f} | "
          f"{r['max_abs_param_diff_vs_reference']:.1e} | {'; '.join(notes)} |")
    lines += ["", f"Ideal: serial {_f(i['serial_step_s'], 4)} s/step x real "
              f"steps = {_f(i['serial_s_per_round'])} s/round; packed (vmap "
              f"over {s['cohort_size']}) {_f(i['packed_step_s'], 4)} s/step = "
              f"{_f(i['packed_s_per_round'])} s/round; **ideal "
              f"{_f(i['ideal_s_per_round'])} s/round ({i['kind']})**. "
              f"Fastest: **{e.get('fastest', 'none')}**.", ""]
  return "\n".join(lines + ["## Reading", "", _reading(report), ""])


def run_bench(workload_names: Sequence[str], strategies=None, rounds: int = 5,
              quick: bool = False, max_rounds: str = "",
              time_budget_s: float = 0.0,
              command: str = "", out: str | None = None, log=print,
              **options) -> dict[str, Any]:
  """Runs the benchmark; returns the report (JSON-able).

  ``max_rounds``: caps like ``"w1=3,w3=1"``. ``time_budget_s``: shared
  equally by the workloads still to run; a strategy that would start past its
  workload's share is recorded as skipped. ``out``: rewrite
  ``<out>.{json,md}`` after every workload. ``options``: ``max_unroll``,
  ``full_warmup``, ``chunk_size`` of :func:`bench_workload`.
  """
  labels = list(strategies or (QUICK_STRATEGIES if quick else ALL_STRATEGIES))
  caps = {} if quick else {k: int(v) for k, v in (
      item.split("=") for item in max_rounds.split(",") if item)}
  end = time.time() + time_budget_s if time_budget_s else None
  report = {"machine": report_lib.machine_info(), "command": command,
            "quick": quick,
            "date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"), "strategies": labels, "options": options,
            "time_budget_s": time_budget_s, "workloads": {}}
  start = time.perf_counter()

  def checkpoint(name: str, entry: dict[str, Any]) -> None:
    report["workloads"][name] = entry
    report["total_seconds"] = time.perf_counter() - start
    if out:
      report_lib.write_outputs(report, out, render_markdown)

  for index, name in enumerate(workload_names):
    num_rounds = 2 if quick else min(rounds, caps.get(name, rounds))
    deadline = (None if end is None else time.time() + (
        end - time.time()) / (len(workload_names) - index))
    entry = bench_workload(
        workloads.build_workload(name, quick), labels, num_rounds,
        deadline=deadline, log=log,
        checkpoint=functools.partial(checkpoint, name), **options)
    checkpoint(name, entry)
  return report


def run_from_flags(command: str, out: str | None = None,
                   time_budget_s: float | None = None) -> dict[str, Any]:
  """:func:`run_bench` with the values of :func:`define_flags`' flags (some
  overridden)."""
  value = {name: holder.value for name, holder in _FLAGS.items()}
  return run_bench(
      value["workloads"], value["strategies"], value["rounds"],
      value["quick"], value["max_rounds"], value["time_budget_s"]
      if time_budget_s is None else time_budget_s,
      f"{command} {' '.join(sys.argv[1:])}".strip(), out,
      max_unroll=value["max_unroll_steps"],
      full_warmup=value["full_warmup"], chunk_size=value["chunk_size"])


def main(argv: Sequence[str]) -> None:
  """Command-line entry: the benchmark the flags describe."""
  cli.reject_extra_args(argv)
  out = _FLAGS["out"].value or os.path.join(
      "experiments", "results", f"bench_{jax.default_backend()}")
  run_from_flags("python -m experiments.bench.strategies", out)
  print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit())
