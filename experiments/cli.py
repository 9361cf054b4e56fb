"""Shared pieces of the absl entry points: workdirs and user-facing errors.

User errors (a bad config, an existing workdir, a diverged run) end the
process with a one-line ``error: ...`` on stderr and a documented exit code,
never a traceback: 2 for configuration / workdir problems, 3 for divergence,
130 for a run stopped by SIGINT/SIGTERM (checkpointed; re-run to resume).
"""

import contextlib
import importlib.util
import os
import sys
import time
from typing import Any, Iterator, Sequence


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


def _config_path(argv: Sequence[str], default: str) -> str:
  for arg in argv:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return default


def _load_config(path: str) -> Any:
  """The config a ``--config=FILE[:mode]`` flag names (no overrides)."""
  file_path, _, mode = path.partition(":")
  spec = importlib.util.spec_from_file_location("_config_for_errors",
                                                file_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(mode) if mode else module.get_config()


def explain_flag_error(argv: Sequence[str], error: Exception,
                       default_config: str) -> str:
  """A one-line reason for a failed flag parse, naming the bad config key.

  ml_collections reports an unknown ``--config.KEY`` as a bare attribute
  error; this finds the key, and the closest valid ones.
  """
  from experiments import sweep_spec  # pylint: disable=g-import-not-at-top
  path = _config_path(argv, default_config)
  file_path = path.partition(":")[0]
  if not os.path.isfile(file_path):
    folder = os.path.dirname(file_path) or "."
    known = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder)
                               else []) if n.endswith(".py")
                   and not n.startswith(("_", "common")))
    return (f"config file {file_path!r} not found" +
            (f"; configs in {folder}/: {', '.join(known)}" if known else "") +
            ".")
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv
               if a.startswith("--config.")]
  if overrides:
    try:
      valid = sweep_spec.config_leaves(_load_config(path))
    except Exception:  # pylint: disable=broad-except
      valid = None
    if valid is not None:
      for key in overrides:
        if key not in valid and not any(k.startswith(key + ".")
                                        for k in valid):
          return sweep_spec.unknown_key_message(key, list(valid),
                                                f"--config.{key}")
  return f"{type(error).__name__}: {error}"


def parse_flags_or_exit(default_config: str):
  """An absl ``flags_parser``: flag and config-override errors exit with
  code 2 and one ``error:`` line instead of a traceback."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      fail(explain_flag_error(argv[1:], e, default_config), 2)

  return parse


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
