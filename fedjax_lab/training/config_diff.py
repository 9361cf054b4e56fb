"""Comparing two run configs (as dicts): the dotted keys that differ, the
blocks that cannot affect a run, and the keys a resumed run may change.

:func:`fedjax_lab.training.workdir.check_resumable` refuses a resume with
them.
"""

from __future__ import annotations

from typing import Any, Mapping

from fedjax_lab import algorithms

# Config keys a resumed run may change: they do not alter what a round
# computes (how long to run, how often to evaluate or save, where to log).
RESUMABLE_CHANGES = frozenset({
    "num_rounds", "max_seconds", "eval_every", "checkpoint_every",
    "checkpoints_to_keep", "metrics_sinks", "wandb_project"})


def config_differences(saved: Mapping[str, Any], current: Mapping[str, Any],
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


# Keys added to the schema after runs were started, with the value that
# reproduces what those runs did: a saved config without the key resumes
# under a current config holding this value.
ADDED_KEYS = {"client.shuffle": True, "client.step_padding": "bucketed",
              "client_state_store": "memory"}


def _algorithm_block(name: Any) -> str | None:
  """The config block of registered algorithm ``name`` (None if it has none
  or is not registered)."""
  try:
    return algorithms.get(name).block
  except (ValueError, KeyError, TypeError):
    return None


def inactive_blocks(config: Mapping[str, Any]) -> set[str]:
  """Blocks that cannot affect the run: other algorithms' blocks (from the
  registry: ``mimelite`` uses the ``mime`` block), and the compression /
  personalization blocks while switched off. Their defaults may change
  between versions without blocking a resume."""
  active = _algorithm_block(config.get("algorithm"))
  inactive = {block for block in algorithms.config_blocks()
              if block != active}
  if config.get("compression", {}).get("method", "none") == "none":
    inactive.add("compression")
  if not config.get("personalization", {}).get("enabled", False):
    inactive.add("personalization")
  return inactive


def added_key_defaults(saved: Mapping[str, Any], current: Mapping[str, Any],
                       changed: list[str]) -> list[str]:
  """``changed`` without the :data:`ADDED_KEYS` that ``saved`` predates and
  ``current`` holds at their reproducing value."""
  return [key for key in changed
          if not (key in ADDED_KEYS and
                  dotted_value(saved, key) == "<missing>" and
                  dotted_value(current, key) == ADDED_KEYS[key])]


def dotted_value(config: Mapping[str, Any], dotted: str) -> Any:
  """``config``'s value at a dotted key (``"<missing>"`` when absent)."""
  value: Any = config
  for part in dotted.split("."):
    if not isinstance(value, dict) or part not in value:
      return "<missing>"
    value = value[part]
  return value
