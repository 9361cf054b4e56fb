r"""Round time of every federated algorithm, as a ratio to FedAvg's.

  python -m experiments.bench.algorithms [--workloads=w1,w2] [--rounds=5] \
      [--repeats=5] [--algorithms=...] [--quick] \
      [--out=experiments/results/bench_algorithms_<backend>]

For the workloads of ``experiments/bench/workloads.py`` (W1 EMNIST-sized CNN,
cohort 50; W2 logistic regression on Synthetic(1,1), cohort 10, 20 local
epochs), with the backend's default strategy for the model family, the same
cohorts are run by each algorithm of ``fedjax_lab.algorithms`` at the
workload's client learning rate. Stateful algorithms (SCAFFOLD's control
variates, top-k error feedback, agnostic FL's domain ids) gather and scatter
their per-client state exactly as the runner does, and that host work is in the
"full" time. Mime runs two passes over the cohort (its full-batch gradient
first); HypCluster (K=2) trains every cluster model on every client; Reptile
here uses the same cohorts as FedAvg (its fixed inner-step count is a cohort
setting of the runner, not a cost of the algorithm).

Timing is ``experiments.bench.workloads``' (as for the privacy benchmark): a
warm-up over every padded shape, then ``--repeats`` passes in which every
variant restarts from a fresh state and the rounds run interleaved (round r of
every variant, in a rotated order, before round r + 1); a variant's s/round is
the median over rounds of the best of its repeats, and the ratio divides by
FedAvg's, timed in the same process. ``fedavg_again`` is FedAvg timed a second
time (an A/A control: its ratio shows the timing noise).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import sys
from typing import Any, Callable, Sequence

from absl import app
from absl import flags
import jax
import numpy as np
import optax

from experiments.bench import report as report_lib
from experiments.bench import workloads
from experiments.bench.workloads import Workload
from experiments.lib import cli
from fedjax_lab.algorithms import agnostic
from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import compression
from fedjax_lab.algorithms import fedavg
from fedjax_lab.algorithms import fedprox
from fedjax_lab.algorithms import hypcluster
from fedjax_lab.algorithms import mime
from fedjax_lab.algorithms import reptile
from fedjax_lab.algorithms import scaffold
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import default_strategy

# The command-line flags, once define_flags() ran: name -> FlagHolder.
_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the benchmark's flags (only when run as a program)."""
  _FLAGS.update(workloads.define_common_flags(flag_values, ("w1", "w2")))
  _FLAGS["repeats"] = flags.DEFINE_integer(
      "repeats", 5, "Timed passes per variant (interleaved).",
      flag_values=flag_values)
  _FLAGS["algorithms"] = flags.DEFINE_list(
      "algorithms", None, "Algorithms to time (FedAvg is always added); "
      "default: all.", flag_values=flag_values)


# (workload, model) -> (algorithm, stacked initial client states or None).
Builder = Callable[[Workload, Any],
                   tuple[base.FederatedAlgorithm, Any]]


@dataclasses.dataclass(frozen=True)
class AlgorithmVariant:
  """One algorithm to time: how to build it and what it is."""

  name: str
  kind: str  # "baseline" | "algorithm" | "control"
  description: str
  build: Builder


def _sgd(w: Workload) -> optax.GradientTransformation:
  return optax.sgd(w.client_lr)


def _stateless(make: Callable[[Workload, Any], base.FederatedAlgorithm]
               ) -> Builder:
  return lambda w, model: (make(w, model), None)


def _momentum() -> optax.GradientTransformation:
  return optax.sgd(1.0, momentum=0.9)


_NUM_DOMAINS = 4


def _agnostic(w: Workload, model):
  algorithm = agnostic.agnostic_fedavg(model, _sgd(w), optax.sgd(1.0),
                                       _NUM_DOMAINS, 0.1)
  domains = np.arange(w.store.num_clients) % _NUM_DOMAINS
  return algorithm, agnostic.client_domain_states(domains, _NUM_DOMAINS)


def _hypcluster(w: Workload, model):
  algorithm = hypcluster.hypcluster(model, _sgd(w), optax.sgd(1.0), 2)
  clusters = hypcluster.random_init(model, 2, jax.random.key(0))
  return dataclasses.replace(
      algorithm, server_init=lambda params: algorithm.server_init(
          clusters)), None


def _compressed_fedavg(w, m, compressor):
  """FedAvg whose aggregation chain compresses every update first."""
  return base.pair_client_states(fedavg.fedavg(
      m, _sgd(w), aggregator=base.chain(compression.compress(compressor),
                                        base.weighted_mean())))


VARIANTS: list[AlgorithmVariant] = [
    AlgorithmVariant("fedavg", "baseline", "FedAvg (client SGD, server SGD 1)",
                     _stateless(lambda w, m: fedavg.fedavg(m, _sgd(w)))),
    AlgorithmVariant("fedadam", "algorithm", "FedAdam (server Adam, eps 1e-3)",
                     _stateless(lambda w, m: fedavg.fedopt(
                         m, _sgd(w), optax.adam(1e-2, eps=1e-3)))),
    AlgorithmVariant("fedsgd", "algorithm", "FedSGD (one full-batch gradient "
                     "per client)",
                     _stateless(lambda w, m: fedavg.fedsgd(m, optax.sgd(
                         w.client_lr)))),
    AlgorithmVariant("fedprox", "algorithm", "FedProx mu=0.01 (proximal "
                     "gradient every step)",
                     _stateless(lambda w, m: fedprox.fedprox(
                         m, _sgd(w), optax.sgd(1.0), mu=0.01))),
    AlgorithmVariant("fedprox_stragglers", "algorithm", "FedProx mu=0.01, "
                     "50% stragglers (reservoir snapshot of the local model)",
                     _stateless(lambda w, m: fedprox.fedprox(
                         m, _sgd(w), optax.sgd(1.0), mu=0.01,
                         straggler_fraction=0.5))),
    AlgorithmVariant("scaffold", "algorithm", "SCAFFOLD option II (control "
                     "variates per client, gathered and scattered)",
                     lambda w, m: (scaffold.scaffold(
                         m, w.client_lr, optax.sgd(1.0),
                         num_clients=w.store.num_clients), None)),
    AlgorithmVariant("mime", "algorithm", "Mime, momentum 0.9 (a full-batch "
                     "gradient pass over the cohort, then corrected steps)",
                     _stateless(lambda w, m: mime.mime(
                         m, _momentum(), w.client_lr))),
    AlgorithmVariant("mimelite", "algorithm", "MimeLite, momentum 0.9 "
                     "(gradient at the server model in the same pass)",
                     _stateless(lambda w, m: mime.mimelite(
                         m, _momentum(), w.client_lr))),
    AlgorithmVariant("reptile", "algorithm", "Reptile, meta step 0.5 (the "
                     "same cohorts; inner steps capped at the workload's)",
                     _stateless(lambda w, m: reptile.reptile(
                         m, _sgd(w), None, meta_step_size=0.5))),
    AlgorithmVariant("agnostic", "algorithm", "Agnostic FedAvg, 4 domains "
                     "(domain id per client; domain losses every step)",
                     _agnostic),
    AlgorithmVariant("hypcluster2", "algorithm", "HypCluster, K=2 (every "
                     "client trains both cluster models)",
                     _hypcluster),
    AlgorithmVariant("fedavg_q8", "algorithm", "FedAvg + 8-bit stochastic "
                     "quantization",
                     _stateless(lambda w, m: _compressed_fedavg(
                         w, m, compression.stochastic_quantization(8)))),
    AlgorithmVariant("fedavg_q2_hadamard", "algorithm", "FedAvg + 2-bit "
                     "quantization after a randomized Hadamard rotation",
                     _stateless(lambda w, m: _compressed_fedavg(
                         w, m, compression.stochastic_quantization(
                             2, rotation="hadamard")))),
    AlgorithmVariant("fedavg_topk", "algorithm", "FedAvg + top-1% with "
                     "error feedback (residual per client)",
                     _stateless(lambda w, m: _compressed_fedavg(
                         w, m, compression.top_k(fraction=0.01)))),
    AlgorithmVariant("fedavg_again", "control", "A/A control: FedAvg timed "
                     "again as a separate variant",
                     _stateless(lambda w, m: fedavg.fedavg(m, _sgd(w)))),
]


def select(names: list[str] | None) -> list[AlgorithmVariant]:
  """The variants to time, FedAvg first, in ``VARIANTS`` order."""
  known = {v.name: v for v in VARIANTS}
  unknown = [n for n in names or () if n not in known]
  if unknown:
    raise ValueError(f"unknown algorithms {unknown}; choose from "
                     f"{list(known)}.")
  return [v for v in VARIANTS
          if v.kind == "baseline" or names is None or v.name in names]


def bench_workload(w: Workload, variants: list[AlgorithmVariant],
                   num_rounds: int, repeats: int, log=print) -> dict[str, Any]:
  """Times every variant on ``w`` (interleaved); the report's entry."""
  rounds = list(range(num_rounds))
  shapes = [w.cohort(r).padded_shape for r in rounds]
  warmup = [shapes.index(s) for s in dict.fromkeys(shapes)]
  strategy = default_strategy(w.family)
  model = w.make_model()
  runs, rows = {}, {}
  for v in variants:
    algorithm, client_states = v.build(w, model)
    fn = round_lib.build_round(algorithm, strategy, donate=False)
    rows[v.name] = workloads.new_row(
        v.name, v.kind, v.description, repeats, algorithm=algorithm.name,
        **workloads.warm_up(w, model, algorithm, fn, client_states, warmup))
    runs[v.name] = (algorithm, fn, client_states)
    log(f"[{w.name}] {v.name}: warm-up {rows[v.name]['warmup_s']:.1f} s")
  workloads.time_interleaved(w, model, runs, rows, rounds, repeats)
  for row in rows.values():
    log(f"[{w.name}] {row['variant']}: {row['median_round_s']:.4f} s/round, "
        f"ratio to FedAvg {row['ratio_to_baseline']:.3f}")
  return {"title": w.title, "data": w.data_note, "strategy": strategy.label,
          "settings": {"cohort_size": w.cohort_size,
                       "batch_size": w.batch_size,
                       "num_epochs": w.num_epochs, "client_lr": w.client_lr,
                       "timed_rounds": rounds, "repeats": repeats},
          "results": list(rows.values())}


def render_markdown(report: dict[str, Any]) -> str:
  """The report as a Markdown table per workload (ratios to FedAvg)."""
  lines = ["# Round time per algorithm, relative to FedAvg", "",
           f"`{report['command']}` — {report['date']}, "
           f"{report['machine']['cpu_model']}, "
           f"{report['machine']['cpu_cores']} cores, "
           f"{report['machine']['backend']}.",
           "", "s/round: median over rounds of the best of the interleaved "
           "repeats (full = cohort batching + state gather/scatter + "
           "compiled round). `fedavg_again` is an A/A control.", ""]
  for name, entry in report["workloads"].items():
    lines += [f"## {entry['title']} ({entry['strategy']})", "",
              "| algorithm | what | s/round (full) | ratio to FedAvg | "
              "round_fn s | round_fn ratio |", "|---|---|---|---|---|---|"]
    for row in entry["results"]:
      lines.append(
          f"| {row['variant']} | {row['description']} | "
          f"{row['median_round_s']:.4f} | {row['ratio_to_baseline']:.3f} | "
          f"{row['median_round_fn_s']:.4f} | "
          f"{row['round_fn_ratio_to_baseline']:.3f} |")
    lines.append("")
  return "\n".join(lines)


def run_bench(workload_names: Sequence[str], rounds: int = 5,
              repeats: int = 3,
              quick: bool = False, algorithms: list[str] | None = None,
              command: str = "", out: str | None = None,
              log=print) -> dict[str, Any]:
  """Runs the benchmark; returns the report (and writes ``out``.{json,md})."""
  chosen = select(algorithms)
  if quick:
    rounds, repeats = min(rounds, 2), 1
  report = {"machine": report_lib.machine_info(), "command": command,
            "quick": quick,
            "date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"),
            "variants": [v.name for v in chosen], "workloads": {}}
  for name in workload_names:
    report["workloads"][name] = bench_workload(
        workloads.build_workload(name, quick), chosen, rounds, repeats, log)
    if out:
      report_lib.write_outputs(report, out, render_markdown)
  return report


def main(argv: Sequence[str]) -> None:
  """Command-line entry: the benchmark the flags describe."""
  cli.reject_extra_args(argv)
  value = {name: holder.value for name, holder in _FLAGS.items()}
  out = value["out"] or os.path.join(
      "experiments", "results", f"bench_algorithms_{jax.default_backend()}")
  run_bench(value["workloads"], value["rounds"], value["repeats"],
            value["quick"], value["algorithms"],
            f"python -m experiments.bench.algorithms {' '.join(sys.argv[1:])}"
            .strip(), out, functools.partial(print, flush=True))
  print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit())
