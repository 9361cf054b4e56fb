"""Agnostic Federated Averaging: train for the worst mixture of client domains.

Mohri, Sivek & Suresh, "Agnostic Federated Learning", ICML 2019: the clients
fall into ``D`` domains with mean losses ``L_d(w)``, and the model minimises
``max_{lambda in simplex} sum_d lambda_d L_d(w)``, a game solved by descent on
``w`` and exponentiated-gradient (mirror) ascent on ``lambda``. The federated
form here follows FedJAX's ``agnostic_fed_avg`` (Ro, Chen, Mathews, Mohri &
Suresh, "Communication-Efficient Agnostic Federated Averaging", Interspeech
2021), with every client in exactly one domain:

* the server keeps the domain weights ``lambda`` and a window of the last
  ``W`` rounds' per-domain shares ``f`` of the cohort (examples, or clients
  with uniform weighting); it broadcasts the model and the weight per unit of
  data ``alpha_d = lambda_d / max(mean_window f_d, min_window_fraction)``;
* a client of domain ``d`` trains like FedAvg and measures the loss of the
  broadcast model on the batches it trains on (the domain loss at the start of
  local training); it sends ``alpha_d * delta`` with weight ``c_k`` (its
  example count, or 1) and its loss and a count in slot ``d``;
* the server steps on ``sum_k c_k alpha_dk delta_k / sum_k c_k alpha_dk``
  (FedJAX's ``sum_k beta_k delta_k / sum_k beta_k``, ``beta_k = alpha_dk
  n_k``), updates ``lambda_d <- lambda_d exp(eta L_d) / Z`` with ``L_d`` the
  domain's example-weighted mean loss in the cohort (0 for a domain absent
  from it, as in FedJAX), and pushes this round's shares into the window.

Differences from FedJAX, on purpose: (1) local steps minimise the batch mean
loss, as FedAvg does. FedJAX divides a batch's loss sum by ``beta_k /
alpha_d = n_k``, the same gradient scaled by ``B / n_k``, i.e. a per-client
learning rate; (2) the window holds shares, not counts, and has a floor, so a
domain missing from the recent cohorts gets a finite weight; (3) domain losses
are measured in evaluation mode on this round's training batches instead of a
separate pass; (4) the per-domain losses and counts travel inside the client's
update, so a DP aggregator clips and noises them together with the model
delta (the domain weights are then a post-processing of private releases).

With a DP aggregator (weights replaced by 1, fixed denominator) the update is
``sum_k alpha_dk clip(delta_k) / m`` plus noise; ``self_normalize=False``
keeps that fixed denominator (``sum_d alpha_d f_d ~ 1`` by construction)
instead of dividing by a noisy estimate of the realised normaliser.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import fedavg
from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.models import base as model_base

DOMAIN_KINDS = ("play", "majority_label", "client_id_prefix")


class AgnosticStats(NamedTuple):
  """Server statistics of Agnostic FedAvg (``ServerState.extra``).

  Attributes:
    domain_weights: ``lambda``, float32 ``[D]`` on the probability simplex.
    domain_window: float32 ``[W, D]``, per-domain shares of the last ``W``
      cohorts (each row sums to 1), oldest first.
  """

  domain_weights: jax.Array
  domain_window: jax.Array


class AgnosticCarry(NamedTuple):
  """A client's local training state.

  Attributes:
    local: FedAvg's carry (local params, optimizer state, rng, train loss).
    global_params: the broadcast model, at which the start loss is measured.
    start_loss_sum: summed loss of the broadcast model on the local batches.
    start_loss_weight: summed example weight of those batches.
    domain_id: the client's domain, int32 scalar.
  """

  local: fedavg.LocalCarry
  global_params: base.PyTree
  start_loss_sum: jax.Array
  start_loss_weight: jax.Array
  domain_id: jax.Array


def exponentiated_gradient_step(domain_weights: jax.Array,
                                domain_losses: jax.Array,
                                learning_rate: float) -> jax.Array:
  """Mirror ascent on the simplex: ``lambda * exp(eta * L) / Z`` (``[D]``).

  Mohri et al. 2019's update of the mixture weights. Computed in log space
  (shifting by ``max L`` changes only ``Z``), so large ``eta * L`` cannot
  overflow; a zero weight stays zero.
  """
  shifted = learning_rate * (domain_losses - jnp.max(domain_losses))
  unnormalised = domain_weights * jnp.exp(shifted)
  return unnormalised / jnp.sum(unnormalised)


def domain_scale(stats: AgnosticStats,
                 min_window_fraction: float) -> jax.Array:
  """Weight per unit of data, ``[D]``: ``alpha_d = lambda_d /
  max(mean_window f_d, min_window_fraction)``."""
  shares = jnp.maximum(jnp.mean(stats.domain_window, axis=0),
                       min_window_fraction)
  return stats.domain_weights / shares


def client_domain_states(domain_ids, num_domains: int | None = None
                         ) -> np.ndarray:
  """Every client's persistent state: its domain id, int32 ``[num_clients]``.

  Pass it as the stacked client states of the run (the engine's per-client
  store gathers and scatters it; the algorithm returns it unchanged).

  Raises:
    ValueError: ids not 1-D, negative, or ``>= num_domains``.
  """
  ids = np.asarray(domain_ids)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"domain_ids must be a 1-D integer array, got shape "
                     f"{ids.shape} and dtype {ids.dtype}.")
  if ids.size and ids.min() < 0:
    raise ValueError("domain ids must be >= 0.")
  if num_domains is not None and ids.size and ids.max() >= num_domains:
    raise ValueError(f"domain id {ids.max()} >= num_domains={num_domains}.")
  return ids.astype(np.int32)


def _index_names(keys: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
  names, ids = np.unique(keys, return_inverse=True)
  return ids.astype(np.int32), tuple(str(n) for n in names)


def domain_ids_from(dataset: FederatedDataset, kind: str,
                    separator: str = "/", num_labels: int | None = None
                    ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Assigns every training client of ``dataset`` to one domain.

  Args:
    dataset: the federated dataset (its train store's clients, in order).
    kind: ``"play"``: Shakespeare's play, the part of the client id before
      ``separator`` (ids look like ``"hamlet/HAMLET"``; every id must contain
      it); ``"majority_label"``: the client's most frequent training label
      (ties: the smallest; integer labels ``y [N]``, e.g. mnist, digits,
      synthetic); ``"client_id_prefix"``: the part of the id before the
      first ``separator`` (the whole id if absent).
    separator: the prefix separator for ``"play"`` / ``"client_id_prefix"``.
    num_labels: ``"majority_label"`` only: number domains by label,
      ``D = num_labels`` whatever the clients' labels are (a DP run: which
      labels are some client's majority is private, so it must not set the
      number of domains or their numbering).

  Returns:
    ``(domain_ids, names)``: int32 ``[num_clients]`` ids in ``[0, D)`` and the
    ``D`` domain names, sorted (labels as ``"label_<y>"``). Without
    ``num_labels`` only domains that some client belongs to are numbered.

  Raises:
    ValueError: unknown ``kind``, a ``"play"`` id without ``separator``, or
      labels unsuitable for ``"majority_label"``.
  """
  store = dataset.train
  ids = [str(i) for i in store.client_ids]
  if kind in ("play", "client_id_prefix"):
    if kind == "play":
      missing = [i for i in ids if separator not in i]
      if missing:
        raise ValueError(f"kind='play' needs client ids '<play>{separator}"
                         f"<speaker>', got e.g. {missing[0]!r}.")
    return _index_names(np.asarray([i.split(separator, 1)[0] for i in ids]))
  if kind == "majority_label":
    labels = np.asarray(store.features["y"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      raise ValueError("kind='majority_label' needs integer class labels y "
                       f"[N], got shape {labels.shape} ({labels.dtype}).")
    owner = np.repeat(np.arange(store.num_clients), store.client_sizes)
    width = int(labels.max(initial=0)) + 1
    if num_labels is not None:
      if width > num_labels:
        raise ValueError(f"labels go up to {width - 1} but num_labels is "
                         f"{num_labels}.")
      width = num_labels
    counts = np.zeros([store.num_clients, width], np.int64)
    np.add.at(counts, (owner, labels), 1)
    majority = np.argmax(counts, axis=1)
    if num_labels is not None:
      return (majority.astype(np.int32),
              tuple(f"label_{u}" for u in range(num_labels)))
    domain_ids, used = _index_names(majority)
    return domain_ids, tuple(f"label_{u}" for u in used)
  raise ValueError(f"kind must be one of {DOMAIN_KINDS}, got {kind!r}.")


def domain_fractions(domain_ids, num_domains: int,
                     client_sizes=None) -> np.ndarray:
  """Population share of each domain, float64 ``[D]`` summing to 1.

  Shares of examples when ``client_sizes`` is given (``num_examples``
  weighting), else of clients. A sensible ``init_domain_window`` prior.
  """
  ids = client_domain_states(domain_ids, num_domains)
  sizes = (np.ones(len(ids)) if client_sizes is None
           else np.asarray(client_sizes, np.float64))
  totals = np.bincount(ids, weights=sizes, minlength=num_domains)
  return totals / max(totals.sum(), 1e-12)


def _check_distribution(name: str, values, num_domains: int) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.shape != (num_domains,):
    raise ValueError(f"{name} must have num_domains={num_domains} entries, "
                     f"got shape {values.shape}.")
  if np.any(values < 0) or abs(values.sum() - 1.0) > 1e-6:
    raise ValueError(f"{name} must be non-negative and sum to 1, got "
                     f"{values.tolist()}.")
  return values


def agnostic_fedavg(model: model_base.Model,
                    client_optimizer: optax.GradientTransformation,
                    server_optimizer: optax.GradientTransformation,
                    num_domains: int,
                    domain_learning_rate: float,
                    init_domain_weights=None,
                    init_domain_window=None,
                    window_size: int = 1,
                    min_window_fraction: float | None = None,
                    weighting: str = "num_examples",
                    aggregator: base.Aggregator | None = None,
                    self_normalize: bool = True,
                    loss_bound: float | None = None,
                    stats_scale: float = 1.0) -> base.FederatedAlgorithm:
  """Agnostic FedAvg (Mohri et al., ICML 2019; FedJAX's agnostic_fed_avg).

  See the module docstring for the round. The client's persistent state is
  its domain id (int32 scalar, from :func:`client_domain_states`), returned
  unchanged.

  Args:
    model: the model to train.
    client_optimizer: optax transformation for local steps (FedAvg's).
    server_optimizer: optax transformation applied to the negated
      domain-weighted mean delta; ``optax.sgd(1.0)`` is plain averaging.
    num_domains: ``D``.
    domain_learning_rate: ``eta`` of the exponentiated-gradient step on the
      domain weights (0 keeps them fixed).
    init_domain_weights: initial ``lambda`` (``[D]``, on the simplex);
      default uniform.
    init_domain_window: initial per-domain cohort shares (``[D]``, summing to
      1) that fill the window; default uniform. :func:`domain_fractions` of
      the population is a good prior. With ``lambda`` equal to it and
      ``eta = 0``, the first round is FedAvg's.
    window_size: ``W``, rounds of cohort shares averaged into ``alpha``.
    min_window_fraction: floor of a domain's window-mean share; default a
      tenth of the uniform share, ``0.1 / D``.
    weighting: ``"num_examples"`` (FedJAX: shares and domain losses count
      examples) or ``"uniform"`` (they count clients).
    aggregator: how the client updates are combined; default weighted mean.
    self_normalize: divide the aggregate by the realised normaliser
      ``sum_d alpha_d share_d`` (exact FedJAX with the default aggregator);
      ``False``: use it as is (the fixed-denominator form, for DP).
    loss_bound: if set, clip each domain's mean loss to ``[0, loss_bound]``
      before the step on ``lambda`` (Mohri et al. assume bounded losses; it
      tames noisy DP estimates).
    stats_scale: factor on the per-domain loss and count sent with the
      delta (divided out by the server). No effect without DP; with a DP
      aggregator that clips the whole update it sets their share of the clip
      norm.

  Returns:
    The algorithm. Round metrics add ``domain_weight_<d>`` (after the step),
    ``domain_loss_<d>`` (the cohort's mean loss of the round's starting model
    on domain ``d``), ``domain_share_<d>`` and ``start_loss``.

  Raises:
    ValueError: invalid sizes, distributions, rates or weighting.
  """
  fedavg.check_weighting(weighting)
  if num_domains < 1 or window_size < 1:
    raise ValueError(f"num_domains and window_size must be >= 1, got "
                     f"{num_domains} and {window_size}.")
  if not domain_learning_rate >= 0:
    raise ValueError("domain_learning_rate must be >= 0, got "
                     f"{domain_learning_rate}.")
  if not stats_scale > 0 or (loss_bound is not None and not loss_bound > 0):
    raise ValueError("stats_scale and loss_bound must be > 0.")
  uniform = np.full(num_domains, 1.0 / num_domains)
  weights0 = _check_distribution(
      "init_domain_weights",
      uniform if init_domain_weights is None else init_domain_weights,
      num_domains)
  window0 = _check_distribution(
      "init_domain_window",
      uniform if init_domain_window is None else init_domain_window,
      num_domains)
  if min_window_fraction is None:
    min_window_fraction = 0.1 / num_domains
  if not 0 < min_window_fraction <= 1:
    raise ValueError("min_window_fraction must be in (0, 1], got "
                     f"{min_window_fraction}.")
  aggregator = aggregator or base.weighted_mean()
  inner = fedavg.fedopt(model, client_optimizer, server_optimizer,
                        weighting=weighting, aggregator=aggregator)

  def server_init(params):
    state = inner.server_init(params)
    stats = AgnosticStats(
        jnp.asarray(weights0, jnp.float32),
        jnp.tile(jnp.asarray(window0, jnp.float32)[None], (window_size, 1)))
    return state._replace(extra=stats)

  def broadcast(state):
    return state.params, domain_scale(state.extra, min_window_fraction)

  def client_init(bcast, domain_id, rng):
    global_params, _ = bcast
    zero = jnp.zeros([], jnp.float32)
    return AgnosticCarry(inner.client_init(global_params, (), rng),
                         global_params, zero, zero,
                         jnp.asarray(domain_id, jnp.int32))

  def client_step(carry, batch, mask):
    logits = model.apply(carry.global_params, batch, None, False)
    loss_sum, weight = model.example_loss(logits, batch)
    maskf = mask.astype(loss_sum.dtype)
    return carry._replace(
        local=inner.client_step(carry.local, batch, mask),
        start_loss_sum=carry.start_loss_sum + jnp.sum(loss_sum * maskf),
        start_loss_weight=carry.start_loss_weight + jnp.sum(weight * maskf))

  def client_final(bcast, carry, num_examples):
    global_params, alpha = bcast
    update = inner.client_final(global_params, carry.local, num_examples)
    # An out-of-range id (the engine pads with -1) selects no domain.
    slot = jax.nn.one_hot(carry.domain_id, num_domains, dtype=jnp.float32)
    client_alpha = jnp.sum(slot * alpha)
    start_loss = carry.start_loss_sum / jnp.maximum(carry.start_loss_weight,
                                                    1e-12)
    delta = (jax.tree.map(lambda d: client_alpha * d, update.delta),
             stats_scale * start_loss * slot, stats_scale * slot)
    metrics = dict(update.metrics)
    metrics["start_loss"] = (carry.start_loss_sum, carry.start_loss_weight)
    return base.ClientUpdate(delta=delta, weight=update.weight,
                             client_state=carry.domain_id, metrics=metrics)

  def server_update(state, aggregate):
    model_sum, loss_sum, count = aggregate
    loss_sum, count = loss_sum / stats_scale, count / stats_scale
    alpha = domain_scale(state.extra, min_window_fraction)
    if self_normalize:
      normaliser = jnp.sum(alpha * count)
      scale = jnp.where(normaliser > 0, 1.0 / jnp.where(normaliser > 0,
                                                         normaliser, 1.0), 0.0)
      model_sum = jax.tree.map(lambda s: s * scale, model_sum)
    state, metrics = fedavg.server_opt_update(server_optimizer, state,
                                              model_sum)
    seen = count > 0
    domain_loss = jnp.where(seen, loss_sum / jnp.where(seen, count, 1.0), 0.0)
    if loss_bound is not None:
      domain_loss = jnp.clip(domain_loss, 0.0, loss_bound)
    weights = exponentiated_gradient_step(state.extra.domain_weights,
                                          domain_loss, domain_learning_rate)
    positive = jnp.maximum(count, 0.0)
    total = jnp.sum(positive)
    shares = positive / jnp.where(total > 0, total, 1.0)
    window = state.extra.domain_window
    # A round without any domain count (no real client) leaves the window.
    window = jnp.where(total > 0,
                       jnp.concatenate([window[1:], shares[None]], axis=0),
                       window)
    for d in range(num_domains):
      metrics[f"domain_weight_{d}"] = weights[d]
      metrics[f"domain_loss_{d}"] = domain_loss[d]
      metrics[f"domain_share_{d}"] = shares[d]
    return state._replace(extra=AgnosticStats(weights, window)), metrics

  return base.FederatedAlgorithm(
      name="agnostic_fedavg", server_init=server_init, broadcast=broadcast,
      client_init=client_init, client_step=client_step,
      client_final=client_final, aggregator=aggregator,
      server_update=server_update,
      client_state_init=lambda params: jnp.zeros([], jnp.int32))
