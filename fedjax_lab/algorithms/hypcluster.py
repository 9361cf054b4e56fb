"""HypCluster: K cluster models, each client trains the one that fits it best.

Mansour, Mohri, Ro & Suresh, "Three Approaches for Personalization with
Applications to Federated Learning", arXiv 2020, Section 3 (hypothesis-based
clustering), as FedJAX's ``hyp_cluster`` runs it: every round, each client of
the cohort evaluates the ``K`` cluster models on its training data, picks the
one with the lowest mean loss, trains it locally, and the server averages each
cluster's deltas over the clients that picked it (a cluster nobody picked,
with its server optimizer state, stays unchanged).

Engine mapping: the ``K`` models are stacked on a leading axis of
``ServerState.params`` (and of the server optimizer's state). The choice needs
the losses on all of a client's data before training, which one streaming
pass cannot know; so a client trains all ``K`` models on the same batches
(vmap over clusters, the same step keys) while summing each broadcast model's
evaluation-mode loss on them, and keeps the delta of the cluster with the
lowest loss: exactly "choose, then train the chosen", at ``K`` times the local
compute. The update is the pair ``(one_hot[k] * delta stacked over K,
stats_scale * one_hot[k])``, so the engine's weighted sum holds every
cluster's weighted delta sum and weight sum; the server divides per cluster.

DP: the pair is one pytree, so a DP aggregator clips it jointly (the one-hot
takes ``stats_scale`` of the clip norm) and noises every cluster's sum; the
per-cluster counts are then noisy, and ``min_cluster_share`` sets which
clusters count as chosen (the default 0 is exact without noise).

Initialisation (FedJAX's ``random_init`` and ``kmeans_init``): differently
seeded models, or a k-means++-like choice among locally trained client models
(:func:`kmeans_init`). Evaluation: :func:`hypcluster_evaluate`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import fedavg
from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.models import base as model_base

_EVAL_SUBSAMPLE_SALT = 0x4C05


class HypClusterCarry(NamedTuple):
  """A client's local state: FedAvg's carry per cluster (leaves ``[K, ...]``),
  the broadcast models ``[K, ...]``, each one's summed loss on the local
  batches ``[K]`` and the batches' summed example weight."""

  local: fedavg.LocalCarry
  cluster_params: base.PyTree
  start_loss_sum: jax.Array
  start_loss_weight: jax.Array


def _per_cluster(mask: jax.Array, leaf: jax.Array) -> jax.Array:
  """``mask [K]`` shaped to broadcast against a ``[K, ...]`` leaf."""
  return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


def num_clusters_of(cluster_params: base.PyTree) -> int:
  """``K``, the leading axis shared by every leaf of stacked cluster params."""
  sizes = {leaf.shape[0] for leaf in jax.tree.leaves(cluster_params)}
  if len(sizes) != 1:
    raise ValueError(f"cluster params need one leading axis K, got {sizes}.")
  return sizes.pop()


def hypcluster(model: model_base.Model,
               client_optimizer: optax.GradientTransformation,
               server_optimizer: optax.GradientTransformation,
               num_clusters: int,
               weighting: str = "num_examples",
               aggregator: base.Aggregator | None = None,
               min_cluster_share: float = 0.0,
               stats_scale: float = 1.0) -> base.FederatedAlgorithm:
  """HypCluster (Mansour et al. 2020; FedJAX's hyp_cluster) on the engine.

  Args:
    model: the model of every cluster.
    client_optimizer: optax transformation for local steps (FedAvg's).
    server_optimizer: optax transformation, one state per cluster, applied to
      the negated mean delta of the cluster's clients.
    num_clusters: ``K``; ``server_init`` takes params stacked ``[K, ...]``
      (:func:`random_init`, :func:`kmeans_init`).
    weighting: ``"num_examples"`` (FedJAX) or ``"uniform"`` client weights
      within a cluster.
    aggregator: how the client pairs are combined; default weighted mean.
    min_cluster_share: a cluster is updated only if its share of the round's
      aggregated weight exceeds this (0: any client chose it).
    stats_scale: the one-hot cluster count's scale in the update (divided out
      by the server); no effect without DP.

  Returns:
    The algorithm. Round metrics add ``cluster_fraction_<k>`` (fraction of
    the cohort that chose cluster ``k``), ``assignment_loss`` (the chosen
    broadcast model's mean loss) and ``clusters_updated``.

  Raises:
    ValueError: ``num_clusters < 1``, unknown weighting, bad scales.
  """
  fedavg.check_weighting(weighting)
  if num_clusters < 1:
    raise ValueError(f"num_clusters must be >= 1, got {num_clusters}.")
  if not stats_scale > 0 or not min_cluster_share >= 0:
    raise ValueError("stats_scale must be > 0 and min_cluster_share >= 0.")
  aggregator = aggregator or base.weighted_mean()
  # FedAvg's client functions (its server side is unused here).
  inner = fedavg.fedopt(model, client_optimizer, optax.sgd(1.0),
                        weighting=weighting)

  def server_init(cluster_params):
    if num_clusters_of(cluster_params) != num_clusters:
      raise ValueError(f"server_init needs {num_clusters} stacked cluster "
                       f"models, got {num_clusters_of(cluster_params)}.")
    return base.ServerState(
        params=cluster_params,
        opt_state=jax.vmap(server_optimizer.init)(cluster_params),
        round=jnp.zeros([], jnp.int32), aggregator_state=aggregator.init())

  def broadcast(state):
    return state.params

  def client_init(cluster_params, client_state, rng):
    del client_state
    zero = jnp.zeros([], jnp.float32)
    local = jax.vmap(inner.client_init, in_axes=(0, None, None))(
        cluster_params, (), rng)
    return HypClusterCarry(local, cluster_params,
                           jnp.zeros([num_clusters], jnp.float32), zero)

  def client_step(carry, batch, mask):
    def eval_sums(params):  # evaluation mode, as the choice is a test
      loss, weight = model.example_loss(model.apply(params, batch, None,
                                                    False), batch)
      return jnp.sum(loss * mask), jnp.sum(weight * mask)

    loss_sums, weight_sums = jax.vmap(eval_sums)(carry.cluster_params)
    local = jax.vmap(inner.client_step, in_axes=(0, None, None))(
        carry.local, batch, mask)
    return HypClusterCarry(local, carry.cluster_params,
                           carry.start_loss_sum + loss_sums,
                           carry.start_loss_weight + weight_sums[0])

  def client_final(cluster_params, carry, num_examples):
    start_loss = carry.start_loss_sum / jnp.maximum(carry.start_loss_weight,
                                                    1e-12)
    choice = jnp.argmin(start_loss)  # ties: the lowest cluster index
    one_hot = jax.nn.one_hot(choice, num_clusters, dtype=jnp.float32)
    delta = jax.tree.map(
        lambda local, glob: _per_cluster(one_hot, local) * (local - glob),
        carry.local.params, cluster_params)
    metrics = {
        "train_loss": (carry.local.loss_sum[choice],
                       carry.local.loss_weight[choice]),
        "assignment_loss": (carry.start_loss_sum[choice],
                            carry.start_loss_weight)}
    for k in range(num_clusters):
      metrics[f"cluster_fraction_{k}"] = (one_hot[k], jnp.ones([]))
    return base.ClientUpdate(
        delta=(delta, stats_scale * one_hot),
        weight=fedavg.client_weight(weighting, num_examples), client_state=(),
        metrics=metrics)

  def server_update(state, aggregate):
    delta_sums, shares = aggregate
    shares = shares / stats_scale
    chosen = shares > min_cluster_share
    inverse = jnp.where(chosen, 1.0 / jnp.where(chosen, shares, 1.0), 0.0)
    mean_delta = jax.tree.map(lambda s: s * _per_cluster(inverse, s),
                              delta_sums)

    def step(params, opt_state, delta):
      updates, opt_state = server_optimizer.update(
          jax.tree.map(jnp.negative, delta), opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.vmap(step)(state.params, state.opt_state,
                                       mean_delta)
    keep = lambda new, old: jnp.where(_per_cluster(chosen, new), new, old)
    state = state._replace(
        params=jax.tree.map(keep, params, state.params),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        round=state.round + 1)
    return state, {"aggregate_delta_norm": optax.tree.norm(mean_delta),
                   "clusters_updated": jnp.sum(chosen.astype(jnp.float32))}

  return base.FederatedAlgorithm(
      name="hypcluster", server_init=server_init,
      broadcast=broadcast, client_init=client_init, client_step=client_step,
      client_final=client_final, aggregator=aggregator,
      server_update=server_update)


# ---- initialisation --------------------------------------------------------


def random_init(model: model_base.Model, num_clusters: int,
                rng: jax.Array) -> base.PyTree:
  """``K`` models from independent keys, stacked ``[K, ...]`` (FedJAX's)."""
  return jax.vmap(model.init)(jax.random.split(rng, num_clusters))


def train_clients_locally(model: model_base.Model,
                          client_optimizer: optax.GradientTransformation,
                          init_params: base.PyTree, store: ClientStore,
                          client_indices, rng: jax.Array, *, batch_size: int,
                          num_epochs: int = 1, max_steps: int | None = None,
                          seed: int = 0) -> base.PyTree:
  """The clients' models after local training from ``init_params`` (through
  the engine, vectorised), stacked ``[len(client_indices), ...]``."""
  indices = np.asarray(client_indices, np.int64)
  local = fedavg.fedopt(model, client_optimizer, optax.sgd(1.0))

  def client_final(global_params, carry, num_examples):
    del global_params
    return base.ClientUpdate(delta=(), weight=jnp.zeros_like(num_examples),
                             client_state=carry.params, metrics={})

  local = dataclasses.replace(local, client_final=client_final,
                              server_update=lambda state, agg: (state, {}))
  cohort = round_lib.cohort_arrays(cohort_lib.make_cohort(
      store, indices, batch_size=batch_size, num_epochs=num_epochs,
      max_steps=max_steps, seed=seed, round_index=0))
  num_slots = cohort["client_mask"].shape[0]
  _, trained, _ = round_lib.build_round(local, Strategy(), donate=False)(
      local.server_init(init_params), cohort, jnp.zeros([num_slots]), rng)
  return jax.tree.map(lambda a: a[:len(indices)], trained)


def kmeans_init(model: model_base.Model,
                client_optimizer: optax.GradientTransformation,
                store: ClientStore, client_indices, num_clusters: int,
                rng: jax.Array, *, batch_size: int, num_epochs: int = 1,
                max_steps: int | None = None) -> base.PyTree:
  """k-means++-like init (FedJAX's ``kmeans_init``), stacked ``[K, ...]``.

  Every candidate client trains a copy of one shared initial model on its
  data; a random candidate's model is the first center; each next center is
  the model of the candidate whose best loss over the centers so far is the
  worst (a candidate already chosen is never chosen again).

  Raises:
    ValueError: fewer candidate clients than ``num_clusters``.
  """
  indices = np.asarray(client_indices, np.int64)
  if not 1 <= num_clusters <= len(indices):
    raise ValueError(f"kmeans_init needs 1 <= num_clusters <= "
                     f"{len(indices)} candidate clients, got {num_clusters}.")
  init_rng, train_rng, first_rng = jax.random.split(rng, 3)
  trained = train_clients_locally(
      model, client_optimizer, model.init(init_rng), store, indices,
      train_rng, batch_size=batch_size, num_epochs=num_epochs,
      max_steps=max_steps)
  losses_of = build_cluster_losses(model)
  batches = client_batches(store.subset(indices), batch_size)
  centers = [int(jax.random.randint(first_rng, [], 0, len(indices)))]
  best = np.full(len(indices), np.inf)
  while len(centers) < num_clusters:
    center = jax.tree.map(lambda a: a[centers[-1]][None], trained)
    best = np.minimum(best, losses_of(center, batches)[:, 0])
    best[centers] = -np.inf
    centers.append(int(np.argmax(best)))
  return jax.tree.map(lambda a: a[np.asarray(centers)], trained)


# ---- evaluation ------------------------------------------------------------


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
  ``accuracy``, ... as :func:`fedjax_lab.engine.evaluate.build_evaluator`)
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


def hypcluster_evaluate(model: model_base.Model, cluster_params: base.PyTree,
                        train_store: ClientStore, test_store: ClientStore,
                        batch_size: int) -> dict[str, float]:
  """HypCluster evaluation (Mansour et al. 2020; FedJAX's evaluator): every
  client takes the cluster with the lowest loss on its train split; returns
  the test-split metrics and ``cluster_clients_<k>``. Compiles on every call:
  a training loop should use :func:`build_hypcluster_evaluator` instead."""
  evaluate = build_hypcluster_evaluator(model)
  return evaluate(cluster_params, client_batches(train_store, batch_size),
                  client_batches(test_store, batch_size, reference=train_store))
