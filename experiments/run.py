r"""Runs one federated experiment from a config file.

  python -m experiments.run --config=configs/NAME.py --workdir=DIR \
      [--config.KEY=VALUE ...]

Without ``--config`` it runs the main job (``configs/default.py``); without
``--workdir`` it writes to a new folder under ``runs/``. Append ``:tiny`` to
the config path (``--config=configs/NAME.py:tiny``) for a seconds-long smoke
run of the same pipeline. The last line on stdout is the run's JSON summary.
"""

import json
import os
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments import cli

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "default.py")

try:  # ml_collections reads the config and its overrides from argv here.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Experiment config file (configs/*.py).",
      lock_config=True)
except Exception as e:  # pylint: disable=broad-except
  cli.fail(cli.explain_flag_error(sys.argv[1:], e, _DEFAULT_CONFIG), 2)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (default: a new runs/<config>-<time>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so --help stays fast.
  from fedjax_lab.training import loop, setup  # pylint: disable=g-import-not-at-top

  cli.quiet_library_logs()
  config_file = flags.FLAGS["config"].config_filename.partition(":")[0]
  if not os.path.isfile(config_file):
    cli.fail(cli.explain_flag_error(sys.argv[1:], FileNotFoundError(),
                                    _DEFAULT_CONFIG), 2)
  try:
    config = _CONFIG.value
  except Exception as e:  # pylint: disable=broad-except
    cli.fail(cli.explain_flag_error(sys.argv[1:], e, _DEFAULT_CONFIG), 2)
  workdir = _WORKDIR.value or cli.default_workdir(
      flags.FLAGS["config"].config_filename)
  experiment = cli.build_experiment_or_exit(config)
  print(f"dataset: {json.dumps(experiment.dataset.summary())}",
        file=sys.stderr)
  print(f"strategy: {experiment.strategy.label} on "
        f"{setup.describe_devices()}; workdir: {workdir}", file=sys.stderr)
  with cli.run_errors_exit():
    summary = loop.run_experiment(experiment, workdir,
                                  show_progress=_PROGRESS.value)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_or_exit(_DEFAULT_CONFIG))
