"""What a personalization evaluation reports: :class:`PersonalizationResult`.

The per-client metrics of the global model and of each client's fine-tuned
copy (computed by :mod:`fedjax_lab.evaluation.personalization`) and their
distribution over clients (:meth:`PersonalizationResult.summary`, what a run
records every evaluation). Split from the protocol to keep both modules
short.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

# Metrics whose smaller values are better; every other metric (accuracy, ...)
# is better when larger.
_LOWER_IS_BETTER_WORDS = ("loss", "perplexity")


def lower_is_better(metric_name: str) -> bool:
  """Whether smaller values of ``metric_name`` are better (losses)."""
  return any(word in metric_name for word in _LOWER_IS_BETTER_WORDS)


@dataclasses.dataclass(frozen=True)
class PersonalizationResult:
  """Per-client metrics of the global and the fine-tuned model.

  ``K`` = clients evaluated (clients without test examples are skipped and
  only counted). Every array is ``[K]``, in the order of the requested client
  indices.

  Attributes:
    client_ids: the clients' ids (shared by the train and test stores).
    client_indices: positions in the train store.
    num_train_examples: examples each client fine-tuned on (its train split).
    num_test_examples: examples in each client's test split.
    num_fine_tune_steps: local optax steps each client took.
    global_metrics: metric name -> the global model's value per client (e.g.
      ``accuracy`` as a fraction, ``loss`` in nats per example/token).
    personalized_metrics: the same for the fine-tuned models.
    metric_weights: metric name -> what the metric averages over per client
      (test examples; valid tokens for sequence metrics).
    num_skipped_no_test_examples: requested clients with no test examples
      (or absent from the test store).
  """

  client_ids: np.ndarray
  client_indices: np.ndarray
  num_train_examples: np.ndarray
  num_test_examples: np.ndarray
  num_fine_tune_steps: np.ndarray
  global_metrics: Mapping[str, np.ndarray]
  personalized_metrics: Mapping[str, np.ndarray]
  metric_weights: Mapping[str, np.ndarray]
  num_skipped_no_test_examples: int

  @property
  def num_clients(self) -> int:
    """Number of clients evaluated ``K``."""
    return len(self.client_ids)

  @property
  def global_accuracy(self) -> np.ndarray:
    """``[K]`` accuracy of the global model on each client's test split."""
    return self.global_metrics["accuracy"]

  @property
  def personalized_accuracy(self) -> np.ndarray:
    """``[K]`` accuracy of each client's fine-tuned model."""
    return self.personalized_metrics["accuracy"]

  @property
  def global_loss(self) -> np.ndarray:
    """``[K]`` mean test loss of the global model per client."""
    return self.global_metrics["loss"]

  @property
  def personalized_loss(self) -> np.ndarray:
    """``[K]`` mean test loss of each client's fine-tuned model."""
    return self.personalized_metrics["loss"]

  def summary(self) -> dict[str, float]:
    """The distribution over clients, before (``global_``) and after
    (``personalized_``) fine-tuning, for every metric ``m``:

    * ``{prefix}_{m}_mean_example_weighted``: pooled over all test examples
      (tokens), i.e. weighted by :attr:`metric_weights`;
    * ``{prefix}_{m}_mean_client_uniform``: the plain mean over clients;
    * ``{prefix}_{m}_median``;
    * the tail on the bad side: ``{prefix}_{m}_p10`` (10th percentile) and
      ``{prefix}_{m}_worst`` (minimum) for accuracies, ``{prefix}_{m}_p90``
      and ``{prefix}_{m}_worst`` (maximum) for losses;
    * ``fraction_clients_improved_{m}`` / ``fraction_clients_worse_{m}``:
      clients whose fine-tuned model is strictly better / worse than the
      global one (ties count in neither).

    Percentiles use numpy's default (linear interpolation). Also
    ``num_clients_evaluated`` and ``num_clients_skipped_no_test_examples``.
    """
    out = {"num_clients_evaluated": float(self.num_clients),
           "num_clients_skipped_no_test_examples":
               float(self.num_skipped_no_test_examples)}
    if self.num_clients == 0:
      return out
    for name in self.global_metrics:
      weights = np.asarray(self.metric_weights[name], np.float64)
      lower = lower_is_better(name)
      for prefix, metrics in (("global", self.global_metrics),
                              ("personalized", self.personalized_metrics)):
        values = np.asarray(metrics[name], np.float64)
        key = f"{prefix}_{name}"
        out[f"{key}_mean_example_weighted"] = float(
            np.sum(values * weights) / max(np.sum(weights), 1e-12))
        out[f"{key}_mean_client_uniform"] = float(np.mean(values))
        out[f"{key}_median"] = float(np.median(values))
        if lower:
          out[f"{key}_p90"] = float(np.percentile(values, 90))
          out[f"{key}_worst"] = float(np.max(values))
        else:
          out[f"{key}_p10"] = float(np.percentile(values, 10))
          out[f"{key}_worst"] = float(np.min(values))
      before = np.asarray(self.global_metrics[name])
      after = np.asarray(self.personalized_metrics[name])
      improved = after < before if lower else after > before
      worse = after > before if lower else after < before
      out[f"fraction_clients_improved_{name}"] = float(np.mean(improved))
      out[f"fraction_clients_worse_{name}"] = float(np.mean(worse))
    return out
