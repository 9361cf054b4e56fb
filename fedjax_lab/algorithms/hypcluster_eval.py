"""HypCluster's evaluation: every client scored with its best cluster model.

Mansour, Mohri, Ro & Suresh 2020 (Section 3) as FedJAX evaluates
``hyp_cluster``: each client is assigned to the cluster model with the lowest
mean loss on its training examples, and its test examples are scored by that
model. :func:`client_batches` tags padded batches with their client,
:func:`build_cluster_losses` gives every client's loss under every cluster
and :func:`build_hypcluster_evaluator` the metrics. The algorithm itself is
:mod:`fedjax_lab.algorithms.hypcluster` (which re-exports these names): its
k-means-like initialisation uses the losses and its recipe's evaluator (what
a run records) the metrics, so they stay in the algorithms layer; the
one-call evaluation of cluster models on a pair of stores is
:func:`fedjax_lab.evaluation.clusters.hypcluster_evaluate`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.algorithms import base
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.models import base as model_base

_EVAL_SUBSAMPLE_SALT = 0x4C05


def num_clusters_of(cluster_params: base.PyTree) -> int:
  """``K``, the leading axis shared by every leaf of stacked cluster params."""
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(cluster_params)}
  if len(sizes) != 1:
    raise ValueError(f"cluster params need one leading axis K, got {sizes}.")
  return sizes.pop()


class ClientBatches(NamedTuple):
  """Padded batches tagged by client: ``features`` name -> ``[num_batches, B,
  ...]``, float32 ``mask`` and int32 ``owner`` ``[num_batches, B]`` (the
  example's client as a position in the reference store; 0 in padding) and
  ``num_clients`` of the reference store."""

  features: dict[str, np.ndarray]
  mask: np.ndarray
  owner: np.ndarray
  num_clients: int


def client_batches(store: ClientStore, batch_size: int,
                   reference: ClientStore | None = None,
                   max_examples: int | None = None) -> ClientBatches:
  """Batches of ``store`` tagged with client positions in ``reference``.

  Args:
    store: the examples (e.g. the test split).
    batch_size: examples per batch ``B``.
    reference: the store whose client order ``owner`` refers to (e.g. the
      train split), matched by client id; default ``store`` itself.
    max_examples: evaluate a fixed random subset of this many examples.

  Raises:
    ValueError: a client of ``store`` missing from ``reference``.
  """
  reference = store if reference is None else reference
  positions = np.arange(store.num_clients)
  if reference is not store and not np.array_equal(reference.client_ids,
                                                   store.client_ids):
    where = {str(c): i for i, c in enumerate(reference.client_ids)}
    missing = [str(c) for c in store.client_ids if str(c) not in where]
    if missing:
      raise ValueError(f"{len(missing)} client(s) of the store are not in "
                       f"the reference, e.g. {missing[0]!r}.")
    positions = np.asarray([where[str(c)] for c in store.client_ids])
  owner = np.repeat(positions, store.client_sizes).astype(np.int32)
  rows = np.arange(store.num_examples)
  if max_examples is not None and max_examples < len(rows):
    rows = np.sort(np.random.default_rng(
        [_EVAL_SUBSAMPLE_SALT, len(rows)]).choice(len(rows), max_examples,
                                                  replace=False))
  num_batches = max(-(-len(rows) // batch_size), 1)
  padded = num_batches * batch_size

  def pad(column):
    out = np.zeros((padded,) + column.shape[1:], column.dtype)
    out[:len(rows)] = column[rows]
    return out.reshape((num_batches, batch_size) + column.shape[1:])

  mask = np.zeros(padded, np.float32)
  mask[:len(rows)] = 1.0
  return ClientBatches(
      {n: pad(np.asarray(a)) for n, a in store.features.items()},
      mask.reshape(num_batches, batch_size), pad(owner), reference.num_clients)


def build_cluster_losses(model: model_base.Model
                         ) -> Callable[[base.PyTree, ClientBatches],
                                       np.ndarray]:
  """Returns ``losses(cluster_params, batches) -> [num_clients, K]``.

  Each entry is a client's mean evaluation-mode loss under a cluster model
  (0 for a client without examples); one jitted call per batch, all ``K``
  models vmapped, per-client sums by segment sum.
  """

  @jax.jit
  def batch_sums(cluster_params, batch, mask, owner, loss_total,
                 weight_total):
    def one_model(params):
      loss, weight = model.example_loss(
          model.apply(params, batch, None, False), batch)
      return loss * mask, weight * mask

    loss, weight = jax.vmap(one_model)(cluster_params)  # [K, B]
    num = loss_total.shape[1]
    by_client = jax.vmap(lambda v: jax.ops.segment_sum(v, owner, num))
    return loss_total + by_client(loss), weight_total + by_client(weight)

  def losses(cluster_params, batches):
    shape = (num_clusters_of(cluster_params), batches.num_clients)
    loss_total = jnp.zeros(shape, jnp.float32)
    weight_total = jnp.zeros(shape, jnp.float32)
    for i in range(batches.mask.shape[0]):
      loss_total, weight_total = batch_sums(
          cluster_params, {k: v[i] for k, v in batches.features.items()},
          batches.mask[i], batches.owner[i], loss_total, weight_total)
    loss_total, weight_total = jax.device_get((loss_total, weight_total))
    return (loss_total / np.maximum(weight_total, 1e-12)).T

  return losses


def build_hypcluster_evaluator(model: model_base.Model
                               ) -> Callable[[base.PyTree, ClientBatches,
                                              ClientBatches], dict[str, float]]:
  """Returns ``evaluate(cluster_params, train_batches, test_batches)``.

  Every client is assigned to the cluster with the lowest mean loss on its
  training batches (clients without training examples: cluster 0); each test
  example is scored by its client's cluster. ``test_batches`` must tag
  examples with positions in the training store
  (``client_batches(test, B, reference=train)``). Build once and reuse: the
  jitted batch functions compile once per batch shape.

  Returns ``{metric: value}`` over all test examples (``loss``,
  ``accuracy``, ... as :func:`fedjax_lab.evaluation.central.build_evaluator`)
  plus ``cluster_clients_<k>``, the training clients (with examples) per
  cluster.
  """
  losses_of = build_cluster_losses(model)
  metric_fns = {"loss": model.example_loss, **model.example_metrics}

  @jax.jit
  def batch_sums(cluster_params, batch, mask, clusters, totals):
    logits = jax.vmap(lambda p: model.apply(p, batch, None, False))(
        cluster_params)  # [K, B, ...]
    index = clusters.reshape((1, -1) + (1,) * (logits.ndim - 2))
    chosen = jnp.take_along_axis(logits, index, axis=0)[0]
    out = {}
    for name, fn in metric_fns.items():
      value, weight = fn(chosen, batch)
      out[name] = (totals[name][0] + jnp.sum(value * mask),
                   totals[name][1] + jnp.sum(weight * mask))
    return out

  def evaluate(cluster_params, train_batches, test_batches):
    num_clusters = num_clusters_of(cluster_params)
    train_losses = losses_of(cluster_params, train_batches)
    assignment = np.argmin(train_losses, axis=1).astype(np.int32)
    has_data = np.zeros(train_batches.num_clients, bool)
    has_data[train_batches.owner[train_batches.mask > 0]] = True
    zero = jnp.zeros([], jnp.float32)
    totals = {name: (zero, zero) for name in metric_fns}
    for i in range(test_batches.mask.shape[0]):
      totals = batch_sums(
          cluster_params, {k: v[i] for k, v in test_batches.features.items()},
          test_batches.mask[i], assignment[test_batches.owner[i]], totals)
    totals = jax.device_get(totals)
    result = {name: float(v) / max(float(n), 1e-12)
              for name, (v, n) in totals.items()}
    counts = np.bincount(assignment[has_data], minlength=num_clusters)
    result.update({f"cluster_clients_{k}": float(counts[k])
                   for k in range(num_clusters)})
    return result

  return evaluate
