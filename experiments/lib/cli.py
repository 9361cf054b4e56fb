"""Shared pieces of the absl entry points: workdirs, user errors, summaries.

User errors (a bad config, an extra argument, an existing workdir, a diverged
run) end the process with a one-line ``error: ...`` on stderr and a
documented exit code, never a traceback: 2 for configuration / usage /
workdir problems, 3 for divergence, 130 for a run stopped by SIGINT/SIGTERM
(checkpointed; re-run to resume).
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import sys
import time
from typing import Any, Iterator, Mapping, Sequence


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


def _config_path(argv: Sequence[str], default: str | None) -> str | None:
  for arg in argv:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return default


def _one_line(text: str) -> str:
  """``text`` with its lines joined by spaces (an error stays one line)."""
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def load_config(path: str) -> Any:
  """The config a ``--config=FILE[:mode]`` flag names (no overrides)."""
  from experiments.lib import paths  # pylint: disable=g-import-not-at-top
  paths.ensure_configs_importable()
  file_path, _, mode = path.partition(":")
  spec = importlib.util.spec_from_file_location("_config_for_errors",
                                                file_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(mode) if mode else module.get_config()


def config_problem(path: str) -> str | None:
  """Why ``--config=FILE[:mode]`` cannot be used, in one line; None if fine.

  Covers a missing file (listing the configs beside it), a file that fails
  to load or has no ``get_config``, an unknown ``:mode``, and a
  ``get_config`` that returns something other than a ``ConfigDict``.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  file_path, _, mode = path.partition(":")
  if not os.path.isfile(file_path):
    folder = os.path.dirname(file_path) or "."
    known = sorted(n for n in (os.listdir(folder) if os.path.isdir(folder)
                               else []) if n.endswith(".py")
                   and not n.startswith(("_", "common")))
    return (f"config file {file_path!r} not found" +
            (f"; configs in {folder}/: {', '.join(known)}" if known else "") +
            ".")
  try:
    config = load_config(path)
  except ValueError as e:  # e.g. configs/common.py's unknown mode
    return f"config {path!r}: {_one_line(str(e))}"
  except TypeError as e:
    if mode:
      return (f"config {path!r}: get_config() of {file_path} does not take "
              f"a mode ({_one_line(str(e))})")
    return f"config {path!r}: TypeError: {_one_line(str(e))}"
  except AttributeError as e:
    return f"config file {file_path!r} has no get_config() ({e})"
  except Exception as e:  # pylint: disable=broad-except
    return f"config {path!r} failed to load: {type(e).__name__}: " + (
        _one_line(str(e)))
  if not isinstance(config, ml_collections.ConfigDict):
    kind = "None" if config is None else f"a {type(config).__name__}"
    return (f"config file {file_path!r}: get_config() returned {kind}, not "
            "an ml_collections.ConfigDict")
  return None


def explain_flag_error(argv: Sequence[str], error: Exception,
                       default_config: str | None) -> str:
  """A one-line reason for a failed flag parse, naming the bad config key.

  ml_collections reports an unknown ``--config.KEY`` as a bare attribute
  error; this finds the key, and the closest valid ones.
  """
  from experiments.lib import sweep_spec  # pylint: disable=g-import-not-at-top
  path = _config_path(argv, default_config)
  if path is None:
    return _one_line(f"{type(error).__name__}: {error}")
  problem = config_problem(path)
  if problem:
    return problem
  overrides = [a[len("--config."):].split("=", 1)[0] for a in argv
               if a.startswith("--config.")]
  if overrides:
    try:
      valid = sweep_spec.config_leaves(load_config(path))
    except Exception:  # pylint: disable=broad-except
      valid = None
    if valid is not None:
      for key in overrides:
        if key not in valid and not any(k.startswith(key + ".")
                                        for k in valid):
          return sweep_spec.unknown_key_message(key, list(valid),
                                                f"--config.{key}")
  return _one_line(f"{type(error).__name__}: {error}")


def parse_flags_or_exit(default_config: str | None = None):
  """An absl ``flags_parser``: a bad config file, flag or config override,
  or an extra positional argument exits with code 2 and one ``error:`` line
  instead of a traceback.

  Args:
    default_config: the ``--config`` used when none is given (checked like
      a given one); None: the program has no config or none by default.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  def parse(argv: Sequence[str]) -> list[str]:
    path = _config_path(argv[1:], default_config)
    if path is not None and not any(
        arg in ("--help", "-h", "--helpfull", "--helpshort", "-?")
        for arg in argv[1:]):
      problem = config_problem(path)
      if problem:
        fail(problem, 2)
    try:
      rest = flags.FLAGS(argv)
    except Exception as e:  # pylint: disable=broad-except
      fail(explain_flag_error(argv[1:], e, default_config), 2)
    reject_extra_args(rest)
    return rest

  return parse


def reject_extra_args(argv: Sequence[str]) -> None:
  """Exits with code 2 if ``argv`` (absl's, program first) has positional
  arguments: every input of these programs is a ``--flag``."""
  if len(argv) > 1:
    fail(f"unexpected arguments: {' '.join(argv[1:])} (every option is a "
         "--flag; see --help)", 2)


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
  from fedjax_lab.training import loop  # pylint: disable=g-import-not-at-top
  from fedjax_lab.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    yield
  except (FileExistsError, workdir_lib.ResumeError) as e:
    fail(str(e), 2)
  except loop.DivergedError as e:
    fail(str(e), 3)
  except loop.RunInterrupted as e:
    fail(str(e), 130)


def _number(value: Any, spec: str) -> str:
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return format(value, spec) if math.isfinite(value) else str(value)
  return "n/a"


def run_report(summary: Mapping[str, Any], workdir: str) -> str:
  """A short human-readable account of a finished run (for stderr).

  Final accuracy and loss, rounds, seconds (a DP run withholds them), epsilon
  and delta for a DP run, and where the results are.
  """
  rounds = summary.get("rounds")
  if "seconds" in summary:
    took = f"in {_number(summary['seconds'], '.1f')} s"
  else:
    took = "(seconds withheld: a DP run's timing depends on its data)"
  accuracy = _number(summary.get("final_eval_accuracy"), ".4f")
  loss = _number(summary.get("final_eval_loss"), ".4f")
  lines = [f"run finished: {rounds} rounds {took}"
           + (" (stopped early)" if summary.get("stopped_early") else ""),
           f"  final eval accuracy {accuracy}, loss {loss}"]
  if summary.get("epsilon") is not None:
    relation = (summary.get("privacy") or {}).get("neighboring_relation")
    lines.append(f"  privacy: epsilon {_number(summary['epsilon'], '.4g')} at "
                 f"delta {_number(summary.get('delta'), '.3g')}"
                 + (f" ({relation})" if relation else ""))
  lines.append(f"  results: {workdir} (summary.json, metrics.jsonl)")
  return "\n".join(lines)
