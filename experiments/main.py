r"""The ``fedjax-lab`` console command: one entry point for the programs.

  fedjax-lab run     [flags]   one experiment        (experiments/run.py)
  fedjax-lab sweep   [flags]   a hyperparameter sweep (experiments/sweep.py)
  fedjax-lab plot    [flags]   PNGs of runs' metrics  (experiments/plot.py)
  fedjax-lab privacy [flags]   the privacy calculator (experiments/privacy.py)
  fedjax-lab audit   [flags]   an empirical privacy audit (experiments/audit.py)
  fedjax-lab population [flags] write a simulated population to disk
                                 (experiments/make_population.py)

Each subcommand takes exactly the flags of ``python -m experiments.<name>``
(``fedjax-lab <name> --help`` lists them) and works from any directory: the
default config is the repository's ``configs/default.py``; config paths the
user gives are relative to the working directory. Installed by
``pip install -e .`` (``setup.cfg``'s ``console_scripts``). Without a
subcommand, or with an unknown one, it prints this usage and exits with 2.
"""

from __future__ import annotations

import importlib
import sys
from typing import Sequence

PROG = "fedjax-lab"
# subcommand -> (module, one-line description).
COMMANDS = {
    "run": ("experiments.run", "run one federated experiment from a config"),
    "sweep": ("experiments.sweep", "run a resumable hyperparameter sweep"),
    "plot": ("experiments.plot", "plot runs' metrics as PNGs"),
    "privacy": ("experiments.privacy",
                "epsilon of a DP run, or the noise multiplier it needs"),
    "audit": ("experiments.audit", "one-shot empirical privacy audit"),
    "population": ("experiments.make_population",
                   "write a simulated population of up to millions of "
                   "clients to disk"),
    "prepare-tfds": ("experiments.prepare_tfds",
                     "prepare the built-in datasets as TFDS datasets"),
}


def usage() -> str:
  """The command's usage text."""
  width = max(len(name) for name in COMMANDS)
  lines = [f"usage: {PROG} {{{'|'.join(COMMANDS)}}} [flags]", "",
           "commands:"]
  lines += [f"  {name:<{width}}  {text}" for name, (_, text)
            in COMMANDS.items()]
  lines += ["", f"'{PROG} COMMAND --help' lists a command's flags (the "
            "same as 'python -m experiments.COMMAND')."]
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs the subcommand ``argv[1]`` with the remaining arguments.

  Returns the exit code where the subcommand returns one (``plot``); the
  absl programs exit by themselves.
  """
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage(), file=sys.stdout if len(argv) >= 2 else sys.stderr)
    return 0 if len(argv) >= 2 else 2
  command, rest = argv[1], argv[2:]
  if command not in COMMANDS:
    print(f"{PROG}: unknown command {command!r}\n\n{usage()}",
          file=sys.stderr)
    return 2
  from experiments.lib import paths  # pylint: disable=g-import-not-at-top
  paths.ensure_configs_importable()
  # The absl programs read their flags (ml_collections: the config's
  # overrides too) from sys.argv, some of them when the module is imported.
  sys.argv = [f"{PROG} {command}", *rest]
  module = importlib.import_module(COMMANDS[command][0])
  if command == "plot":
    return module.main(rest, prog=f"{PROG} plot")
  module.run_program()
  return 0


if __name__ == "__main__":
  sys.exit(main())
