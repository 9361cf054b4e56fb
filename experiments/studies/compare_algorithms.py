r"""Every algorithm on one task at equal rounds: accuracy, fairness, bits, time.

  python -m experiments.studies.compare_algorithms [--seeds=0] [--rounds=100] \
      [--algorithms=fedavg,scaffold,...] \
      [--out_dir=experiments/results/compare_algorithms]

The task is ``configs/mnist_cnn_fedavg.py``: 5,000 real MNIST digits over 100
clients by Dirichlet(0.3) label skew, the FedAvg-EMNIST CNN, 10 clients a
round, 1 local epoch of batch 10. Each algorithm runs the same rounds with
the same seed (same cohorts) and its own documented settings
(:data:`ALGORITHMS`). After the last round every client fine-tunes the
global model for one epoch on its train split and is scored on its test
split (``personalization``), so the table shows the distribution over
clients (mean, 10th percentile, worst) as well as the pooled accuracy.
HypCluster is scored with each client's best cluster instead (it has no
single global model). Members live in ``DIR/members/<name>-s<seed>`` and are
skipped when finished (resumable); the report is ``DIR/compare_algorithms.
{json,md,png}``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from typing import Any, Sequence

from absl import app
from absl import flags

from experiments.lib import cli
from experiments.lib import paths
from experiments.studies import members as members_lib
from fedjax_lab.training import metrics_io

# name -> (what, config overrides: dotted key -> value).
ALGORITHMS: dict[str, tuple[str, dict[str, Any]]] = {
    "fedavg": ("FedAvg (McMahan et al. 2017), example-weighted", {}),
    "fedadam": ("FedAdam (Reddi et al. 2021), server Adam lr 0.003, eps 1e-3",
                {"server.optimizer": "adam", "server.learning_rate": 0.003,
                 "server.hparams": {"eps": 1e-3}}),
    "fedprox": ("FedProx (Li et al. 2020), mu 0.01",
                {"algorithm": "fedprox", "fedprox.mu": 0.01}),
    "scaffold": ("SCAFFOLD option II (Karimireddy et al. 2020), uniform",
                 {"algorithm": "scaffold", "weighting": "uniform"}),
    "scaffold_lr003": ("SCAFFOLD option II, uniform, client lr 0.03",
                       {"algorithm": "scaffold", "weighting": "uniform",
                        "client.learning_rate": 0.03}),
    "mime": ("Mime (Karimireddy et al. 2021), momentum 0.9, client lr 0.01",
             {"algorithm": "mime", "client.learning_rate": 0.01}),
    "mimelite": ("MimeLite, momentum 0.9, client lr 0.01",
                 {"algorithm": "mimelite", "client.learning_rate": 0.01}),
    "reptile": ("Reptile (Nichol et al. 2018), 4 inner steps, meta step 1, "
                "uniform", {"algorithm": "reptile", "weighting": "uniform",
                            "reptile.num_inner_steps": 4}),
    "agnostic": ("Agnostic FedAvg (Mohri et al. 2019), domain = majority "
                 "label", {"algorithm": "agnostic_fedavg"}),
    "hypcluster": ("HypCluster (Mansour et al. 2020), K=2, k-means++ init",
                   {"algorithm": "hypcluster", "hypcluster.init_clients": 10,
                    "personalization.enabled": False}),
    "fedavg_q8": ("FedAvg + 8-bit stochastic quantization",
                  {"compression.method": "quantize",
                   "compression.num_bits": 8}),
    "fedavg_q2h": ("FedAvg + 2-bit quantization, Hadamard rotation",
                   {"compression.method": "quantize",
                    "compression.num_bits": 2,
                    "compression.rotation": "hadamard"}),
    "fedavg_top1": ("FedAvg + top-1% with error feedback",
                    {"compression.method": "top_k",
                     "compression.fraction": 0.01}),
}
_FLAGS: dict[str, flags.FlagHolder] = {}


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (other
  experiments define flags of the same names in a shared test process)."""
  _FLAGS["out_dir"] = flags.DEFINE_string(
      "out_dir", "experiments/results/compare_algorithms", "Report folder.")
  _FLAGS["seeds"] = flags.DEFINE_list("seeds", ["0"], "Seeds (config.seed).")
  _FLAGS["rounds"] = flags.DEFINE_integer("rounds", 100, "Rounds per member.")
  _FLAGS["algorithms"] = flags.DEFINE_list(
      "algorithms", list(ALGORITHMS), "Algorithms to compare.")
  _FLAGS["tiny"] = flags.DEFINE_bool("tiny", False,
                                     "The configs' :tiny mode (tests).")


REPORT = "compare_algorithms"
DIVERGED_FILE = "diverged.json"  # marks a member whose loss became NaN


def member_config(name: str, seed: int, rounds: int, tiny: bool = False):
  """The task's config with ``name``'s overrides, seed and rounds."""
  paths.ensure_configs_importable()
  from configs import mnist_cnn_fedavg  # pylint: disable=g-import-not-at-top
  config = mnist_cnn_fedavg.get_config("tiny" if tiny else "")
  config.seed, config.num_rounds = seed, rounds
  config.eval_every = max(rounds // 10, 1)
  config.metrics_sinks = ""
  config.personalization.update({"enabled": True, "num_epochs": 1,
                                 "learning_rate": 0.1, "batch_size": 10})
  if tiny:  # fine-tune and score a few clients, not the whole population
    config.personalization.max_clients = 8
  for key, value in ALGORITHMS[name][1].items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  return config


def run_member(name: str, seed: int, rounds: int, out_dir: str,
               tiny: bool = False) -> dict[str, Any]:
  """Runs (or reads back) one member; returns its row of the report."""
  workdir = os.path.join(out_dir, "members", f"{name}-s{seed}")
  # Binary run artefacts (final state, checkpoints) stay out of the
  # committed results.
  run = members_lib.run_or_read_back(
      member_config(name, seed, rounds, tiny), workdir,
      diverged_file=DIVERGED_FILE,
      diverged_record=lambda message: {"message": message},
      keep_final_state=False, keep_checkpoints=False,
      announce=f"[compare] running {name} seed {seed}")
  records = metrics_io.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  if run.diverged:
    return {"name": name, "seed": seed, "what": ALGORITHMS[name][0],
            "algorithm": name, "rounds": records[-1]["round"],
            "accuracy": None, "diverged_at": records[-1]["round"],
            "seconds_per_round": statistics.fmean(
                r["seconds"] for r in records), "bits_uploaded": None,
            "curve": [(r["round"], r["eval_accuracy"]) for r in records
                      if "eval_accuracy" in r]}
  summary = run.summary
  curve = [(r["round"], r["eval_accuracy"]) for r in records
           if "eval_accuracy" in r]
  mean = lambda key: statistics.fmean(r[key] for r in records if key in r)
  row = {"name": name, "seed": seed, "what": ALGORITHMS[name][0],
         "algorithm": summary["algorithm"], "rounds": summary["rounds"],
         "accuracy": summary["final_eval_accuracy"],
         "loss": summary["final_eval_loss"],
         "seconds_per_round": mean("seconds"),
         "bits_uploaded": (mean("bits_uploaded") if any(
             "bits_uploaded" in r for r in records) else None),
         "curve": curve}
  block = summary.get("personalization")
  if block:
    for prefix in ("global", "personalized"):
      for stat in ("mean_client_uniform", "p10", "worst"):
        row[f"{prefix}_{stat}"] = block[f"{prefix}_accuracy_{stat}"]
  return row


def _pct(value) -> str:
  return "—" if value is None else f"{100 * value:.1f}"


def markdown(rows: list[dict[str, Any]], command: str) -> str:
  """The comparison table (one row per algorithm and seed)."""
  lines = [
      "# Algorithms compared on MNIST-Dirichlet(0.3), CNN, equal rounds", "",
      f"`{command}`", "",
      "`configs/mnist_cnn_fedavg.py`'s task (100 clients, 10 a round, 1 "
      "local epoch of batch 10, client lr 0.1 unless noted); every member "
      "runs the same rounds and cohorts. Test accuracy pools all test "
      "examples; the per-client columns are over the 100 clients' own test "
      "splits, for the global model and after one epoch of local "
      "fine-tuning (SGD lr 0.1). HypCluster scores each client with its "
      "best cluster (no fine-tuning). Bits: uploaded per client per round "
      "(float32 = 32 x 1,199,882 parameters).", "",
      "| algorithm | settings | test acc % | per-client mean % | p10 % | "
      "worst % | fine-tuned mean % | fine-tuned p10 % | fine-tuned worst % | "
      "Mbit uploaded | s/round |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in sorted(rows, key=lambda r: -(r["accuracy"] or -1)):
    bits = (row["bits_uploaded"] / 1e6 if row["bits_uploaded"] is not None
            else None)
    if row.get("diverged_at"):
      lines.append(f"| {row['name']} (s{row['seed']}) | {row['what']} | "
                   f"diverged (NaN) at round {row['diverged_at']} | | | | | "
                   f"| | | {row['seconds_per_round']:.3f} |")
      continue
    lines.append(
        f"| {row['name']} (s{row['seed']}) | {row['what']} | "
        f"{_pct(row['accuracy'])} | {_pct(row.get('global_mean_client_uniform'))}"
        f" | {_pct(row.get('global_p10'))} | {_pct(row.get('global_worst'))} | "
        f"{_pct(row.get('personalized_mean_client_uniform'))} | "
        f"{_pct(row.get('personalized_p10'))} | "
        f"{_pct(row.get('personalized_worst'))} | "
        f"{'38.4' if bits is None else f'{bits:.2f}'} | "
        f"{row['seconds_per_round']:.3f} |")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: str) -> None:
  """Test accuracy vs rounds, one line per member."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(8, 5))
  ordered = [r for r in sorted(rows, key=lambda r: -(r["accuracy"] or -1))
             if r["curve"]]
  for i, row in enumerate(ordered):
    rounds, accuracy = zip(*row["curve"])
    # Ten colours, then the next line style: every member stays distinct.
    ax.plot(rounds, [100 * a for a in accuracy], marker=".",
            linestyle=("-", "--", ":")[(i // 10) % 3],
            label=f"{row['name']} s{row['seed']}")
  ax.set_xlabel("round")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("MNIST-Dirichlet(0.3), CNN: algorithms at equal rounds")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def run(names: Sequence[str], seeds: Sequence[int], rounds: int, out_dir: str,
        command: str, tiny: bool = False) -> list[dict[str, Any]]:
  """Runs every (algorithm, seed) member and writes the report."""
  unknown = [n for n in names if n not in ALGORITHMS]
  if unknown:
    raise ValueError(f"unknown algorithms {unknown}; choose from "
                     f"{list(ALGORITHMS)}.")
  os.makedirs(out_dir, exist_ok=True)
  rows = [run_member(name, seed, rounds, out_dir, tiny)
          for seed in seeds for name in names]
  with open(os.path.join(out_dir, f"{REPORT}.json"), "w") as f:
    json.dump({"command": command, "rows": rows}, f, indent=1)
  with open(os.path.join(out_dir, f"{REPORT}.md"), "w") as f:
    f.write(markdown(rows, command))
  plot(rows, os.path.join(out_dir, f"{REPORT}.png"))
  return rows


def main(argv: Sequence[str]) -> None:
  """Command-line entry: the comparison the flags describe."""
  cli.reject_extra_args(argv)
  cli.quiet_library_logs()
  command = " ".join(["python -m experiments.studies.compare_algorithms",
                      *sys.argv[1:]])
  values = {name: holder.value for name, holder in _FLAGS.items()}
  try:
    run(values["algorithms"], [int(s) for s in values["seeds"]],
        values["rounds"], values["out_dir"], command, values["tiny"])
  except ValueError as e:
    cli.fail(str(e))
  print(f"wrote {values['out_dir']}/{REPORT}.md")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
