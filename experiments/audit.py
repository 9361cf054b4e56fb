r"""One-shot empirical privacy audit of a federated run (Andrew et al. 2024).

  python -m experiments.audit --config=configs/NAME.py --workdir=DIR \
      --num_canaries=K --num_held_out=K2 [--config.KEY=VALUE ...]
  fedjax-lab audit ...                   (the same, from any directory)

Adds K canary clients (each sends a fixed random direction of norm C every
round it is sampled) to the training population, trains the config's
experiment as ``experiments.run`` would (same files in DIR), then compares the
final model delta with the K inserted and K2 never-inserted directions and
reports the empirical epsilon (``fedjax_lab.audit.one_shot``). The report is
written to ``DIR/audit.json`` and printed as the last line on stdout.

C is ``--clip_norm`` if given, else ``config.privacy.clip_norm``; delta is
``--delta`` if given, else the run's (``config.privacy.delta``, whose 0 means
``1 / population**1.1``). With ``privacy.mechanism=none`` nothing clips or
noises the updates, so C only sets how strong the canaries are.
"""

import json
import sys
from typing import Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.lib import cli
from experiments.lib import paths

_DEFAULT_CONFIG = paths.DEFAULT_CONFIG
paths.ensure_configs_importable()

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Experiment config file (configs/*.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output folder (default: a new runs/audit-<config>-<time>).")
_NUM_CANARIES = flags.DEFINE_integer(
    "num_canaries", 100, "Canary clients inserted into the population (>= 2).")
_NUM_HELD_OUT = flags.DEFINE_integer(
    "num_held_out", 1000, "Canary directions drawn but never inserted.")
_CLIP_NORM = flags.DEFINE_float(
    "clip_norm", None, "Norm of a canary update (default: "
    "config.privacy.clip_norm).")
_DELTA = flags.DEFINE_float(
    "delta", None, "Delta of the estimate (default: the run's delta).")
_CANARY_SEED = flags.DEFINE_integer(
    "canary_seed", None, "Seed of the canary directions (default: "
    "config.seed).")
_NULL = flags.DEFINE_enum(
    "null", "theoretical", ["theoretical", "held_out"],
    "Null distribution of the cosines: N(0, 1/d), or a Gaussian fitted to "
    "the held-out canaries.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")


def main(argv: Sequence[str]) -> None:
  """Trains with canaries inserted and prints the audit's report."""
  cli.reject_extra_args(argv)
  # Imported here so --help stays fast.
  from fedjax_lab.audit import canaries  # pylint: disable=g-import-not-at-top
  from fedjax_lab.audit import one_shot  # pylint: disable=g-import-not-at-top
  from fedjax_lab.training import setup  # pylint: disable=g-import-not-at-top

  config = _CONFIG.value
  workdir = _WORKDIR.value or cli.default_workdir(
      flags.FLAGS["config"].config_filename, prefix="audit-")
  experiment = cli.build_experiment_or_exit(config)
  clip_norm = canaries.resolve_clip_norm(experiment, _CLIP_NORM.value)
  if clip_norm is None:
    cli.fail("the config has no privacy.clip_norm; pass --clip_norm (the L2 "
             "norm of a canary update).")
  if experiment.privacy is not None and _CLIP_NORM.value is not None and (
      _CLIP_NORM.value != experiment.privacy.clip_norm):
    print(f"warning: canaries have norm {clip_norm:g} but the mechanism clips"
          f" to {experiment.privacy.clip_norm:g}.", file=sys.stderr)
  if _NUM_CANARIES.value < 2 or _NUM_HELD_OUT.value < 0:
    cli.fail("need --num_canaries >= 2 (a Gaussian is fitted to their "
             "cosines) and --num_held_out >= 0.")
  seed = config.seed if _CANARY_SEED.value is None else _CANARY_SEED.value
  delta = canaries.resolve_delta(experiment, _DELTA.value)
  print(f"dataset: {json.dumps(experiment.dataset.summary())}",
        file=sys.stderr)
  print(f"audit: {_NUM_CANARIES.value} canaries (+{_NUM_HELD_OUT.value} held "
        f"out) of norm {clip_norm:g}, delta={delta:.3g}, null={_NULL.value}; "
        f"strategy: {experiment.strategy.label} on "
        f"{setup.describe_devices()}; workdir: {workdir}", file=sys.stderr)
  with cli.run_errors_exit():
    report = one_shot.run_audit(
        experiment, workdir, num_canaries=_NUM_CANARIES.value,
        num_held_out=_NUM_HELD_OUT.value, seed=seed, delta=delta,
        clip_norm=clip_norm, null=_NULL.value,
        show_progress=_PROGRESS.value)
  print(json.dumps(report, sort_keys=True))


def run_program() -> None:
  """The program: parses ``sys.argv`` (errors: exit 2) and runs ``main``."""
  app.run(main, flags_parser=cli.parse_flags_or_exit(_DEFAULT_CONFIG))


if __name__ == "__main__":
  run_program()
