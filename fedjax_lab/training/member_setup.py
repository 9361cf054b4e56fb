"""Which sweep members can share one compiled program, and how to build it.

Members of a sweep differ in some config keys. Each key falls in one of
three kinds:

* **traced** (:data:`TRACED_KEYS`): numbers the compiled round uses, which
  become one slice of a ``[K]`` array per member (client and server learning
  rates and the optimizers' numeric ``hparams``, FedProx's ``mu``, the DP
  clip norm and noise multiplier, adaptive clipping's settings, DP-FTRL's
  momentum);
* **host** (:data:`HOST_KEYS`): values the host uses around the round, kept
  per member (seeds for the model init, data order, cohort sampling and DP
  noise; the number of rounds; evaluation, checkpoint and sink settings; the
  privacy budget, delta and accountant);
* everything else changes shapes or code (model, dataset, algorithm, batch
  size, cohort size, local epochs, optimizer names, the DP mechanism, ...):
  members differing there are in different programs.

:func:`group_members` partitions members into as few programs as possible;
:func:`member_hparams` and :func:`make_algorithm_fn` build one program's
``[K]`` hyperparameters and the ``hparams -> algorithm`` function
:func:`fedjax_lab.engine.members.build_member_round` compiles.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedjax_lab.algorithms import base as alg_base
from fedjax_lab.engine import members as members_lib
from fedjax_lab.training import defaults
from fedjax_lab.training import setup

__all__ = ["HOST_KEYS", "NotVectorizable", "TRACED_KEYS",
           "check_traceable", "group_members", "make_algorithm_fn",
           "member_hparams", "program_signature"]

# Numbers the round uses that may differ between members of one program
# (fnmatch patterns over dotted config keys).
TRACED_KEYS = (
    "client.learning_rate", "server.learning_rate", "client.hparams.*",
    "server.hparams.*", "fedprox.mu", "privacy.clip_norm",
    "privacy.noise_multiplier", "privacy.adaptive.target_quantile",
    "privacy.adaptive.clip_learning_rate",
    "privacy.adaptive.clipped_count_stddev", "privacy.ftrl.momentum")
# Values used on the host only (per member; the program does not see them).
HOST_KEYS = (
    "seed", "num_rounds", "eval_every", "eval_max_examples",
    "eval_train_split", "eval_batch_size", "checkpoint_every",
    "checkpoints_to_keep", "metrics_sinks", "wandb_project", "max_seconds",
    "privacy.target_epsilon", "privacy.calibrate", "privacy.delta",
    "privacy.accountant", "privacy.noise_seed", "privacy.release_diagnostics",
    "privacy.accounting_population")

PyTree = Any


class NotVectorizable(ValueError):
  """Members that cannot share one program after all: something their
  algorithm is built from uses a differing number in Python. Run them as
  programs of one member each (separate runs)."""


def not_vectorizable(keys: Sequence[str], detail: str) -> NotVectorizable:
  """The error naming the differing keys."""
  return NotVectorizable(
      f"the members differ in {sorted(keys)}, and something their algorithm "
      "is built from uses one of them as a Python number (a check or a "
      "branch), so they cannot be members of one program; run them as "
      f"separate runs. JAX said: {detail.splitlines()[0]}")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  """``{dotted key: leaf}`` of a nested dict / ConfigDict."""
  if isinstance(tree, (dict, ml_collections.ConfigDict)):
    out = {}
    for key, value in (tree.items()):
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def _matches(key: str, patterns: Sequence[str]) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def program_signature(config: ml_collections.ConfigDict) -> str:
  """What a member's compiled program depends on: the config without its
  traced numbers and host keys (JSON). Members with equal signatures can
  train as one program."""
  flat = _flatten(config.to_dict())
  kept = {key: value for key, value in flat.items()
          if not _matches(key, HOST_KEYS) and not (
              _matches(key, TRACED_KEYS) and _is_number(value))}
  return json.dumps(kept, sort_keys=True, default=repr)


def group_members(configs: Sequence[ml_collections.ConfigDict],
                  max_members: int = 0) -> list[list[int]]:
  """Member indices partitioned into programs: equal signatures together,
  in order of first appearance, each group split into chunks of at most
  ``max_members`` (0: no cap) of nearly equal size."""
  by_signature: dict[str, list[int]] = {}
  for index, config in enumerate(configs):
    by_signature.setdefault(program_signature(config), []).append(index)
  groups = []
  for indices in by_signature.values():
    chunks = (-(-len(indices) // max_members)) if max_members > 0 else 1
    size = -(-len(indices) // chunks)
    groups += [indices[i:i + size] for i in range(0, len(indices), size)]
  return groups


def _traced_values(exp: setup.Experiment) -> dict[str, float]:
  """The traceable numbers of one member as its run uses them: its config's
  and, for a DP run, its plan's (the noise multiplier after calibration)."""
  flat = _flatten(exp.config.to_dict())
  values = {key: float(value) for key, value in flat.items()
            if _matches(key, TRACED_KEYS) and _is_number(value)
            and not key.startswith("privacy.")}
  if exp.config.algorithm != "fedprox":
    values.pop("fedprox.mu", None)
  plan = exp.privacy
  if plan is not None:
    values["privacy.clip_norm"] = float(plan.clip_norm)
    values["privacy.noise_multiplier"] = float(plan.noise_multiplier)
    for block in ("adaptive", "ftrl"):
      for name, value in dict(plan.settings.get(block, {}) or {}).items():
        key = f"privacy.{block}.{name}"
        if _matches(key, TRACED_KEYS) and _is_number(value):
          values[key] = float(value)
  return values


def member_hparams(experiments: Sequence[setup.Experiment]
                   ) -> dict[str, np.ndarray]:
  """``{dotted key: [K] float32}`` of the traced numbers that differ between
  the members (numbers every member shares stay Python constants of the
  program, exactly as in a separate run). Empty when the members differ in
  host keys only."""
  per_member = [_traced_values(exp) for exp in experiments]
  keys = sorted(set().union(*per_member))
  missing = [key for key in keys if any(key not in m for m in per_member)]
  if missing:
    raise ValueError(f"members disagree on which of {missing} they have; "
                     "they cannot share one program.")
  return {key: np.asarray([m[key] for m in per_member], np.float32)
          for key in keys if len({m[key] for m in per_member}) > 1}


def make_algorithm_fn(exp: setup.Experiment) -> members_lib.MakeAlgorithm:
  """``hparams -> algorithm``: ``exp``'s algorithm rebuilt with the keys of
  ``hparams`` (traced scalars, one member's slice) replacing its config's and
  its privacy plan's values. ``exp`` is any member of the program (they
  differ only in these keys and host keys)."""
  num_clients = exp.dataset.train.num_clients

  def make_algorithm(hparams: dict[str, Any]) -> alg_base.FederatedAlgorithm:
    config = ml_collections.ConfigDict(exp.config.to_dict(), type_safe=False)
    plan = exp.privacy
    settings = None
    for key, value in hparams.items():
      if key.startswith("_"):  # the member axis of members alike in numbers
        continue
      if not key.startswith("privacy."):
        defaults.set_dotted(config, key, value)
        continue
      if plan is None:
        raise ValueError(f"{key} differs between members of a run without "
                         "DP.")
      if key == "privacy.clip_norm":
        plan = dataclasses.replace(plan, clip_norm=value)
      elif key == "privacy.noise_multiplier":
        plan = dataclasses.replace(plan, spec=dataclasses.replace(
            plan.spec, noise_multiplier=value))
      else:
        if settings is None:
          settings = json.loads(json.dumps(
              plan.settings.to_dict() if hasattr(plan.settings, "to_dict")
              else dict(plan.settings), default=repr))
        _, block, name = key.split(".")
        settings.setdefault(block, {})[name] = value
    if settings is not None:
      plan = dataclasses.replace(plan, settings=settings)
    return setup.build_algorithm(config, exp.model, plan, num_clients,
                                 exp.dataset)

  return make_algorithm


def check_traceable(members: Sequence[setup.Experiment],
                    hparams: dict[str, np.ndarray]) -> None:
  """Checks that the members' server states have one structure, and builds
  the first member's algorithm and server state with every key of
  ``hparams`` traced (abstractly, nothing runs).

  Raises:
    NotVectorizable: naming the keys the algorithm's factory needs as Python
      numbers (checked one by one), or states of different structures.
  """
  exp = members[0]
  make_algorithm = make_algorithm_fn(exp)
  params = jax.eval_shape(exp.model.init, jax.random.key(0))
  structures = {str(jax.tree.structure(jax.eval_shape(
      member_exp.algorithm.server_init, params))) for member_exp in members}
  if len(structures) > 1:
    raise NotVectorizable(
        f"the members differ in {sorted(k for k in hparams if k[0] != '_')} "
        "and their server states differ in structure (e.g. momentum 0, "
        "which optax keeps no trace for, beside momentum > 0), so they "
        "cannot be stacked as members of one program; run them as separate "
        "runs.")
  traced = [key for key in hparams if not key.startswith("_")]
  failing, detail = [], ""
  for key in traced:
    try:
      jax.eval_shape(lambda value, key=key: make_algorithm(
          {key: value}).server_init(params), jnp.float32(1.0))
    except (jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError,
            jax.errors.TracerIntegerConversionError) as e:
      failing.append(key)
      detail = str(e)
  if failing:
    raise not_vectorizable(failing, detail)


def hparams_as_arrays(hparams: dict[str, np.ndarray]) -> dict[str, Any]:
  """The ``[K]`` hyperparameters as device arrays for the member round."""
  return {key: jnp.asarray(value) for key, value in hparams.items()}
