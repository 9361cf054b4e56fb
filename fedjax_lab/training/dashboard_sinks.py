"""The dashboard sinks: TensorBoard event files (no TensorFlow) and W&B.

TensorBoard and W&B tags group the record's keys (see :func:`scalar_tag`):
``eval_<m>`` -> ``eval/<m>``, ``train_eval_<m>`` -> ``train_eval/<m>``,
``train_<m>`` -> ``train/<m>``, DP keys (``epsilon``, ``clip_norm``,
``noise_multiplier``, ``dp_*``, ...) -> ``privacy/<key>``, bookkeeping
(``seconds``, padded sizes, ``params_finite``) -> ``system/<key>``, every other
numeric key -> ``round/<key>``; a key that already holds a ``/`` is kept.
The step is the round. Non-numeric values are not written there. How each
of them resumes is in :mod:`fedjax_lab.training.sinks`.
"""

from __future__ import annotations

import numbers
import os
import re
import socket
import time
from typing import Any, Mapping, Sequence

from fedjax_lab.training.file_sinks import STEP_KEY, round_of
from fedjax_lab.training.tfevents import (SESSION_LOG_START, encode_event,
                                          event_has_summary, event_step,
                                          read_tfrecords, scalar_summary,
                                          tfrecord)

PRIVACY_KEYS = frozenset({
    "epsilon", "delta", "noise_multiplier", "clip_norm", "signal_to_noise",
    "fraction_clipped", "clipped_sum_norm", "unclipped_fraction_noisy",
    "update_noise_multiplier", "accounted_cohort_size", "tree_step"})
SYSTEM_KEYS = frozenset({"seconds", "cohort_padded_size",
                         "local_steps_padded", "params_finite"})


def scalar_tag(key: str) -> str:
  """The TensorBoard / W&B tag of a record key (grouping in the docstring)."""
  if "/" in key:
    return key
  for prefix in ("train_eval", "eval", "train"):
    if key.startswith(prefix + "_"):
      return f"{prefix}/{key[len(prefix) + 1:]}"
  if key in PRIVACY_KEYS or key.startswith("dp_"):
    return f"privacy/{key}"
  if key in SYSTEM_KEYS:
    return f"system/{key}"
  return f"round/{key}"


def numeric_items(record: Mapping[str, Any]) -> list[tuple[str, float]]:
  """``(key, float value)`` of the record's real numbers, ``round`` excluded."""
  return [(key, float(value)) for key, value in record.items()
          if key != STEP_KEY and isinstance(value, numbers.Real)]

_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d+)\.")


class TensorBoardWriter:
  """Scalar TensorBoard event files, written without TensorFlow.

  Each writer starts a new ``events.out.tfevents.<seconds>.<host>`` file in
  ``logdir``; ``<seconds>`` is bumped past any file already there so that
  readers, which take a run's files in name order, read it last. Each
  record becomes one Event at step ``record["round"]`` holding every numeric
  key as a ``simple_value`` (float32) under :func:`scalar_tag`'s tag.
  """

  def __init__(self, logdir: str, resume_after: int | None = None,
               history: Sequence[Mapping[str, Any]] | None = None):
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    stamps = [int(m.group(1)) for name in os.listdir(logdir)
              if (m := _EVENT_FILE.match(name))]
    stamp = max([int(time.time())] + [s + 1 for s in stamps])
    self.path = os.path.join(
        logdir, f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}")
    self._file = open(self.path, "xb")
    self._append(encode_event(time.time(), 0, file_version="brain.Event:2"))
    if resume_after is not None:
      self.truncate_after(resume_after, history)

  def _append(self, event: bytes) -> None:
    self._file.write(tfrecord(event))
    self._file.flush()

  def write(self, record: Mapping[str, Any]) -> None:
    """Writes the record's numeric values at step ``record["round"]``."""
    event = _scalars_event(record)
    if event is not None:
      self._append(event)

  def flush(self) -> None:
    """Events are flushed as they are written; kept for the interface."""
    self._file.flush()

  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None:
    """Drops every event at a step > last_round from the logdir's files.

    The files are rewritten (for readers without restart logic, such as the
    Rust data server or third-party parsers), and a SessionLog START at step
    ``last_round + 1`` is appended so that a TensorBoard that already loaded
    the old values purges them (``EventAccumulator`` restart logic). With
    ``history``, the rounds of it that the files lack (a record torn by a
    crash, a deleted file) are written again from it, after dropping every
    event from the first missing round on (values stay in step order).
    """
    self._file.close()
    paths = [os.path.join(self.logdir, name)
             for name in sorted(os.listdir(self.logdir))
             if _EVENT_FILE.match(name)]
    files = {path: read_tfrecords(path) for path in paths}
    limit, backfill = last_round, []
    if history is not None:
      held = {event_step(e) for events in files.values() for e in events
              if event_has_summary(e)}
      expected = [r for r in history if numeric_items(r) and
                  round_of(r.get(STEP_KEY)) <= last_round]
      missing = [r for r in expected if int(r[STEP_KEY]) not in held]
      if missing:
        limit = int(missing[0][STEP_KEY]) - 1
        backfill = [r for r in expected if int(r[STEP_KEY]) > limit]
    for path, events in files.items():
      kept = [e for e in events if event_step(e) <= limit]
      if len(kept) < len(events) or os.path.getsize(path) != sum(
          len(e) + 16 for e in events):
        tmp = os.path.join(self.logdir, ".truncating")  # readers skip it
        try:
          with open(tmp, "wb") as f:
            f.write(b"".join(tfrecord(e) for e in kept))
          os.replace(tmp, path)
        except BaseException:
          if os.path.exists(tmp):
            os.remove(tmp)
          raise
    self._file = open(self.path, "ab")
    for record in backfill:
      self._append(_scalars_event(record))
    self._append(encode_event(time.time(), last_round + 1,
                              session_log_status=SESSION_LOG_START))

  def close(self) -> None:
    """Closes the event file."""
    self._file.close()


def _scalars_event(record: Mapping[str, Any]) -> bytes | None:
  """The Event of a record's numeric values (None when it has none)."""
  scalars = [(scalar_tag(k), v) for k, v in numeric_items(record)]
  if not scalars:
    return None
  return encode_event(time.time(), int(record[STEP_KEY]),
                      summary=scalar_summary(scalars))


class WandbWriter:
  """Logs records to Weights & Biases (needs ``wandb``; it is optional).

  ``run_id`` names the W&B run so that a resumed training run continues it;
  with ``resume_after=R`` the W&B run is rewound to keep steps <= R.
  """

  def __init__(self, project: str, config: Mapping[str, Any] | None = None, *,
               run_id: str | None = None, resume_after: int | None = None,
               **init_kwargs: Any):
    try:
      import wandb  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(
          "the wandb metrics sink needs the `wandb` package, which is not "
          "installed (pip install wandb); or drop 'wandb' from the sinks"
      ) from e
    if resume_after is not None:
      if run_id is None:
        raise ValueError("resuming a W&B run needs its run_id")
      init_kwargs["resume_from"] = f"{run_id}?_step={resume_after + 1}"
    elif run_id is not None:
      init_kwargs["id"] = run_id
    self._run = wandb.init(project=project, config=dict(config or {}),
                           **init_kwargs)

  def write(self, record: Mapping[str, Any]) -> None:
    """Logs the record's numeric values at step ``record["round"]``."""
    self._run.log({scalar_tag(k): v for k, v in numeric_items(record)},
                  step=int(record[STEP_KEY]))

  def flush(self) -> None:
    """W&B sends in the background; nothing to do."""

  def truncate_after(self, last_round: int,
                     history: Sequence[Mapping[str, Any]] | None = None
                     ) -> None:
    """Not possible inside a W&B run: pass ``resume_after`` instead."""
    del history
    raise NotImplementedError(
        "W&B history cannot be truncated from inside a run; construct the "
        f"WandbWriter with resume_after={last_round} (W&B run rewind)")

  def close(self) -> None:
    """Finishes the W&B run."""
    self._run.finish()
