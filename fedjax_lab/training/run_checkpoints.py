"""A run's checkpoints: :class:`RunCheckpoints`, the orbax manager of
``workdir/checkpoints/<rounds done>/``.

A checkpoint holds everything the next round depends on: the server state
(model, server optimizer, aggregator state such as an adaptive clip norm,
algorithm statistics such as SCAFFOLD's c or adaptive FedProx's mu, DP-FTRL's
tree state), every client's persistent state (SCAFFOLD control variates,
error-feedback residuals), and a small JSON record (rounds done, the last
evaluation, the privacy ledger, the config it belongs to). Nothing else is
needed: the cohort of round ``t``, its batches and every random key are pure
functions of ``(seed, t)``, so a resumed run repeats exactly the rounds it
would have run. Orbax writes a step to a temporary folder and renames it when
complete; the newest ``max_to_keep`` are kept. Restoring tries the newest
first and falls back to older ones when a step cannot be read (it is moved
aside as ``unreadable-<step>-<n>``).

Opening, locking, resuming and setting aside the run around these
checkpoints is :mod:`fedjax_lab.training.workdir`.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from typing import Any, Callable, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.training.state_files import is_prng_key

PyTree = Any


def _to_storable(tree: PyTree) -> PyTree:
  """Host numpy leaves; typed PRNG keys become their raw key data."""
  return jax.tree.map(
      lambda leaf: np.asarray(jax.random.key_data(leaf) if is_prng_key(leaf)
                              else leaf), jax.device_get(tree))


def _from_storable(stored: PyTree, like: PyTree) -> PyTree:
  def back(value, template):
    if is_prng_key(template):
      return jax.random.wrap_key_data(np.asarray(value),
                                      impl=jax.random.key_impl(template))
    if isinstance(template, np.ndarray):
      return np.asarray(value, template.dtype)
    return jnp.asarray(value, jnp.asarray(template).dtype)
  return jax.tree.map(back, stored, like)


_ERRNO_BY_MESSAGE = (("No space left", errno.ENOSPC),
                     ("Disk quota exceeded", errno.EDQUOT),
                     ("Read-only file system", errno.EROFS),
                     ("Permission denied", errno.EACCES))


def _as_os_error(error: Exception, path: str) -> Exception:
  """Orbax/tensorstore report filesystem errors as other types; those become
  the ``OSError`` they stand for (others are returned as they are)."""
  if isinstance(error, OSError):
    return error
  for text, number in _ERRNO_BY_MESSAGE:
    if text in str(error):
      return OSError(number, os.strerror(number), path)
  return error


@dataclasses.dataclass
class RunCheckpoints:
  """The checkpoints of one run (``workdir/checkpoints``), newest kept.

  Attributes:
    directory: where the steps are written (one folder per rounds-done).
    max_to_keep: how many of the newest checkpoints survive.
    config: the run's config; every saved record carries it (``"config"``)
      so that a resume can be checked against it.
  """

  directory: str
  max_to_keep: int = 3
  config: Mapping[str, Any] | None = None

  def __post_init__(self):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.abspath(self.directory)
    options = dict(max_to_keep=max(self.max_to_keep, 1), create=True,
                   enable_async_checkpointing=False)
    if jax.process_count() > 1:
      # A multi-process run: only the coordinator keeps checkpoints (its
      # host copy of the state is the whole state), without waiting on the
      # other processes at orbax's barriers.
      os.makedirs(self.directory, exist_ok=True)
      options.update(create=False, multiprocessing_options=(
          ocp.options.MultiprocessingOptions(
              primary_host=jax.process_index(),
              active_processes={jax.process_index()})))
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(**options))

  def steps(self) -> list[int]:
    """Rounds-done values of the complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, rounds_done: int, state: PyTree, record: dict[str, Any]
           ) -> None:
    """Writes the state after ``rounds_done`` rounds (synchronously); a
    checkpoint of that round already on disk is left as it is. A failed
    write (e.g. a full disk, raised as ``OSError``) leaves the earlier
    checkpoints as they were."""
    ocp = self._ocp
    if rounds_done in self._manager.all_steps():
      return
    if self.config is not None and "config" not in record:
      record = {**record, "config": self.config}
    try:
      self._manager.save(rounds_done, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_to_storable(state)),
          record=ocp.args.JsonSave(record)), force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      converted = _as_os_error(e, os.path.join(self.directory,
                                               str(rounds_done)))
      if converted is e:
        raise
      raise converted from e

  def restore_latest(self, like: PyTree,
                     warn: Callable[[str], None] = logging.warning,
                     max_step: int | None = None
                     ) -> tuple[int, PyTree, dict[str, Any]] | None:
    """``(rounds_done, state, record)`` of the newest readable checkpoint
    (at most ``max_step`` rounds, when given).

    ``like`` is a state with the run's structure (e.g. freshly initialised).
    A checkpoint that fails to load is reported through ``warn``, moved to
    ``unreadable-<step>-<n>`` and the previous one is tried; ``None`` when
    there is none.
    """
    ocp = self._ocp
    template = _to_storable(like)
    for step in reversed(self.steps()):
      if max_step is not None and step > max_step:
        continue
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template),
            record=ocp.args.JsonRestore()))
        state = _from_storable(restored.state, like)
      except Exception as e:  # pylint: disable=broad-except
        kept = self._set_aside(step)
        warn(f"checkpoint {os.path.join(self.directory, str(step))} could "
             f"not be read ({type(e).__name__}: {str(e)[:200]}); moved it to "
             f"{kept} and trying the previous one.")
        continue
      return step, state, dict(restored.record)
    return None

  def latest_record(self, max_step: int | None = None
                    ) -> dict[str, Any] | None:
    """The JSON record of the newest checkpoint (at most ``max_step``
    rounds, when given) whose record reads; None when there is none."""
    ocp = self._ocp
    for step in reversed(self.steps()):
      if max_step is not None and step > max_step:
        continue
      try:
        return dict(self._manager.restore(step, args=ocp.args.Composite(
            record=ocp.args.JsonRestore())).record)
      except Exception:  # pylint: disable=broad-except
        continue
    return None

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable step out of the way (kept for inspection)."""
    source = os.path.join(self.directory, str(step))
    n = 1
    while os.path.exists(target := os.path.join(
        self.directory, f"unreadable-{step}-{n}")):
      n += 1
    os.replace(source, target)
    self._manager.reload()
    return target

  def close(self) -> None:
    """Closes the checkpoint manager."""
    self._manager.close()
