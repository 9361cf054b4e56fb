r"""FedProx vs FedAvg on Synthetic(alpha, beta) with stragglers.

  python -m experiments.studies.fedprox_synthetic [--seeds=0,1,2] \
      [--rounds=200] [--settings=0_0,0.5_0.5,1_1] [--stragglers=0,0.5,0.9] \
      [--methods=fedavg,fedprox_mu0,fedprox_mu1] [--out_dir=DIR]

Reproduces the Synthetic experiments of Li et al., "Federated Optimization in
Heterogeneous Networks", MLSys 2020 (Figure 1; Figure 2 at 0% stragglers)
with ``configs/synthetic_fedprox.py``. Each (setting, stragglers, method,
seed) member runs in ``DIR/members/<member>``; members with a
``summary.json`` are read back, not rerun, and ``final_state.npz`` is deleted
after each member. Then ``DIR/fedprox_synthetic.{json,md,png}`` get the
members' finals and curves, a mean +- std table with the paper's findings
checked against it, and a grid of training-loss curves like Figure 1.

This module runs the grid (flags, members, reports);
:mod:`experiments.studies.fedprox_synthetic_grid` defines its members and
:mod:`experiments.studies.fedprox_synthetic_report` writes the report.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

from absl import app
from absl import flags

from experiments.lib import cli
from experiments.studies import members as members_lib
from experiments.studies.fedprox_synthetic_grid import (METHODS, member_config,
                                                        member_name,
                                                        member_record,
                                                        parse_setting,
                                                        summarize)
from experiments.studies.fedprox_synthetic_report import (check_findings,
                                                          markdown, plot)
from fedjax_lab.training import metrics_io

# The command-line flags, once define_flags() ran: name -> FlagHolder.
_FLAGS: dict[str, flags.FlagHolder] = {}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the command-line flags (only when run as a program, or on a
  test's own FlagValues: other experiments use the same flag names)."""
  define = lambda kind, name, default, help_text: kind(
      name, default, help_text, flag_values=flag_values)
  _FLAGS.update(
      out_dir=define(flags.DEFINE_string, "out_dir",
                     "experiments/results/fedprox_synthetic",
                     "Folder for the members and the report."),
      seeds=define(flags.DEFINE_list, "seeds", ["0", "1", "2"],
                   "Training seeds (config.seed) per member."),
      rounds=define(flags.DEFINE_integer, "rounds", 200, "Rounds per member."),
      settings=define(flags.DEFINE_list, "settings", ["0_0", "0.5_0.5", "1_1"],
                      "Synthetic(alpha, beta) settings, each written "
                      "ALPHA_BETA."),
      stragglers=define(flags.DEFINE_list, "stragglers", ["0", "0.5", "0.9"],
                        "Straggler fractions (probability a round's client "
                        "straggles)."),
      eval_every=define(flags.DEFINE_integer, "eval_every", 5,
                        "Rounds between evaluations of the global model."),
      methods=define(flags.DEFINE_list, "methods", list(METHODS),
                     f"Methods to run, of {', '.join(METHODS)}."))


REPORT_NAME = "fedprox_synthetic"


def run_member(config, workdir: str) -> tuple[dict[str, Any], bool]:
  """Runs (or reads back) one member; returns (summary, whether it ran).

  A diverged member (non-finite loss) gets a summary with ``diverged: true``
  so that it counts as finished. The binary final state is deleted.
  """
  run = members_lib.run_or_read_back(
      config, workdir, diverged_file=members_lib.SUMMARY_FILE,
      keep_final_state=False)
  return run.summary, run.ran


def run_grid(out_dir: str, seeds: Sequence[int], rounds: int,
             settings: Sequence[str], stragglers: Sequence[float],
             eval_every: int = 5, methods: Sequence[str] = tuple(METHODS),
             command: str = "") -> dict[str, Any]:
  """Runs every missing member of the grid, then writes the three reports.

  Returns the JSON report, plus ``members_run`` (how many members this call
  trained; finished ones are read back).
  """
  members, members_run = [], 0
  for setting in settings:
    for fraction in stragglers:
      for method in methods:
        for seed in seeds:
          workdir = os.path.join(out_dir, "members", member_name(
              setting, fraction, method, seed))
          summary, ran = run_member(member_config(
              setting, fraction, method, seed, rounds, eval_every), workdir)
          members_run += ran
          record = {"setting": setting, "stragglers": fraction,
                    "method": method, "seed": seed,
                    "workdir": os.path.relpath(workdir, out_dir),
                    **member_record(workdir, summary)}
          members.append(record)
          print(json.dumps({k: v for k, v in record.items() if k != "curve"}),
                file=sys.stderr)
  rows = summarize(members)
  findings = check_findings(members, rows)
  report = {"command": command, "paper": "Li et al., MLSys 2020",
            "grid": {"settings": list(settings),
                     "stragglers": list(stragglers), "methods": list(methods),
                     "seeds": list(seeds), "rounds": rounds,
                     "eval_every": eval_every},
            "rows": rows, "findings": findings, "members": members}
  base = os.path.join(out_dir, REPORT_NAME)
  metrics_io.write_json(base + ".json", report)
  with open(base + ".md", "w") as f:
    f.write(markdown(rows, findings, command, seeds, rounds, eval_every))
  plot(members, base + ".png")
  return {**report, "members_run": members_run}


def main(argv: Sequence[str]) -> None:
  """Command-line entry: the grid from the flags (see define_flags)."""
  cli.reject_extra_args(argv)
  value = {name: holder.value for name, holder in _FLAGS.items()}
  for setting in value["settings"]:
    parse_setting(setting)  # fail before any training on a bad setting
  if set(value["methods"]) - set(METHODS):
    cli.fail(f"unknown --methods {value['methods']}; choose from "
             f"{', '.join(METHODS)}")
  command = " ".join(["python -m experiments.studies.fedprox_synthetic"] + [
      holder._flagvalues[name].serialize()  # pylint: disable=protected-access
      for name, holder in _FLAGS.items() if holder.present])
  report = run_grid(value["out_dir"], [int(s) for s in value["seeds"]],
                    value["rounds"], value["settings"],
                    [float(f) for f in value["stragglers"]],
                    value["eval_every"], value["methods"], command=command)
  print(json.dumps({"members_run": report["members_run"],
                    "findings": report["findings"]}, indent=1))


if __name__ == "__main__":
  define_flags()
  app.run(main)
