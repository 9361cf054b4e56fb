r"""One-shot accelerator check: strategy agreement, CPU agreement, benchmark.

  python -m experiments.bench.device_check [--out_dir=$OUT] [--rounds=3] \
      [--quick]

1. Correctness on the default device: a small CNN round and a small char-LSTM
   round (uneven clients, padded steps and clients) give the same server
   params under every strategy as under vmap+scan (max abs diff < 1e-4), and
   vmap+scan on ``jax.devices("cpu")`` agrees to 1e-3. Matmuls run at
   ``highest`` precision here so TF32 does not blur the comparison.
2. The benchmark of ``experiments/bench/strategies.py`` (its flags apply:
   ``--workloads``, ``--rounds``, ``--max_rounds``, ``--quick``, ...),
   written to
   ``<out_dir>/bench_<backend>.{json,md}``.
3. A final JSON line: pass/fail per check and the fastest strategy per
   workload.

Nothing is downloaded (the datasets are generated or ship with packages).
``--quick`` runs everything small enough for a CPU test.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
from typing import Sequence

from absl import app
from absl import flags
import jax
import numpy as np
import optax

from experiments.bench import strategies
from experiments.bench import workloads
from experiments.lib import cli
from fedjax_lab import models
from fedjax_lab.algorithms import fedavg
from fedjax_lab.data.cohort import make_cohort
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy

# The command-line flags, once define_flags() ran: name -> FlagHolder.
_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines this check's flags and the strategy benchmark's (only when run
  as a program)."""
  strategies.define_flags(flag_values)
  _FLAGS["out_dir"] = flags.DEFINE_string(
      "out_dir", "experiments/results", "Folder for bench_<backend>."
      "{json,md}.", flag_values=flag_values)
  _FLAGS["skip_bench"] = flags.DEFINE_bool(
      "skip_bench", False, "Only the correctness checks.",
      flag_values=flag_values)
  _FLAGS["max_seconds"] = flags.DEFINE_float(
      "max_seconds", 225.0, "Wall-time budget for the whole check (keep it "
      "under the caller's timeout): the bench gets what the correctness "
      "checks leave, minus a margin, and skips strategies once it is spent. "
      "0: no limit.", flag_values=flag_values)


_MARGIN_S = 15.0
_STRATEGY_TOL = 1e-4
_CPU_TOL = 1e-3
CHECK_STRATEGIES = (
    Strategy("vmap", "scan"), Strategy("vmap", "unroll"),
    Strategy("vmap", "host"), Strategy("map", "scan"),
    Strategy("map", "unroll"), Strategy("chunked", "scan", chunk_size=2),
    Strategy("chunked", "unroll", chunk_size=3))


def _small_store(kind: str, num_clients: int = 6) -> ClientStore:
  """Seeded clients of 3..17 examples: images (``cnn``) or token windows."""
  rng = np.random.default_rng(1)
  sizes = rng.integers(3, 18, num_clients)
  total = int(sizes.sum())
  if kind == "cnn":
    features = {"x": rng.random((total, 28, 28, 1), dtype=np.float32),
                "y": rng.integers(0, 10, total).astype(np.int32)}
  else:
    tokens = rng.integers(1, 90, (total, 21)).astype(np.int32)
    features = {"x": tokens[:, :-1], "y": tokens[:, 1:]}
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return ClientStore(np.arange(num_clients).astype(str), offsets, features)


def _small_model(kind: str) -> models.Model:
  if kind == "cnn":
    return models.get_model("cnn", input_shape=(28, 28, 1), num_classes=10)
  return models.get_model("char_lstm", input_shape=(20,), num_classes=90,
                          hidden_size=32)


def _round_params(algorithm, params, cohort, strategy, device=None):
  """Server params after two rounds with ``strategy`` (on ``device``)."""
  fn = round_lib.build_round(algorithm, strategy, donate=False)
  put = (lambda t: jax.device_put(t, device)) if device else jax.device_put
  state = put(algorithm.server_init(params))
  cohort, rng = put(cohort), put(jax.random.key(3))
  for _ in range(2):
    state, _, _ = fn(state, cohort, (), rng)
  return jax.device_get(state.params)


def check_strategies(kind: str, log=print) -> dict:
  """Every strategy vs vmap+scan on the default device, and vs the CPU."""
  model = _small_model(kind)
  # Server SGD: an adaptive server optimizer would amplify float noise in
  # near-zero coordinates and hide real disagreements behind it.
  algorithm = fedavg.fedavg(model, optax.sgd(0.1), 1.0)
  params = jax.device_get(model.init(jax.random.key(0)))
  cohort = round_lib.cohort_arrays(make_cohort(
      _small_store(kind), np.array([0, 2, 3, 5]), batch_size=4, seed=0,
      round_index=0, cohort_buckets=[6]))  # 2 padded clients, ragged steps
  result = {"strategy_diffs": {}, "passed": True}
  with jax.default_matmul_precision("highest"):
    reference = _round_params(algorithm, params, cohort, CHECK_STRATEGIES[0])
    for strategy in CHECK_STRATEGIES[1:]:
      diff = workloads.max_abs_diff(
          _round_params(algorithm, params, cohort, strategy), reference)
      result["strategy_diffs"][strategy.label] = diff
      result["passed"] &= diff < _STRATEGY_TOL
      log(f"[{kind}] {strategy.label} vs vmap+scan: max abs diff {diff:.2e}")
    cpus = jax.devices("cpu")
    if cpus:
      diff = workloads.max_abs_diff(
          _round_params(algorithm, params, cohort, CHECK_STRATEGIES[0],
                        cpus[0]), reference)
      result["cpu_diff"] = diff
      result["passed"] &= diff < _CPU_TOL
      log(f"[{kind}] {jax.default_backend()} vs cpu: max abs diff {diff:.2e}")
  result["passed"] = bool(result["passed"])
  return result


class Interrupted(BaseException):
  """SIGTERM (e.g. from ``timeout``): stop, but still print the summary.

  A ``BaseException`` so that the ``except Exception`` around each check does
  not swallow it.
  """


def _raise_interrupted(signum, frame):
  del frame
  raise Interrupted(f"signal {signum}")


def main(argv: Sequence[str]) -> None:
  """Command-line entry: the checks, the bench, then the summary line."""
  cli.reject_extra_args(argv)
  start = time.perf_counter()
  summary = {"backend": jax.default_backend(),
             "device": jax.devices()[0].device_kind, "checks": {}}
  signal.signal(signal.SIGTERM, _raise_interrupted)
  try:
    _run_checks(summary, start)
  except Interrupted as e:
    summary["interrupted"] = str(e)
    files = summary.get("bench", {}).get("files", [])
    if files and os.path.exists(files[0]):  # what the bench had written
      with open(files[0]) as f:
        summary["bench"].update(_bench_summary(json.load(f)))
  summary["checks_passed"] = len(summary["checks"]) == 2 and all(
      c["passed"] for c in summary["checks"].values())
  summary["passed"] = (summary["checks_passed"] and "interrupted" not in
                       summary and "error" not in summary.get("bench", {}))
  summary["seconds"] = time.perf_counter() - start
  print(json.dumps(summary), flush=True)
  if "interrupted" in summary:
    # XLA threads may still be running: skip interpreter teardown (which can
    # crash then) so the summary stays the last line.
    sys.stderr.flush()
    os._exit(1)  # pylint: disable=protected-access
  if not summary["passed"]:
    sys.exit(1)


def _bench_summary(report: dict) -> dict:
  """Fastest strategy (and its ratio to ideal) per workload, time skips."""
  workloads = report["workloads"]
  return {"fastest": {name: [e.get("fastest"), e.get("fastest_ratio_to_ideal")]
                      for name, e in workloads.items()},
          "skipped_for_time": sum(r["skipped"] == "time budget exhausted"
                                  for e in workloads.values()
                                  for r in e["results"])}


def _run_checks(summary: dict, start: float) -> None:
  """Correctness checks, then the bench; fills ``summary`` as it goes."""
  for kind in ("cnn", "lstm"):
    try:
      summary["checks"][kind] = check_strategies(kind)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      summary["checks"][kind] = {"passed": False, "error": repr(e)}
  max_seconds = _FLAGS["max_seconds"].value
  left = (max_seconds - (time.perf_counter() - start) - _MARGIN_S
          if max_seconds else 0.0)
  if _FLAGS["skip_bench"].value or (max_seconds and left <= 0):
    summary["bench"] = {"skipped": "--skip_bench or no time left"}
  else:
    out = f"{_FLAGS['out_dir'].value}/bench_{jax.default_backend()}"
    summary["bench"] = {"files": [out + ".json", out + ".md"]}
    try:
      report = strategies.run_from_flags(
          "python -m experiments.bench.device_check", out, time_budget_s=left)
      summary["bench"].update(_bench_summary(report))
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      summary["bench"] = {"error": repr(e)}


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit())
