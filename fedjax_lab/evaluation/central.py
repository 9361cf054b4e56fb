"""Central evaluation: one model over pre-batched examples, exactly.

:func:`build_evaluator` scores the global model on the test (or train)
examples of every client pooled, padding-proof: the number the runner records
as ``eval_<metric>`` each evaluation round.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.models import base as model_base


def build_evaluator(model: model_base.Model
                    ) -> Callable[[Any, Mapping[str, np.ndarray], np.ndarray],
                                  dict[str, float]]:
  """Returns ``evaluate(params, features, mask) -> {metric: value}``.

  ``features`` holds ``[num_batches, B, ...]`` arrays and ``mask`` is
  ``[num_batches, B]`` (see ``data.cohort.make_eval_batches``). Each metric is
  ``sum(value_sum) / sum(weight)`` over the unmasked examples, so padding never
  changes it. Batches run from a Python loop over one jitted batch function:
  on XLA:CPU a conv model inside ``lax.scan``/``lax.map`` is many times slower.
  """

  @jax.jit
  def batch_sums(params, batch, mask):
    return model_base.eval_sums(model, params, batch, mask)

  @jax.jit
  def accumulate(total, sums):
    return jax.tree.map(jnp.add, total, sums)

  def evaluate(params, features, mask):
    total = None
    for i in range(mask.shape[0]):
      batch = {k: v[i] for k, v in features.items()}
      sums = batch_sums(params, batch, mask[i])
      total = sums if total is None else accumulate(total, sums)
    if total is None:
      raise ValueError("evaluation set is empty.")
    total = jax.device_get(total)
    return {name: float(v) / max(float(n), 1e-12)
            for name, (v, n) in total.items()}

  return evaluate


# id(model) -> (weak reference to the model, its evaluator).
_SHARED: dict[int, tuple[weakref.ref, Callable]] = {}


def shared_evaluator(model: model_base.Model
                     ) -> Callable[[Any, Mapping[str, np.ndarray], np.ndarray],
                                   dict[str, float]]:
  """:func:`build_evaluator` of ``model``, built (and compiled) once per
  model object: sweep members sharing one model share its compilations."""
  entry = _SHARED.get(id(model))
  if entry is not None and entry[0]() is model:
    return entry[1]
  for key in [k for k, (ref, _) in _SHARED.items() if ref() is None]:
    del _SHARED[key]
  evaluate = build_evaluator(model)
  _SHARED[id(model)] = (weakref.ref(model), evaluate)
  return evaluate
