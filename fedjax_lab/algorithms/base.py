"""The federated algorithm interface: pure functions the engine composes.

An algorithm is a frozen bundle of pure functions (FedJAX-style), split so the
engine can vectorise the client part across the cohort and compile the whole
round into one function:

* ``server_init(params) -> ServerState``
* ``broadcast(server_state) -> broadcast``: what every client of the round
  receives (model parameters plus any server statistics, e.g. Mime's
  optimizer state).
* ``client_init(broadcast, client_state, rng) -> carry``
* ``client_step(carry, batch, example_mask) -> carry``: one local step. The
  engine makes a step whose examples are all masked an exact no-op, so the
  algorithm only has to honour the per-example mask inside a batch.
* ``client_final(broadcast, carry, num_examples) -> ClientUpdate``: the model
  delta (``local - global``), the aggregation weight, the client's new
  persistent state (SCAFFOLD control variates) and per-client metrics.
* ``aggregator``: an :class:`Aggregator` or a :class:`Transform` (often a
  :func:`chain` of links: per-client transforms, e.g. clipping and
  compression, then finalize steps on the weighted sum, e.g. adding noise).
  When it keeps per-client state the algorithm's per-client state is a
  :class:`ClientStates` pair (:func:`pair_client_states`).
* ``server_update(server_state, aggregate) -> (server_state, metrics)``; with
  ``server_update_uses_client_metrics`` it also receives the round's client
  metrics averaged over the real clients (e.g. ``{"train_loss": ...}``) as a
  third argument. Those averages are not privatised by the aggregator: a DP
  run must not feed them into the model (adaptive FedProx is refused with DP).
* ``client_state_init(params) -> state`` for one client (``()`` when the
  algorithm keeps no per-client state).
* ``pre_round``: optional :class:`PreRound`, a first pass over the same cohort
  whose weighted mean the server absorbs before ``broadcast`` (Mime's
  full-batch gradient at the server model). ``None`` (every other algorithm)
  leaves the round exactly as it was.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any
Metrics = dict[str, jax.Array]


class ServerState(NamedTuple):
  """Server state carried across rounds (a pytree).

  Attributes:
    params: global model parameters.
    opt_state: the server optimizer's state.
    round: number of completed rounds (int32 scalar).
    aggregator_state: state of the aggregator (e.g. adaptive clip norm).
    extra: algorithm-specific server statistics (``()`` if none).
  """

  params: PyTree
  opt_state: PyTree
  round: jax.Array
  aggregator_state: PyTree
  extra: PyTree = ()


class ClientUpdate(NamedTuple):
  """What one client sends back (before aggregation).

  Attributes:
    delta: ``local_params - global_params`` (or any pytree the aggregator sums).
    weight: scalar aggregation weight (e.g. number of examples).
    client_state: the client's new persistent state (``()`` if stateless).
    metrics: scalars describing local training (summed over real clients as
      ``(value_sum, weight)`` pairs by the engine).
  """

  delta: PyTree
  weight: jax.Array
  client_state: PyTree
  metrics: dict[str, tuple[jax.Array, jax.Array]]


class Aggregator(NamedTuple):
  """A link of aggregation without per-client state (the short form).

  ``client_transform(delta, weight, state, rng) -> (delta, weight, metrics)``
  runs once per client (vectorised; ``rng`` is the client's key in the
  round's noise stream, e.g. for local-DP noise); the engine then forms
  ``weighted_sum = sum_k mask_k * weight_k * delta_k`` and
  ``total_weight = sum_k mask_k * weight_k``, and calls
  ``finalize(weighted_sum, total_weight, num_clients, state, rng) ->
  (aggregate, state, metrics)``. Per-client metrics are averaged over the real
  clients of the round. :func:`as_transform` lifts it to a :class:`Transform`.

  ``uniform_weights_only``: it sums with weight 1 whatever the client's
  weight (a DP sum, whose sensitivity per-client weights would change); the
  engine then refuses an algorithm whose weights depend on the clients'
  example counts (``weighting="num_examples"``) instead of ignoring them.
  """

  init: Callable[[], PyTree]
  client_transform: Callable[[PyTree, jax.Array, PyTree, jax.Array],
                             tuple[PyTree, jax.Array, Metrics]]
  finalize: Callable[[PyTree, jax.Array, jax.Array, PyTree, jax.Array],
                     tuple[PyTree, PyTree, Metrics]]
  uniform_weights_only: bool = False


class ClientKeys(NamedTuple):
  """The keys a transform gets for one client.

  Attributes:
    noise: the client's key in the round's noise stream (secret in a DP run);
      for DP noise.
    public: the client's training key (from the run's public seed); for
      randomness the server shares with the client anyway, e.g. the
      stochastic rounding and rotation of a compressor. A link that draws
      from it folds in its own tag.
  """

  noise: jax.Array
  public: jax.Array


class Transform(NamedTuple):
  """A link of an aggregation chain, optax-style (see :func:`chain`).

  * ``init() -> state``: its server-side state (``ServerState.
    aggregator_state``), e.g. the adaptive clip norm.
  * ``client_transform(delta, weight, state, client_state, keys) -> (delta,
    weight, client_state, metrics)``: once per client, vectorised;
    ``keys`` is a :class:`ClientKeys`.
  * ``finalize(value, total_weight, num_clients, state, rng) -> (value,
    state, metrics)``: once per round on the masked weighted sum of the
    clients' outputs (the first link of a chain gets the sum; each next link
    what the previous one returned; the last returns the aggregate).
  * ``client_init(delta_template) -> client_state`` for one client, or None
    when the link keeps no per-client state. Per-client state (e.g. an error
    feedback residual) lives with the algorithm's per-client state in the
    engine's store as :class:`ClientStates`; only the rows of a round's real
    clients are written back.
  * ``uniform_weights_only``: as for :class:`Aggregator` (a chain has it if
    any link has).
  """

  init: Callable[[], PyTree]
  client_transform: Callable[
      [PyTree, jax.Array, PyTree, PyTree, ClientKeys],
      tuple[PyTree, jax.Array, PyTree, Metrics]]
  finalize: Callable[[PyTree, jax.Array, jax.Array, PyTree, jax.Array],
                     tuple[PyTree, PyTree, Metrics]]
  client_init: Callable[[PyTree], PyTree] | None = None
  uniform_weights_only: bool = False


class ClientStates(NamedTuple):
  """A client's state when its aggregation keeps per-client state.

  Attributes:
    algorithm: the algorithm's own per-client state (``()`` if none).
    aggregation: the aggregation chain's per-client state.
  """

  algorithm: PyTree
  aggregation: PyTree


def positive_number(name: str, value: Any) -> Any:
  """``float(value)`` after checking ``value > 0``; a traced value (a sweep
  member's hyperparameter inside the member program) is returned as it is,
  its concrete values having been checked when each member was built.

  Raises:
    ValueError: a concrete ``value`` that is not > 0.
  """
  if isinstance(value, jax.core.Tracer):
    return value
  if not value > 0:
    raise ValueError(f"{name} must be > 0, got {value!r}.")
  return float(value)


def as_transform(link: Aggregator | Transform) -> Transform:
  """``link`` as a :class:`Transform` (an :class:`Aggregator` gets the
  client's noise key and no per-client state)."""
  if isinstance(link, Transform):
    return link
  if not isinstance(link, Aggregator):
    raise TypeError(f"not an Aggregator or Transform: {link!r}")

  def client_transform(delta, weight, state, client_state, keys):
    delta, weight, metrics = link.client_transform(delta, weight, state,
                                                   keys.noise)
    return delta, weight, client_state, metrics

  return Transform(init=link.init, client_transform=client_transform,
                   finalize=link.finalize,
                   uniform_weights_only=link.uniform_weights_only)


def has_client_state(aggregator: Aggregator | Transform) -> bool:
  """Whether ``aggregator`` keeps per-client state."""
  return as_transform(aggregator).client_init is not None


def weighted_mean() -> Aggregator:
  """``sum_k w_k delta_k / sum_k w_k`` over the real clients (0 if none).

  FedAvg's aggregation (McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data", AISTATS).
  """

  def client_transform(delta, weight, state, rng):
    del state, rng
    return delta, weight, {}

  def finalize(weighted_sum, total_weight, num_clients, state, rng):
    del num_clients, rng
    scale = 1.0 / jnp.maximum(total_weight, 1e-12)
    return jax.tree.map(lambda s: s * scale, weighted_sum), state, {}

  return Aggregator(init=lambda: (), client_transform=client_transform,
                    finalize=finalize)


def chain(*links: Aggregator | Transform) -> Aggregator | Transform:
  """Links applied in order: ``chain(clip, compress, gaussian_sum)``.

  Per client, every link's ``client_transform`` runs in order on the delta
  and weight the previous one returned; once per round, every link's
  ``finalize`` runs in order, the first on the masked weighted sum. States
  are tuples with one entry per link (server-side; per-client, ``()`` for a
  link without per-client state). Metrics of later links win on equal names.

  Randomness: the LAST link (the one that forms the aggregate, e.g. a DP
  sum) gets the keys unchanged, so ``chain(x)`` is ``x``; link ``i`` before
  it gets its noise keys folded with ``i``. The public client key is shared
  (links that draw from it fold in their own tag).

  A chain of one link is that link itself.
  """
  if not links:
    raise ValueError("chain needs at least one link.")
  if len(links) == 1:
    return links[0]
  transforms = [as_transform(link) for link in links]
  last = len(transforms) - 1
  stateful = any(t.client_init is not None for t in transforms)

  def link_keys(i, keys):
    if i == last:
      return keys
    return keys._replace(noise=jax.random.fold_in(keys.noise, i))

  def link_rng(i, rng):
    return rng if i == last else jax.random.fold_in(rng, i)

  def init():
    return tuple(t.init() for t in transforms)

  def client_init(template):
    return tuple(t.client_init(template) if t.client_init is not None else ()
                 for t in transforms)

  def client_transform(delta, weight, state, client_state, keys):
    metrics, new_client_state = {}, []
    for i, t in enumerate(transforms):
      delta, weight, link_state, link_metrics = t.client_transform(
          delta, weight, state[i], client_state[i] if stateful else (),
          link_keys(i, keys))
      new_client_state.append(link_state)
      metrics.update(link_metrics)
    return (delta, weight, tuple(new_client_state) if stateful else
            client_state, metrics)

  def finalize(value, total_weight, num_clients, state, rng):
    metrics, new_state = {}, []
    for i, t in enumerate(transforms):
      value, link_state, link_metrics = t.finalize(
          value, total_weight, num_clients, state[i], link_rng(i, rng))
      new_state.append(link_state)
      metrics.update(link_metrics)
    return value, tuple(new_state), metrics

  return Transform(init=init, client_transform=client_transform,
                   finalize=finalize,
                   client_init=client_init if stateful else None,
                   uniform_weights_only=any(t.uniform_weights_only
                                            for t in transforms))


@dataclasses.dataclass(frozen=True)
class PreRound:
  """A statistic of the cohort that the server needs before local training.

  The engine runs it over the round's cohort first, with the same client
  vectorisation and step loop as local training: ``client_init(broadcast,
  client_state, rng) -> carry``, ``client_step(carry, batch, example_mask) ->
  carry`` (fully masked steps are no-ops), ``client_final(broadcast, carry,
  num_examples) -> (value, weight)`` with ``value`` a pytree and ``weight`` a
  scalar. Then ``absorb(server_state, mean) -> server_state`` receives
  ``sum_k w_k value_k / sum_k w_k`` over the real clients, and the round
  continues with ``broadcast`` of the absorbed state. ``broadcast`` in the
  pre-round is that of the state before absorbing; the client's key is
  independent of its key for local training.

  The mean is exact, not privatised: the aggregator (clipping, noise) only
  sees the main pass, so an algorithm with a pre-round is not a central-DP
  release as a whole.
  """

  client_init: Callable[[PyTree, PyTree, jax.Array], PyTree]
  client_step: Callable[[PyTree, dict[str, jax.Array], jax.Array], PyTree]
  client_final: Callable[[PyTree, PyTree, jax.Array],
                         tuple[PyTree, jax.Array]]
  absorb: Callable[[ServerState, PyTree], ServerState]


@dataclasses.dataclass(frozen=True)
class FederatedAlgorithm:
  """A federated algorithm as pure functions; see the module docstring."""

  name: str
  server_init: Callable[[PyTree], ServerState]
  broadcast: Callable[[ServerState], PyTree]
  client_init: Callable[[PyTree, PyTree, jax.Array], PyTree]
  client_step: Callable[[PyTree, dict[str, jax.Array], jax.Array], PyTree]
  client_final: Callable[[PyTree, PyTree, jax.Array], ClientUpdate]
  aggregator: Aggregator | Transform
  server_update: Callable[[ServerState, PyTree], tuple[ServerState, Metrics]]
  client_state_init: Callable[[PyTree], PyTree] = lambda params: ()
  server_update_uses_client_metrics: bool = False
  pre_round: PreRound | None = None


def delta_template(algorithm: FederatedAlgorithm, params: PyTree) -> PyTree:
  """Shapes and dtypes of ``algorithm``'s ``ClientUpdate.delta`` (no compute).

  Traces one client's init and final step abstractly, so it works for any
  delta structure (FedAvg's parameter-shaped delta, SCAFFOLD's pair).
  """

  def one_client_delta():
    broadcast = algorithm.broadcast(algorithm.server_init(params))
    carry = algorithm.client_init(
        broadcast, algorithm.client_state_init(params), jax.random.key(0))
    return algorithm.client_final(broadcast, carry,
                                  jnp.ones([], jnp.float32)).delta

  return jax.eval_shape(one_client_delta)


def pair_client_states(algorithm: FederatedAlgorithm) -> FederatedAlgorithm:
  """``algorithm`` whose ``client_state_init`` gives a :class:`ClientStates`
  pair when its aggregator keeps per-client state (else ``algorithm``).

  Call it on an algorithm built with a stateful aggregator (e.g. a
  :func:`chain` with error-feedback compression; a second call changes
  nothing); the engine then hands the
  ``algorithm`` half to local training and the ``aggregation`` half to the
  aggregator.
  """
  transform = as_transform(algorithm.aggregator)
  if transform.client_init is None or getattr(
      algorithm.client_state_init, "pairs_aggregation_state", False):
    return algorithm  # nothing to pair, or already paired
  inner_init = algorithm.client_state_init

  def client_state_init(params):
    template = delta_template(algorithm, params)
    return ClientStates(algorithm=inner_init(params),
                        aggregation=transform.client_init(template))

  client_state_init.pairs_aggregation_state = True
  return dataclasses.replace(algorithm, client_state_init=client_state_init)
