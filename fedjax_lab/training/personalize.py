"""The runner's personalization evaluation, from the ``personalization`` block.

Wang et al., "Federated Evaluation of On-device Personalization", arXiv 2019:
every evaluated client fine-tunes the global model on its train split and is
scored on its test split (:mod:`fedjax_lab.engine.personalization` does the
vectorised work). This module picks the clients, builds the evaluator once
(so it compiles once) and turns a result into what the run records.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import numpy as np

from fedjax_lab.algorithms.optimizers import build_optimizer
from fedjax_lab.engine import personalization

# Mixed into the seed for the fixed subset of evaluated clients.
_CLIENT_SUBSET_SALT = 0x9E25


@dataclasses.dataclass(frozen=True)
class PersonalizationRunner:
  """Fine-tune-and-evaluate for a run.

  Attributes:
    every: evaluate every this many rounds (0: only after the last round).
    evaluate: ``params -> PersonalizationResult``.
  """

  every: int
  evaluate: Callable[[Any], personalization.PersonalizationResult]

  def __call__(self, params) -> personalization.PersonalizationResult:
    return self.evaluate(params)


def build_runner(config, model, dataset) -> PersonalizationRunner:
  """The ``personalization`` block of ``config`` as a runner.

  ``max_clients`` > 0 evaluates a fixed random subset of that many training
  clients (the same every time); fine-tuning uses SGD at
  ``learning_rate`` for ``num_epochs`` epochs of ``batch_size``. Memory grows
  with ``clients_per_chunk x eval_batch_size`` examples in flight (a CNN's
  activations are ~1 MB per MNIST example): keep both small.
  """
  block = config.personalization
  evaluator = personalization.build_personalization_evaluator(
      model, build_optimizer("sgd", block.learning_rate, {}),
      num_epochs=block.num_epochs, batch_size=block.batch_size,
      eval_batch_size=block.get("eval_batch_size", 32),
      clients_per_chunk=block.get("clients_per_chunk", 16),
      shuffle_seed=config.seed)
  population = dataset.train.num_clients
  clients = None
  if block.max_clients and block.max_clients < population:
    clients = np.sort(np.random.default_rng(
        [config.seed, _CLIENT_SUBSET_SALT]).choice(
            population, block.max_clients, replace=False))
  rng = jax.random.fold_in(jax.random.key(config.seed), _CLIENT_SUBSET_SALT)
  return PersonalizationRunner(
      every=block.get("every", 0),
      evaluate=lambda params: evaluator(params, dataset.train, dataset.test,
                                        clients, rng=rng))


def describe(result: personalization.PersonalizationResult
             ) -> dict[str, Any]:
  """The distribution summary plus per-client accuracies (for plots)."""
  out: dict[str, Any] = dict(result.summary())
  out["client_ids"] = [str(c) for c in result.client_ids]
  for name, values in result.global_metrics.items():
    out[f"global_{name}_per_client"] = np.asarray(values).tolist()
  for name, values in result.personalized_metrics.items():
    out[f"personalized_{name}_per_client"] = np.asarray(values).tolist()
  return out
