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
* ``aggregator``: an :class:`Aggregator` (per-client transform, e.g. clipping;
  then a finalize step on the weighted sum, e.g. adding noise).
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
  """Turns client deltas into one server update, optax-style.

  ``client_transform(delta, weight, state, rng) -> (delta, weight, metrics)``
  runs once per client (vectorised; ``rng`` is the client's own key, e.g. for
  local-DP noise); the engine then forms
  ``weighted_sum = sum_k mask_k * weight_k * delta_k`` and
  ``total_weight = sum_k mask_k * weight_k``, and calls
  ``finalize(weighted_sum, total_weight, num_clients, state, rng) ->
  (aggregate, state, metrics)``. Per-client metrics are averaged over the real
  clients of the round.
  """

  init: Callable[[], PyTree]
  client_transform: Callable[[PyTree, jax.Array, PyTree, jax.Array],
                             tuple[PyTree, jax.Array, Metrics]]
  finalize: Callable[[PyTree, jax.Array, jax.Array, PyTree, jax.Array],
                     tuple[PyTree, PyTree, Metrics]]


def weighted_mean() -> Aggregator:
  """``sum_k w_k delta_k / sum_k w_k`` over the real clients (0 if none)."""

  def client_transform(delta, weight, state, rng):
    del state, rng
    return delta, weight, {}

  def finalize(weighted_sum, total_weight, num_clients, state, rng):
    del num_clients, rng
    scale = 1.0 / jnp.maximum(total_weight, 1e-12)
    return jax.tree.map(lambda s: s * scale, weighted_sum), state, {}

  return Aggregator(init=lambda: (), client_transform=client_transform,
                    finalize=finalize)


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
  aggregator: Aggregator
  server_update: Callable[[ServerState, PyTree], tuple[ServerState, Metrics]]
  client_state_init: Callable[[PyTree], PyTree] = lambda params: ()
  server_update_uses_client_metrics: bool = False
  pre_round: PreRound | None = None
