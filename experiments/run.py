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
import time

from absl import app
from absl import flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "configs", "default.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file (configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (default: a new runs/<config>-<time>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def _default_workdir(config_path: str) -> str:
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Imported here so --help stays fast.
  from fedjax_lab.training import loop, setup  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  workdir = _WORKDIR.value or _default_workdir(
      flags.FLAGS["config"].config_filename)
  try:
    experiment = setup.build_experiment(config)
  except (setup.ConfigError, ValueError, TypeError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"dataset: {json.dumps(experiment.dataset.summary())}",
        file=sys.stderr)
  print(f"strategy: {experiment.strategy.label} on "
        f"{setup.describe_devices()}; workdir: {workdir}", file=sys.stderr)
  try:
    summary = loop.run_experiment(experiment, workdir,
                                  show_progress=_PROGRESS.value)
  except FileExistsError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except loop.DivergedError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  print(json.dumps(summary))


if __name__ == "__main__":
  app.run(main)
