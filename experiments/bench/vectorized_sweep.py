r"""Sweep members as one compiled program vs the same members run one by one.

  python -m experiments.bench.vectorized_sweep [--workloads=w2,w1] \
      [--members=1,4,16] [--w2_rounds=20] [--w1_rounds=5] \
      [--out=experiments/results/vectorized_sweep_<backend>]

Workloads (whole runs through the public API, evaluation at the end):
* ``w2``: ``configs/synthetic_logreg_fedavg.py`` (logistic regression on
  FedProx's Synthetic(1,1), cohort 10 of 30, 20 local epochs, batch 10);
* ``w1``: ``configs/mnist_cnn_fedavg.py`` (the CNN on MNIST digits, cohort 10
  of 100, 1 epoch, batch 10).

For each workload and K, two sweeps of K members:
* ``lr``: K client learning rates (geometric, x0.5 .. x2 the config's); the
  members share every cohort (the usual learning-rate sweep);
* ``seeds`` (K > 1): K seeds at the config's learning rate; each member
  samples its own cohorts and data order (per-member cohorts).

Each sweep runs three ways: ``processes`` (each member as its own
``python -m experiments.run`` process, one after another: what
``experiments.sweep --parallel=1`` runs), ``sequential`` (``api.simulate`` of
each member in turn in this process: K compilations, no process start) and
``vectorized`` (``api.simulate_sweep``: one program). Times are total wall
seconds from config to summary, compilation included; ``throughput`` is
sequential / vectorized and ``vs_processes`` processes / vectorized
(member-runs per second, relative). ``max_rel_diff`` compares
each member's final eval loss between the two (they are the same runs).
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax

from experiments.lib import paths

paths.ensure_configs_importable()

_WORKLOADS = flags.DEFINE_list("workloads", ["w2", "w1"], "w2 and/or w1.")
_MEMBERS = flags.DEFINE_list("members", ["1", "4", "16"], "Values of K.")
_W2_ROUNDS = flags.DEFINE_integer("w2_rounds", 20, "Rounds of a w2 run.")
_W1_ROUNDS = flags.DEFINE_integer("w1_rounds", 5, "Rounds of a w1 run.")
_PROCESSES = flags.DEFINE_bool(
    "processes", True, "Also time the members as separate processes.")
_UPDATE = flags.DEFINE_bool(
    "update", False, "Replace only the rows this invocation measures in an "
    "existing OUT.json (the others and their command are kept).")
_OUT = flags.DEFINE_string("out", None, "Results path without extension "
                           "(default experiments/results/"
                           "vectorized_sweep_<backend>).")

_CONFIGS = {"w2": "synthetic_logreg_fedavg", "w1": "mnist_cnn_fedavg"}
_WORKLOAD_ORDER = ("w1", "w2")  # report order: w2 first (sorted by -index)
_TITLES = {"w2": "W2 logistic regression, Synthetic(1,1)",
           "w1": "W1 CNN, MNIST digits"}


def member_configs(workload: str, num_members: int, kind: str,
                   rounds: int) -> list[Any]:
  """The K members' configs of one sweep (see the module docstring)."""
  module = __import__(f"configs.{_CONFIGS[workload]}", fromlist=["x"])
  configs = []
  for k in range(num_members):
    config = module.get_config()
    config.num_rounds = rounds
    config.eval_every = 0
    config.metrics_sinks = ""
    if kind == "lr":
      factor = 2.0 ** (2 * k / max(num_members - 1, 1) - 1)
      config.client.learning_rate *= factor if num_members > 1 else 1.0
    else:
      config.seed = k
    configs.append(config)
  return configs


def _member_flags(workload: str, config: Any) -> list[str]:
  """``experiments.run`` flags reproducing a member's config."""
  return [f"--config={paths.config_file(_CONFIGS[workload] + '.py')}",
          f"--config.num_rounds={config.num_rounds}", "--config.eval_every=0",
          "--config.metrics_sinks=", f"--config.seed={config.seed}",
          f"--config.client.learning_rate={config.client.learning_rate!r}",
          "--noprogress"]


def time_processes(workload: str, configs: Sequence[Any],
                   root: str) -> float:
  """Wall seconds of the members as ``experiments.run`` processes, in turn."""
  start = time.perf_counter()
  for k, config in enumerate(configs):
    subprocess.run([sys.executable, "-m", "experiments.run",
                    f"--workdir={os.path.join(root, f'p{k}')}",
                    *_member_flags(workload, config)],
                   cwd=paths.REPO_ROOT, check=True, capture_output=True)
  return time.perf_counter() - start


def time_sweep(configs: Sequence[Any], work_root: str,
               workload: str = "") -> dict[str, Any]:
  """Processes (when asked), sequential, then vectorized; wall seconds and
  the members' results."""
  from fedjax_lab.training import api  # pylint: disable=g-import-not-at-top
  root = tempfile.mkdtemp(dir=work_root)
  processes = (time_processes(workload, configs, root)
               if workload and _PROCESSES.value else None)
  start = time.perf_counter()
  apart = [api.simulate(config, workdir=os.path.join(root, f"s{k}"))
           for k, config in enumerate(configs)]
  sequential = time.perf_counter() - start
  start = time.perf_counter()
  together = api.simulate_sweep(configs, workdirs=[
      os.path.join(root, f"v{k}") for k in range(len(configs))])
  vectorized = time.perf_counter() - start
  shutil.rmtree(root, ignore_errors=True)
  losses = [(t.summary["final_eval_loss"], a.summary["final_eval_loss"])
            for t, a in zip(together, apart)]
  return {
      "sequential_seconds": sequential, "vectorized_seconds": vectorized,
      "throughput": sequential / vectorized,
      "processes_seconds": processes,
      "vs_processes": processes / vectorized if processes else None,
      "max_rel_diff": max(abs(t - a) / abs(a) for t, a in losses),
      "final_eval_accuracy": [t.summary["final_eval_accuracy"]
                              for t in together],
      "compilations_vectorized": together[0].summary["compilations"],
      "compilations_sequential": sum(a.summary["compilations"]
                                     for a in apart)}


def _seconds(value: float | None) -> str:
  return "-" if value is None else f"{value:.1f}"


def _ratio(value: float | None) -> str:
  return "-" if value is None else f"{value:.2f}x"


def write_report(rows: Sequence[dict[str, Any]], out: str,
                 meta: dict[str, Any]) -> None:
  """``out.json`` (everything) and ``out.md`` (the table)."""
  with open(out + ".json", "w") as f:
    json.dump({"meta": meta, "rows": list(rows)}, f, indent=1)
  lines = [
      "# Sweep members as one program vs one by one",
      "",
      f"Command: `{meta['command']}`" + "".join(
          f"; rows re-measured on {u['date']} with `{u['command']}`"
          for u in meta.get("updates", [])),
      "",
      f"Machine: {meta['devices']}, {meta['cpus']} CPUs; {meta['date']}. "
      "Total wall seconds from config to summary (compilation, evaluation "
      "and checkpoints included) of K member runs: as K `experiments.run` "
      "processes one after another (what `experiments.sweep --parallel=1` "
      "runs), one by one in one process (`api.simulate`), and as one program "
      "(`api.simulate_sweep`). Throughput = sequential / vectorized; vs "
      "processes = processes / vectorized. `lr`: client learning rates "
      "(shared cohorts); `seeds`: per-member cohorts and data order.",
      "",
      "| workload | sweep | K | rounds | processes s | sequential s | "
      "vectorized s | throughput | vs processes | compilations (seq / vec) "
      "| max rel. diff |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(
        f"| {_TITLES[r['workload']]} | {r['kind']} | {r['members']} | "
        f"{r['rounds']} | {_seconds(r.get('processes_seconds'))} | "
        f"{r['sequential_seconds']:.1f} | "
        f"{r['vectorized_seconds']:.1f} | {r['throughput']:.2f}x | "
        f"{_ratio(r.get('vs_processes'))} | "
        f"{r['compilations_sequential']} / {r['compilations_vectorized']} | "
        f"{r['max_rel_diff']:.1e} |")
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")


def main(argv: Sequence[str]) -> None:
  del argv
  out = _OUT.value or os.path.join(
      paths.REPO_ROOT, "experiments", "results",
      f"vectorized_sweep_{jax.default_backend()}")
  command = "python -m experiments.bench.vectorized_sweep " + " ".join(
      sys.argv[1:])
  previous = None
  if _UPDATE.value and os.path.exists(out + ".json"):
    with open(out + ".json") as f:
      previous = json.load(f)
  work_root = tempfile.mkdtemp(prefix="vectorized_bench-")
  rows = []
  from fedjax_lab.training import api  # pylint: disable=g-import-not-at-top
  for workload in _WORKLOADS.value:
    rounds = _W2_ROUNDS.value if workload == "w2" else _W1_ROUNDS.value
    # Warm-up (not timed): imports, the dataset's first load, JAX's start.
    api.simulate(member_configs(workload, 1, "lr", 1)[0])
    for num_members in map(int, _MEMBERS.value):
      for kind in ("lr", "seeds") if num_members > 1 else ("lr",):
        row = {"workload": workload, "kind": kind, "members": num_members,
               "rounds": rounds, **time_sweep(member_configs(
                   workload, num_members, kind, rounds), work_root,
                                              workload)}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items()
                          if k != "final_eval_accuracy"}), file=sys.stderr,
              flush=True)
  shutil.rmtree(work_root, ignore_errors=True)
  from fedjax_lab.training import setup  # pylint: disable=g-import-not-at-top
  meta = {"command": command, "devices": setup.describe_devices(),
          "cpus": os.cpu_count(), "date": datetime.date.today().isoformat(),
          "jax": jax.__version__}
  if previous is not None:
    measured = {(r["workload"], r["kind"], r["members"]) for r in rows}
    kept = [r for r in previous["rows"]
            if (r["workload"], r["kind"], r["members"]) not in measured]
    rows = sorted(kept + rows, key=lambda r: (
        -_WORKLOAD_ORDER.index(r["workload"]), r["members"], r["kind"]))
    meta = {**previous["meta"], "updates": previous["meta"].get(
        "updates", []) + [{"command": command, "date": meta["date"]}]}
  write_report(rows, out, meta)
  print(json.dumps({"out": out + ".md", "rows": len(rows)}))


if __name__ == "__main__":
  app.run(main)
