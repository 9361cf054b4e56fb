"""Shared pieces of the absl entry points: workdirs and user-facing errors.

User errors (a bad config, an existing workdir, a diverged run) end the
process with a one-line ``error: ...`` on stderr and a documented exit code,
never a traceback: 2 for configuration / workdir problems, 3 for divergence.
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
  """Turns an existing workdir into exit 2 and a diverged run into exit 3."""
  from fedjax_lab.training import loop  # pylint: disable=g-import-not-at-top
  try:
    yield
  except FileExistsError as e:
    fail(str(e), 2)
  except loop.DivergedError as e:
    fail(str(e), 3)
