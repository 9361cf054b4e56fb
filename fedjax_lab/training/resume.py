"""Run checkpoints (orbax) and the rules for resuming a run in its workdir.

A checkpoint holds everything the next round depends on: the server state
(model, server optimizer, aggregator state such as an adaptive clip norm,
algorithm statistics such as SCAFFOLD's c or adaptive FedProx's mu, DP-FTRL's
tree state), every client's persistent state (SCAFFOLD control variates,
error-feedback residuals), and a small JSON record (rounds done, the last
evaluation, the privacy ledger, the config). Nothing else is needed: the
cohort of round ``t``, its batches and every random key are pure functions of
``(seed, t)``, so a resumed run repeats exactly the rounds it would have run.

Checkpoints live in ``workdir/checkpoints/<rounds done>/``; orbax writes a step
to a temporary folder and renames it when complete, and the newest
``max_to_keep`` are kept. Restoring tries the newest first and falls back to
older ones when a step cannot be read (a corrupt or partial write).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
CHECKPOINT_DIR = "checkpoints"
# Config keys a resumed run may change: they do not alter what a round
# computes (how long to run, how often to evaluate or save, where to log).
RESUMABLE_CHANGES = frozenset({
    "num_rounds", "max_seconds", "eval_every", "checkpoint_every",
    "checkpoints_to_keep", "metrics_sinks", "wandb_project"})


class ResumeError(ValueError):
  """The workdir cannot be resumed with this config; the message says why."""


def _is_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype,
                                                         jax.dtypes.prng_key)


def _to_storable(tree: PyTree) -> PyTree:
  """Host numpy leaves; typed PRNG keys become their raw key data."""
  return jax.tree.map(
      lambda leaf: np.asarray(jax.random.key_data(leaf) if _is_key(leaf)
                              else leaf), jax.device_get(tree))


def _from_storable(stored: PyTree, like: PyTree) -> PyTree:
  def back(value, template):
    if _is_key(template):
      return jax.random.wrap_key_data(np.asarray(value),
                                      impl=jax.random.key_impl(template))
    if isinstance(template, np.ndarray):
      return np.asarray(value, template.dtype)
    return jnp.asarray(value, jnp.asarray(template).dtype)
  return jax.tree.map(back, stored, like)


@dataclasses.dataclass
class RunCheckpoints:
  """The checkpoints of one run (``workdir/checkpoints``), newest kept.

  Attributes:
    directory: where the steps are written (one folder per rounds-done).
    max_to_keep: how many of the newest checkpoints survive.
  """

  directory: str
  max_to_keep: int = 3

  def __post_init__(self):
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    self._ocp = ocp
    self.directory = os.path.abspath(self.directory)
    self._manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max(self.max_to_keep, 1), create=True,
            enable_async_checkpointing=False))

  def steps(self) -> list[int]:
    """Rounds-done values of the complete checkpoints, oldest first."""
    return sorted(self._manager.all_steps())

  def save(self, rounds_done: int, state: PyTree, record: dict[str, Any]
           ) -> None:
    """Writes the state after ``rounds_done`` rounds (synchronously); a
    checkpoint of that round already on disk is left as it is."""
    ocp = self._ocp
    if rounds_done in self._manager.all_steps():
      return
    self._manager.save(rounds_done, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_storable(state)),
        record=ocp.args.JsonSave(record)), force=True)
    self._manager.wait_until_finished()

  def restore_latest(self, like: PyTree,
                     warn: Callable[[str], None] = logging.warning
                     ) -> tuple[int, PyTree, dict[str, Any]] | None:
    """``(rounds_done, state, record)`` of the newest readable checkpoint.

    ``like`` is a state with the run's structure (e.g. freshly initialised).
    A checkpoint that fails to load is reported through ``warn`` and the
    previous one is tried; ``None`` when there is none.
    """
    ocp = self._ocp
    template = _to_storable(like)
    for step in reversed(self.steps()):
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

  def latest_record(self) -> dict[str, Any] | None:
    """The JSON record of the newest checkpoint (None when there is none)."""
    ocp = self._ocp
    for step in reversed(self.steps()):
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
    self._manager.close()


def config_differences(saved: dict[str, Any], current: dict[str, Any],
                       prefix: str = "") -> list[str]:
  """Dotted keys whose values differ between two config dicts."""
  keys = sorted(set(saved) | set(current))
  out = []
  for key in keys:
    a, b = saved.get(key, "<missing>"), current.get(key, "<missing>")
    name = f"{prefix}{key}"
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_differences(a, b, name + ".")
    elif a != b:
      out.append(name)
  return out


def check_resumable(saved_config_path: str, current: dict[str, Any]) -> None:
  """Raises ResumeError if the run in the workdir used a different setup.

  Only :data:`RESUMABLE_CHANGES` may differ (and ``num_rounds`` only when the
  noise was not calibrated to it, since calibration depends on it).
  """
  with open(saved_config_path) as f:
    saved = json.load(f)
  inactive = _inactive_blocks(saved) & _inactive_blocks(current)
  changed = [k for k in config_differences(saved, current)
             if k.split(".", 1)[0] not in inactive]
  allowed = set(RESUMABLE_CHANGES)
  if current.get("privacy", {}).get("calibrate"):
    allowed.discard("num_rounds")
  blocking = [k for k in changed if k not in allowed]
  if blocking:
    shown = ", ".join(
        f"{k}: {_lookup(saved, k)!r} -> {_lookup(current, k)!r}"
        for k in blocking[:6])
    raise ResumeError(
        f"the run in {os.path.dirname(saved_config_path)} was started with a "
        f"different config ({shown}{', ...' if len(blocking) > 6 else ''}). "
        "Resume it with its own config, or pass a new --workdir. Keys a "
        f"resumed run may change: {', '.join(sorted(allowed))}.")


# Config blocks that only matter for one algorithm.
_ALGORITHM_BLOCKS = ("fedprox", "scaffold", "mime", "reptile",
                     "agnostic_fedavg", "hypcluster")


def _inactive_blocks(config: dict[str, Any]) -> set[str]:
  """Blocks that cannot affect the run: other algorithms' blocks, and the
  compression / personalization blocks while switched off. Their defaults
  may change between versions without blocking a resume."""
  inactive = {b for b in _ALGORITHM_BLOCKS if b != config.get("algorithm")}
  if config.get("compression", {}).get("method", "none") == "none":
    inactive.add("compression")
  if not config.get("personalization", {}).get("enabled", False):
    inactive.add("personalization")
  return inactive


def _lookup(config: dict[str, Any], dotted: str) -> Any:
  value: Any = config
  for part in dotted.split("."):
    if not isinstance(value, dict) or part not in value:
      return "<missing>"
    value = value[part]
  return value
