"""Shared pieces of the absl entry points: workdirs and user-facing errors.

User errors (a bad config, an existing workdir, a diverged run) end the
process with a one-line ``error: ...`` on stderr and a documented exit code,
never a traceback: 2 for configuration / workdir problems, 3 for divergence,
130 for a run stopped by SIGINT/SIGTERM (checkpointed; re-run to resume).
"""

import contextlib
import os
import sys
import time
from typing import Any, Iterator


def default_workdir(config_path: str, prefix: str = "") -> str:
  """``runs/<prefix><config name>-<time>`` for a config path (``:mode`` ok)."""
  name = os.path.splitext(os.path.basename(config_path.split(":")[0]))[0]
  return os.path.join("runs",
                      f"{prefix}{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def quiet_library_logs() -> None:
  """Hides INFO logs of libraries (orbax logs every checkpoint) unless the
  user chose a level with ``--verbosity``."""
  from absl import flags, logging  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)


def fail(message: str, code: int = 2) -> None:
  """Prints ``error: message`` to stderr and exits with ``code``."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def build_experiment_or_exit(config: Any) -> Any:
  """``setup.build_experiment(config)``; a config error exits with code 2."""
  from fedjax_lab.training import setup  # pylint: disable=g-import-not-at-top
  try:
    return setup.build_experiment(config)
  except (setup.ConfigError, ValueError, TypeError, FileNotFoundError) as e:
    fail(str(e), 2)


@contextlib.contextmanager
def run_errors_exit() -> Iterator[None]:
  """Exit codes for run errors: workdir/resume 2, diverged 3, interrupted 130."""
  from fedjax_lab.training import loop, resume  # pylint: disable=g-import-not-at-top
  try:
    yield
  except (FileExistsError, resume.ResumeError) as e:
    fail(str(e), 2)
  except loop.DivergedError as e:
    fail(str(e), 3)
  except loop.RunInterrupted as e:
    fail(str(e), 130)
