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
(:func:`kmeans_init`). Evaluation: :mod:`fedjax_lab.algorithms.
hypcluster_eval`. Recipe ``hypcluster``: the ``hypcluster`` config block
(:func:`from_config`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import fedavg
from fedjax_lab.algorithms import local
from fedjax_lab.algorithms import recipe
from fedjax_lab.algorithms.hypcluster_eval import build_cluster_losses
from fedjax_lab.algorithms.hypcluster_eval import build_hypcluster_evaluator
from fedjax_lab.algorithms.hypcluster_eval import client_batches
from fedjax_lab.algorithms.hypcluster_eval import num_clusters_of
from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.models import base as model_base



class HypClusterCarry(NamedTuple):
  """A client's local state: FedAvg's carry per cluster (leaves ``[K, ...]``),
  the broadcast models ``[K, ...]``, each one's summed loss on the local
  batches ``[K]`` and the batches' summed example weight."""

  local: local.LocalCarry
  cluster_params: base.PyTree
  start_loss_sum: jax.Array
  start_loss_weight: jax.Array


def _per_cluster(mask: jax.Array, leaf: jax.Array) -> jax.Array:
  """``mask [K]`` shaped to broadcast against a ``[K, ...]`` leaf."""
  return mask.reshape(mask.shape + (1,) * (leaf.ndim - 1))


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
  local.check_weighting(weighting)
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
        lambda mine, glob: _per_cluster(one_hot, mine) * (mine - glob),
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
        weight=local.client_weight(weighting, num_examples), client_state=(),
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
  """The clients' models after local training from ``init_params``
  (vectorised, as a FedAvg round trains them), stacked
  ``[len(client_indices), ...]``."""
  indices = np.asarray(client_indices, np.int64)
  cohort = cohort_lib.make_cohort(
      store, indices, batch_size=batch_size, num_epochs=num_epochs,
      max_steps=max_steps, seed=seed, round_index=0)
  trained = local.train_clients(model, client_optimizer, init_params, cohort,
                                rng)
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


# ---- recipe ------------------------------------------------------------------

INITS = ("kmeans", "random")
# Mixed into the seed for the initial cluster models.
_INIT_SALT = 0x4C05
_FACTORY = recipe.keyword_defaults(hypcluster)


def _initial_clusters(context: recipe.BuildContext, num_clusters: int,
                      init: str, init_clients: int
                      ) -> Callable[[], base.PyTree]:
  """The ``K`` initial cluster models (computed once, on first use): random,
  or k-means++-like from ``init_clients`` (0: ``cohort_size``) clients drawn
  with the run's seed."""
  config = context.config
  rng = jax.random.fold_in(jax.random.key(config.seed), _INIT_SALT)

  @functools.cache
  def clusters():
    if init == "random":
      return random_init(context.model, num_clusters, rng)
    num_clients = context.num_clients
    count = min(init_clients or config.cohort_size, num_clients)
    candidates = np.random.default_rng([config.seed, _INIT_SALT]).choice(
        num_clients, count, replace=False)
    return kmeans_init(
        context.model, context.client_optimizer, context.dataset.train,
        np.sort(candidates), num_clusters, rng,
        batch_size=config.client.batch_size,
        num_epochs=config.client.num_epochs,
        max_steps=config.client.max_steps or None)

  return clusters


def from_config(context: recipe.BuildContext, *,
                num_clusters: int = 2,
                init: str = "kmeans",
                init_clients: int = 0,
                min_cluster_share: float = _FACTORY["min_cluster_share"],
                stats_scale: float = _FACTORY["stats_scale"]
                ) -> base.FederatedAlgorithm:
  """HypCluster from the ``hypcluster`` block: ``num_clusters`` models
  initialised by ``init`` (``kmeans``: from ``init_clients`` locally trained
  clients, 0 = ``cohort_size``; ``random``, required with DP);
  ``server_init`` ignores the loop's single model and starts from them.
  ``min_cluster_share > 0`` is advisable with DP (noisy cluster counts)."""
  if init not in INITS:
    raise ValueError(f"hypcluster.init must be one of {INITS}, got "
                     f"{init!r}.")
  algorithm = hypcluster(
      context.model, context.client_optimizer, context.server_optimizer,
      num_clusters, weighting=context.weighting,
      aggregator=context.aggregator, min_cluster_share=min_cluster_share,
      stats_scale=stats_scale)
  clusters = _initial_clusters(context, num_clusters, init, init_clients)
  return dataclasses.replace(
      algorithm, server_init=lambda params: algorithm.server_init(clusters()))


def _refuse(context: recipe.BuildContext, mechanism: str) -> str | None:
  if mechanism == "tree":
    return ("DP-FTRL noises the server optimizer's input, but HypCluster "
            "updates its cluster statistics outside it; use "
            "privacy.mechanism='gaussian' or 'adaptive'.")
  if context.options["init"] != "random":
    return ("hypcluster.init='kmeans' trains candidate clients without "
            "clipping or noise and starts the clusters from their local "
            "models, which would publish single clients' models (epsilon "
            "covers nothing of it); set --config.hypcluster.init=random.")
  return None


def _evaluator(context: recipe.BuildContext) -> recipe.Evaluator:
  """Each client scored with its best cluster, batches built once."""
  config, dataset = context.config, context.dataset
  evaluate = build_hypcluster_evaluator(context.model)
  max_examples = config.get("eval_max_examples", 0) or None
  train_batches = client_batches(dataset.train, config.eval_batch_size,
                                 max_examples=max_examples)
  test_batches = client_batches(dataset.test, config.eval_batch_size,
                                reference=dataset.train,
                                max_examples=max_examples)
  return lambda params, split: evaluate(
      params, train_batches, test_batches if split == "test"
      else train_batches)


RECIPE = recipe.Recipe("hypcluster", build=from_config, block="hypcluster",
                       refuse=_refuse, evaluator=_evaluator)
