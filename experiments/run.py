r"""Runs one federated experiment from a config file.

  python -m experiments.run --config=configs/NAME.py --workdir=DIR \
      [--config.KEY=VALUE ...]
  fedjax-lab run ...                     (the same, from any directory)

Without ``--config`` it runs the main job (the repository's
``configs/default.py``, wherever the command runs); without ``--workdir`` it
writes to a new folder under ``runs/``. Append ``:tiny`` to the config path
(``--config=configs/NAME.py:tiny``) for a seconds-long smoke run of the same
pipeline. A finished run prints a short summary on stderr (final accuracy
and loss, rounds, seconds, epsilon and delta if private, the workdir); the
last line on stdout is the run's JSON summary.
"""

import json
import os
import sys
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.lib import cli
from experiments.lib import paths

_DEFAULT_CONFIG = paths.DEFAULT_CONFIG
paths.ensure_configs_importable()

try:  # ml_collections reads the config and its overrides from argv here.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", _DEFAULT_CONFIG, "Experiment config file (configs/*.py).",
      lock_config=True)
except Exception as e:  # pylint: disable=broad-except
  cli.fail(cli.explain_flag_error(sys.argv[1:], e, _DEFAULT_CONFIG), 2)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (default: a new runs/<config>-<time>).")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", 1,
    "Processes the run spans (jax.distributed). Without --process_id this "
    "command starts them all on this machine (CPU: gloo collectives) and "
    "they behave as one run.")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "This process's id in [0, num_processes) when each host starts its own "
    "process (a cluster job); process 0 writes the workdir.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0's coordinator (with --process_id); default: "
    "the JAX_COORDINATOR_ADDRESS environment variable or the cluster's.")


def main(argv: Sequence[str]) -> None:
  """Builds the experiment the flags describe, runs it, reports it."""
  cli.reject_extra_args(argv)
  if _NUM_PROCESSES.value < 1:
    cli.fail("--num_processes must be >= 1.", 2)
  if _NUM_PROCESSES.value > 1 and _PROCESS_ID.value is None:
    from experiments.lib import launcher  # pylint: disable=g-import-not-at-top
    workdir = _WORKDIR.value or cli.default_workdir(
        flags.FLAGS["config"].config_filename)
    sys.exit(launcher.launch(sys.argv, _NUM_PROCESSES.value, workdir))
  coordinator = True
  if _NUM_PROCESSES.value > 1 or _PROCESS_ID.value is not None:
    from fedjax_lab.engine import distributed  # pylint: disable=g-import-not-at-top
    try:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                             _PROCESS_ID.value)
    except ValueError as e:
      cli.fail(str(e), 2)
    coordinator = distributed.is_coordinator()
  # Imported here so --help stays fast.
  from fedjax_lab.training import api, setup  # pylint: disable=g-import-not-at-top

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
  if coordinator:
    print(f"dataset: {json.dumps(experiment.dataset.summary())}",
          file=sys.stderr)
    print(f"strategy: {experiment.strategy.label} on "
          f"{setup.describe_devices()}; workdir: {workdir}", file=sys.stderr)
  with cli.run_errors_exit():
    summary = api.simulate(experiment, workdir=workdir,
                           show_progress=_PROGRESS.value).summary
  if coordinator:
    print(cli.run_report(summary, workdir), file=sys.stderr, flush=True)
    print(json.dumps(summary))


def run_program() -> None:
  """The program: parses ``sys.argv`` (errors: exit 2) and runs ``main``."""
  app.run(main, flags_parser=cli.parse_flags_or_exit(_DEFAULT_CONFIG))


if __name__ == "__main__":
  run_program()
