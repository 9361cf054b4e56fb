"""A run's workdir: its layout, its lock, the config checks of a resume, and
opening, resuming or setting aside the run there.

Layout: ``.lock`` (held by the live run), ``config.json``, ``versions.json``,
``metrics.jsonl`` (+ the other sinks, :mod:`fedjax_lab.training.sinks`),
``checkpoints/<rounds done>/`` (orbax), and once finished ``summary.json`` and
``final_state.npz`` (:mod:`fedjax_lab.training.state_files`).

What a checkpoint holds, and how it is written and restored, is
:mod:`fedjax_lab.training.run_checkpoints` (:class:`RunCheckpoints`, used
here and re-exported for the callers that reach it through this module).

What cannot corrupt a workdir:

* Two runs: a run holds an exclusive ``flock`` on ``workdir/.lock`` for its
  whole life (released on every exit; the kernel drops it when the process
  dies), and a second run is refused (:class:`WorkdirBusyError`).
* A torn or lost tail of ``metrics.jsonl``: the run resumes from the newest
  checkpoint whose rounds are all in it, and every sink is completed to
  exactly those rounds. A damaged line before the last is refused
  (:class:`CorruptMetricsError`), nothing changed.
* A changed config: checked against ``config.json`` and against the config
  kept in the checkpoint (so deleting ``config.json`` does not bypass it).
* Filesystem errors (not a directory, not writable, disk full) end in a
  :class:`WorkdirError` naming the path; every file is replaced atomically,
  so what was written before stays readable and the run resumes.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import sys
from typing import Any, Iterator, Mapping

import jax
import numpy as np

from fedjax_lab.privacy import accounting
from fedjax_lab.training import metrics_io
from fedjax_lab.training.config_diff import (RESUMABLE_CHANGES,
                                            added_key_defaults,
                                            config_differences,
                                            dotted_value, inactive_blocks)
from fedjax_lab.training.run_checkpoints import RunCheckpoints

PyTree = Any
CHECKPOINT_DIR = "checkpoints"
CONFIG_FILE = "config.json"
VERSIONS_FILE = "versions.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOCK_FILE = ".lock"


class ResumeError(ValueError):
  """The workdir cannot be resumed with this config; the message says why."""


class WorkdirError(ResumeError):
  """The workdir cannot be used (not a directory, not writable, disk full,
  held by another run); the message names the path and what to do."""


class WorkdirBusyError(WorkdirError):
  """Another live run holds the workdir's lock."""


class CorruptMetricsError(ResumeError):
  """``metrics.jsonl`` is damaged before its last line; nothing was changed."""


class FinishedRunError(FileExistsError):
  """The workdir holds a finished run (``summary.json``); it is left as is."""


# ----------------------------------------------------------------- the lock


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s exclusive lock (creating the directory) meanwhile.

  Inside, an ``OSError`` about the workdir (see :func:`workdir_error`)
  surfaces as a :class:`WorkdirError`.

  Raises:
    WorkdirBusyError: another live run holds the lock (a dead one does not).
    WorkdirError: ``workdir`` is a file, not writable, or the disk is full.
  """
  lock_path = os.path.join(workdir, LOCK_FILE)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise _converted(e, workdir) from e
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
      raise WorkdirBusyError(
          f"another run{f' (pid {holder})' if holder.isdigit() else ''} "
          f"holds the workdir {workdir} (lock {lock_path}); wait for it to "
          "end, or pass another --workdir. Nothing there was changed."
      ) from None
    except OSError as e:  # e.g. no locks on this file system
      raise _converted(e, workdir) from e
    with contextlib.suppress(OSError):  # the pid is informative only
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    try:
      yield
    except FinishedRunError:
      raise
    except OSError as e:
      error = workdir_error(e, workdir)
      if error is None:
        raise
      raise error from e
  finally:
    os.close(fd)  # releases the lock


def workdir_error(error: OSError, workdir: str) -> WorkdirError | None:
  """``error`` as a :class:`WorkdirError` saying which path and what to do;
  None when it is not about the workdir (nor a full disk)."""
  path = error.filename or workdir
  reason = error.strerror or str(error)
  if error.errno in (errno.ENOSPC, errno.EDQUOT):
    return WorkdirError(
        f"no space left on the disk of {workdir} (writing {path}); free some "
        "space and re-run the same command: it resumes from the last "
        "checkpoint, and everything written before was kept.")
  absolute = os.path.abspath(workdir)
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    return WorkdirError(
        f"the workdir {workdir} is a file, not a directory; pass a "
        "--workdir that is a directory or does not exist yet.")
  if error.errno == errno.ENOTDIR:
    return WorkdirError(
        f"cannot use the workdir {workdir}: a part of {path} is a file, not "
        "a directory; pass another --workdir.")
  if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
    return WorkdirError(
        f"cannot write {path} ({reason}); the workdir {workdir} must be a "
        "writable directory: fix its permissions (e.g. chmod u+w) or pass "
        "another --workdir.")
  if (os.path.abspath(str(path)) + os.sep).startswith(absolute + os.sep):
    return WorkdirError(f"{path}: {reason} (in the workdir {workdir}); "
                        "fix that path or pass another --workdir.")
  return None


def _converted(error: OSError, workdir: str) -> OSError | WorkdirError:
  return workdir_error(error, workdir) or error


# ------------------------------------------------------------ checkpoints


def latest_record(workdir: str) -> dict[str, Any] | None:
  """The JSON record of the newest readable checkpoint in ``workdir``."""
  checkpoints = RunCheckpoints(os.path.join(workdir, CHECKPOINT_DIR))
  try:
    return checkpoints.latest_record()
  finally:
    checkpoints.close()


# ------------------------------------------------------- config checks


def check_resumable(saved: str | Mapping[str, Any],
                    current: Mapping[str, Any],
                    source: str | None = None) -> None:
  """Raises ResumeError if the run in the workdir used a different setup.

  ``saved`` is the path of the run's ``config.json`` or the config itself
  (e.g. from a checkpoint's record; ``source`` then names where it is kept).
  Only :data:`RESUMABLE_CHANGES` may differ (and ``num_rounds`` only when the
  noise was not calibrated to it, since calibration depends on it).
  """
  if isinstance(saved, str):
    source = source or saved
    try:
      with open(saved) as f:
        saved = json.load(f)
    except ValueError as e:
      raise ResumeError(
          f"{source} is not valid JSON ({e}); delete it (the checkpoints "
          "keep the config it held) and re-run, or pass a new --workdir."
      ) from None
  inactive = inactive_blocks(saved) & inactive_blocks(current)
  changed = [k for k in config_differences(saved, current)
             if k.split(".", 1)[0] not in inactive]
  changed = added_key_defaults(saved, current, changed)
  allowed = set(RESUMABLE_CHANGES)
  if current.get("privacy", {}).get("calibrate"):
    allowed.discard("num_rounds")
  blocking = [k for k in changed if k not in allowed]
  if blocking:
    shown = ", ".join(
        f"{k}: {dotted_value(saved, k)!r} -> {dotted_value(current, k)!r}"
        for k in blocking[:6])
    where = (f"the run in {os.path.dirname(source)}"
             if os.path.basename(source or "") == CONFIG_FILE else
             f"the run recorded in {source}" if source else "the run")
    raise ResumeError(
        f"{where} was started with a different config ({shown}"
        f"{', ...' if len(blocking) > 6 else ''}). "
        "Resume it with its own config, or pass a new --workdir. Keys a "
        f"resumed run may change: {', '.join(sorted(allowed))}.")


# --------------------------------------------------- opening / resuming


def _dist_version(name: str) -> str:
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  try:
    return metadata.version(name)
  except metadata.PackageNotFoundError:
    return "unknown"


def versions() -> dict[str, str]:
  """Versions of the libraries a run's numbers depend on."""
  import flax, jaxlib, optax  # pylint: disable=g-import-not-at-top,multiple-imports
  return {"python": sys.version.split()[0], "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__,
          "dp_accounting": _dist_version("dp-accounting"),
          "numpy": np.__version__, "backend": jax.default_backend()}


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl``, which must be rounds 1, 2, ...
  in order (a last line torn by a crash is dropped); [] without the file.

  Raises:
    CorruptMetricsError: a line before the last is not a record, or the
      rounds skip or repeat; it names the line (nothing is changed).
  """
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.exists(path):
    return []
  advice = (f"so the run in {workdir} cannot be resumed from it; nothing "
            "was changed. Delete that line and every line after it to resume "
            "from the newest checkpoint before it, or pass a new --workdir.")
  try:
    entries = metrics_io.read_jsonl_lines(path, allow_torn_tail=True)
  except metrics_io.MetricsFileError as e:
    raise CorruptMetricsError(f"{e}: the file is damaged before its last "
                              f"line, {advice}") from None
  for expected, (number, _, record) in enumerate(entries, start=1):
    if record.get("round") != expected:
      raise CorruptMetricsError(
          f"{path}, line {number}: holds round {record.get('round')!r} "
          f"where round {expected} was expected (the file is damaged), "
          f"{advice}")
  return [record for _, _, record in entries]


def set_aside_unfinished(workdir: str, exclude: tuple[str, ...] = ()) -> str:
  """Moves a run's files into ``workdir/unfinished-<n>``; returns that path.

  The lock file, earlier ``unfinished-*`` folders and ``exclude`` stay.
  """
  n = 1
  while os.path.exists(target := os.path.join(workdir, f"unfinished-{n}")):
    n += 1
  os.makedirs(target)
  excluded = {os.path.abspath(p) for p in exclude}
  for name in os.listdir(workdir):
    path = os.path.join(workdir, name)
    if (name.startswith("unfinished-") or name == LOCK_FILE or
        path == target or os.path.abspath(path) in excluded):
      continue
    os.replace(path, os.path.join(target, name))
  return target


def _has_checkpoints(directory: str) -> bool:
  return os.path.isdir(directory) and bool(os.listdir(directory))


def open_or_resume(workdir: str, config_dict: Mapping[str, Any], like: PyTree,
                   *, checkpoints_to_keep: int = 3, accountant: Any = None
                   ) -> tuple[RunCheckpoints, int, PyTree | None,
                              dict[str, Any]]:
  """Starts a fresh run in ``workdir`` or restores the interrupted one there.

  Call it while holding :func:`locked`. ``like`` is a state with the run's
  structure; ``accountant`` (with ``spec`` and ``delta``) checks the
  checkpoint's privacy ledger. The run resumes from the newest readable
  checkpoint whose rounds are all in ``metrics.jsonl``; an unfinished run
  without one is moved to ``workdir/unfinished-<n>`` and started over.

  Returns:
    ``(checkpoints, rounds_done, state or None, checkpoint record or {})``;
    the caller closes ``checkpoints``.

  Raises:
    FinishedRunError: ``workdir`` holds a finished run (left untouched).
    ResumeError: the run there used another config or privacy ledger, or
      its metrics file is damaged (:class:`CorruptMetricsError`); nothing
      was changed.
  """
  config_path = os.path.join(workdir, CONFIG_FILE)
  checkpoint_dir = os.path.join(workdir, CHECKPOINT_DIR)

  def start_fresh():
    os.makedirs(workdir, exist_ok=True)
    metrics_io.write_json(config_path, config_dict)
    metrics_io.write_json(os.path.join(workdir, VERSIONS_FILE), versions())
    return (RunCheckpoints(checkpoint_dir, checkpoints_to_keep,
                           config=config_dict), 0, None, {})

  if os.path.exists(os.path.join(workdir, SUMMARY_FILE)):
    raise FinishedRunError(
        f"{workdir} already holds a finished run ({SUMMARY_FILE} is there); "
        "pass a new --workdir (nothing there was changed).")
  if not (os.path.exists(os.path.join(workdir, METRICS_FILE)) or
          _has_checkpoints(checkpoint_dir)):
    return start_fresh()
  history = read_history(workdir)
  if os.path.exists(config_path):
    check_resumable(config_path, config_dict)
  checkpoints = RunCheckpoints(checkpoint_dir, checkpoints_to_keep,
                               config=config_dict)
  try:
    newest = checkpoints.steps()
    record = checkpoints.latest_record(max_step=len(history))
    if record is not None and "config" in record:
      check_resumable(record["config"], config_dict, source=checkpoint_dir)
    restored = checkpoints.restore_latest(like, max_step=len(history))
    if restored is None:
      # Stopped before its first usable checkpoint: start over, keeping
      # what it wrote.
      checkpoints.close()
      kept = set_aside_unfinished(workdir)
      print(f"{workdir}: the unfinished run there has no readable checkpoint "
            f"of a round in {METRICS_FILE}; starting over (its files were "
            f"moved to {kept})", file=sys.stderr)
      return start_fresh()
    rounds_done, state, record = restored
    if "config" in record:
      check_resumable(record["config"], config_dict,
                      source=os.path.join(checkpoint_dir, str(rounds_done)))
    if accountant is not None and rounds_done:
      spent = accounting.epsilon(accountant.spec, rounds_done,
                                 accountant.delta)
      if not math.isclose(spent, record.get("epsilon", spent), rel_tol=1e-9):
        raise ResumeError(
            f"the privacy ledger of the checkpoint says epsilon="
            f"{record['epsilon']:.6g} after {rounds_done} rounds but this "
            f"config's accountant gives {spent:.6g}; the privacy settings "
            "changed. Pass a new --workdir.")
    metrics_io.write_json(config_path, config_dict)
  except BaseException:
    checkpoints.close()
    raise
  if newest and newest[-1] > len(history):
    print(f"{workdir}: {METRICS_FILE} holds rounds 1-{len(history)} only "
          f"(its end was lost), so the checkpoint after round {newest[-1]} "
          "is not used", file=sys.stderr)
  print(f"resuming {workdir} after round {rounds_done} (checkpoint "
        f"{os.path.join(checkpoints.directory, str(rounds_done))})",
        file=sys.stderr)
  return checkpoints, rounds_done, state, record
