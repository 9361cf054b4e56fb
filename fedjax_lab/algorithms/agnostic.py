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
from fedjax_lab.algorithms import local
from fedjax_lab.algorithms import recipe
from fedjax_lab.algorithms.domains import client_domain_states
from fedjax_lab.algorithms.domains import domain_fractions
from fedjax_lab.algorithms.domains import domain_ids_from
from fedjax_lab.models import base as model_base

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

  local: local.LocalCarry
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
  local.check_weighting(weighting)
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
    state, metrics = local.server_opt_update(server_optimizer, state,
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


# ---- recipe ------------------------------------------------------------------

_FACTORY = recipe.keyword_defaults(agnostic_fedavg)
_DOMAINS = recipe.keyword_defaults(domain_ids_from)


def client_domains(context: recipe.BuildContext
                   ) -> tuple[np.ndarray, tuple[str, ...]]:
  """Each training client's domain id (``[num_clients]``) and the domain
  names, from the ``agnostic_fedavg`` block. In a DP run majority-label
  domains are numbered by label over all ``num_classes`` (which labels occur
  is private); play and id-prefix domains come from client ids, which are
  public metadata."""
  options, dataset = context.options, context.dataset
  private = context.mechanism != "none"
  return domain_ids_from(
      dataset, options["domain_kind"], options["domain_separator"],
      num_labels=(dataset.num_classes if private and
                  options["domain_kind"] == "majority_label" else None))


def from_config(context: recipe.BuildContext, *,
                domain_kind: str = "majority_label",
                domain_separator: str = _DOMAINS["separator"],
                domain_learning_rate: float = 0.1,
                window_size: int = _FACTORY["window_size"],
                min_window_fraction: float = 0.0,
                loss_bound: float = 0.0,
                stats_scale: float = _FACTORY["stats_scale"]
                ) -> base.FederatedAlgorithm:
  """Agnostic FedAvg from the ``agnostic_fedavg`` block.

  ``domain_kind`` (play | majority_label | client_id_prefix) and
  ``domain_separator`` assign the domains (:func:`domain_ids_from`);
  ``min_window_fraction`` and ``loss_bound`` 0 mean "unset" (``loss_bound >
  0`` is advisable with DP). Without DP the
  window starts from the population's domain shares and the aggregate is
  self-normalised; a DP run starts from uniform shares (the population's are
  a statistic of every client's data) with the fixed denominator.
  """
  del domain_kind, domain_separator  # read by client_domains
  ids, names = client_domains(context)
  num_domains = len(names)
  private = context.privacy is not None
  sizes = (context.dataset.train.client_sizes
           if context.weighting == "num_examples" else None)
  window = (domain_fractions(ids, num_domains, sizes) if not private
            else None)
  return agnostic_fedavg(
      context.model, context.client_optimizer, context.server_optimizer,
      num_domains, domain_learning_rate, init_domain_window=window,
      window_size=window_size,
      min_window_fraction=min_window_fraction or None,
      weighting=context.weighting, aggregator=context.aggregator,
      self_normalize=not private, loss_bound=loss_bound or None,
      stats_scale=stats_scale)


def _client_states_init(context: recipe.BuildContext
                        ) -> recipe.ClientStatesInit:
  ids, names = client_domains(context)
  domains = client_domain_states(ids, len(names))
  # A fresh store per call: the runner writes client rows in place.
  return lambda params, num_clients: domains.copy()


RECIPE = recipe.Recipe(
    "agnostic_fedavg", build=from_config, block="agnostic_fedavg",
    refuses={"tree": "DP-FTRL noises the server optimizer's input, but "
                     "agnostic FedAvg updates its domain weights outside it; "
                     "use privacy.mechanism='gaussian' or 'adaptive'."},
    client_states_init=_client_states_init)
