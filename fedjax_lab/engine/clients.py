"""The client side of a round: local training of a group of clients, the
aggregation chain's per-client transform, the masked sums, and the round's
finish (the chain's finalize and the server update).

Shared by the compiled round (:mod:`fedjax_lab.engine.round`) and the
host step loop (:mod:`fedjax_lab.engine.host_loop`).

Per-client aggregation state: when the algorithm's aggregator keeps state per
client (:func:`fedjax_lab.algorithms.base.has_client_state`, e.g. error
feedback) a client's stored state is a :class:`~fedjax_lab.algorithms.base.
ClientStates` pair; local training sees its ``algorithm`` half, the
aggregator's ``client_transform`` its ``aggregation`` half, and the new pair
goes back to the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Iterator

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import local
from fedjax_lab.privacy import refusals

PyTree = Any

# Folded into the round key for the aggregator's noise, and into each client's
# key for its transform's (local DP) noise; training itself uses other folds.
_AGGREGATOR_RNG_TAG = 2**31 - 1
# Folded into the round key for the pre-round pass (clients' keys are then
# folded from that), so its randomness is independent of local training's.
_PRE_ROUND_RNG_TAG = 2**31 - 2

# Where each round metric comes from (``round_fn.metric_origins()``): the
# clients' own training (``client``), the aggregator's per-client transform
# (``client_transform``), its finalize step on the sum (``aggregator``), the
# server update on the aggregate (``server``), or the engine's bookkeeping
# (``engine``). A DP run's release policy decides from this what it may
# publish (fedjax_lab.privacy.release).
ORIGINS = ("client", "client_transform", "aggregator", "server", "engine")


def client_rngs(round_rng: jax.Array, client_indices: jax.Array) -> jax.Array:
  """Each client's key: ``fold_in(round_rng, client_index)``."""
  return jax.vmap(lambda i: jax.random.fold_in(round_rng, i))(client_indices)


def split_states(algorithm: base.FederatedAlgorithm, client_states: PyTree
                 ) -> tuple[PyTree, PyTree]:
  """``(algorithm_states, aggregation_states)`` of stored client states
  (``aggregation_states`` is ``()`` for a stateless aggregator)."""
  if not base.has_client_state(algorithm.aggregator):
    return client_states, ()
  if not isinstance(client_states, base.ClientStates):
    raise TypeError(
        f"{algorithm.name}'s aggregator keeps per-client state, so its "
        "client states must be base.ClientStates pairs: build the algorithm "
        "with base.pair_client_states(algorithm) and initialise the store "
        "from its client_state_init.")
  return client_states.algorithm, client_states.aggregation


def pre_round_algorithm(
    algorithm: base.FederatedAlgorithm) -> base.FederatedAlgorithm:
  """The algorithm's pre-round as an algorithm the client code path runs.

  Its ``(value, weight)`` becomes a stateless, metric-free ``ClientUpdate``
  whose plain weighted mean (no clipping, no noise) :func:`absorb` hands to
  ``pre_round.absorb``. It sees the algorithm half of the client states.
  """
  pre = algorithm.pre_round

  def client_final(broadcast, carry, num_examples):
    value, weight = pre.client_final(broadcast, carry, num_examples)
    return base.ClientUpdate(delta=value, weight=weight, client_state=(),
                             metrics={})

  return dataclasses.replace(
      algorithm, client_init=pre.client_init, client_step=pre.client_step,
      client_final=client_final, aggregator=base.weighted_mean(),
      pre_round=None)


def absorb(pre_round: base.PreRound, server_state: base.ServerState,
           sums) -> base.ServerState:
  """``pre_round.absorb`` of the weighted mean of the pre-round's values."""
  weighted_sum, total_weight, _, _ = sums
  scale = 1.0 / jnp.maximum(total_weight, 1e-12)
  mean = jax.tree.map(lambda v: v * scale, weighted_sum)
  return pre_round.absorb(server_state, mean)


# The vmapped member axis being traced (engine/members.py), if any: a step is
# skipped only when no client of any member needs it.
_MEMBER_AXES: list[str] = []


@contextlib.contextmanager
def member_axis(name: str) -> Iterator[None]:
  """While a round is traced under ``jax.vmap(..., axis_name=name)`` over
  sweep members: the step-skip test reduces over the members, so it stays
  one unbatched ``lax.cond`` (a per-member test would become a ``select``
  running every padded step of every member; a member whose clients have no
  example in the step is left unchanged by :func:`masked_step` anyway)."""
  _MEMBER_AXES.append(name)
  try:
    yield
  finally:
    _MEMBER_AXES.pop()


def any_example(step_mask: jax.Array) -> jax.Array:
  """Whether any client of the group (of any member, inside
  :func:`member_axis`) has a real example in this step."""
  need = jnp.any(step_mask > 0)
  if _MEMBER_AXES:
    need = jax.lax.psum(need.astype(jnp.int32), _MEMBER_AXES[-1]) > 0
  return need


def masked_step(algorithm: base.FederatedAlgorithm):
  """A local step that is the identity when every example is masked."""

  def step(carry, batch, mask):
    new_carry = algorithm.client_step(carry, batch, mask)
    active = jnp.any(mask > 0)
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new_carry, carry)

  return step


def group_fn(algorithm: base.FederatedAlgorithm, step_loop: str,
             max_unroll_steps: int):
  """Trains a group of G clients together (vmapped), steps in a loop.

  Returns ``run_group(broadcast, agg_state, round_rng, noise_round_rng,
  client_states, features [G,S,B,..], mask [G,S,B], num_examples [G],
  client_indices [G]) ->
  (delta, weight, client_state, metrics, transform_metrics)``, each with a
  leading ``[G]`` axis. A step in which no client of the group has a real
  example is skipped outright (``lax.cond`` outside the vmap), so bucket
  padding and, with small groups, uneven client sizes cost no compute.
  """
  step_fn = masked_step(algorithm)

  def run_group(broadcast, agg_state, round_rng, noise_round_rng,
                client_states, features, mask, num_examples, client_indices):
    group_size = mask.shape[0]
    step = local.over_clients(step_fn, (0, 0, 0), group_size)
    algorithm_states, aggregation_states = split_states(algorithm,
                                                        client_states)

    def step_or_skip(carry, batch, step_mask):
      return jax.lax.cond(any_example(step_mask), step, lambda c, b, m: c,
                          carry, batch, step_mask)

    rngs = client_rngs(round_rng, client_indices)
    carry = local.over_clients(algorithm.client_init, (None, 0, 0), group_size)(
        broadcast, algorithm_states, rngs)

    def at_step(s):
      take = lambda a: jax.lax.dynamic_index_in_dim(a, s, 1, keepdims=False)
      return jax.tree.map(take, features), take(mask)

    num_steps = mask.shape[1]
    if step_loop == "scan" or num_steps > max_unroll_steps:
      def body(c, s):
        return step_or_skip(c, *at_step(s)), None
      carry, _ = jax.lax.scan(body, carry, jnp.arange(num_steps))
    else:  # "unroll": S is static.
      for s in range(num_steps):
        carry = step_or_skip(carry, *at_step(s))
    finish = lambda c, n, r, p, a: finish_client(algorithm, broadcast,
                                                 agg_state, c, n, r, p, a)
    noise_rngs = client_rngs(noise_round_rng, client_indices)
    return local.over_clients(finish, (0, 0, 0, 0, 0), group_size)(
        carry, num_examples, noise_rngs, rngs, aggregation_states)

  return run_group


def finish_client(algorithm, broadcast, agg_state, carry, num_examples,
                  client_noise_rng, client_rng, aggregation_state=()):
  """``client_final`` then the aggregator's per-client transform.

  The transform's keys: noise ``fold_in(client_noise_rng, tag)`` (the
  client's key in the round's noise stream), public ``client_rng`` (its
  training key). Returns ``(delta, weight, client_state, metrics,
  transform_metrics)``; ``client_state`` is a ``ClientStates`` pair when the
  aggregator keeps per-client state.
  """
  transform = base.as_transform(algorithm.aggregator)
  if transform.uniform_weights_only:
    check_uniform_weights(algorithm, broadcast, carry, num_examples)
  update = algorithm.client_final(broadcast, carry, num_examples)
  keys = base.ClientKeys(
      noise=jax.random.fold_in(client_noise_rng, _AGGREGATOR_RNG_TAG),
      public=client_rng)
  delta, weight, aggregation_state, transform_metrics = (
      transform.client_transform(update.delta, update.weight, agg_state,
                                 aggregation_state, keys))
  client_state = update.client_state
  if transform.client_init is not None:
    client_state = base.ClientStates(algorithm=client_state,
                                     aggregation=aggregation_state)
  return delta, weight, client_state, update.metrics, transform_metrics


def _reads_input(jaxpr, input_var, output_var) -> bool:
  """Whether ``output_var`` of ``jaxpr`` is computed from ``input_var``."""
  derived = {input_var}
  for eqn in jaxpr.eqns:
    if any(not isinstance(v, jax_core.Literal) and v in derived
           for v in eqn.invars):
      derived.update(eqn.outvars)
  return not isinstance(output_var, jax_core.Literal) and output_var in derived


def check_uniform_weights(algorithm, broadcast, carry, num_examples) -> None:
  """Refuses (at trace time) client weights that read the example count
  when the aggregator sums with weight 1 (a DP sum would silently ignore
  ``weighting="num_examples"``).

  Raises:
    ValueError: the weight of ``client_final`` depends on ``num_examples``;
      the message is the refusal table's reason.
  """
  closed = jax.make_jaxpr(
      lambda c, n: algorithm.client_final(broadcast, c, n).weight)(
          carry, num_examples)
  jaxpr = closed.jaxpr
  if _reads_input(jaxpr, jaxpr.invars[-1], jaxpr.outvars[0]):
    refusals.check_weighting("num_examples")


def sum_clients(outputs, client_mask):
  """Masked sums over a leading client axis of per-client outputs."""
  delta, weight, _, metrics, transform_metrics = outputs
  mask = client_mask.astype(jnp.float32)
  w = weight * mask
  weighted_sum = jax.tree.map(
      lambda d: jnp.tensordot(w, d.astype(jnp.float32), axes=1), delta)
  metric_sums = {k: (jnp.sum(v * mask), jnp.sum(n * mask))
                 for k, (v, n) in metrics.items()}
  transform_sums = {k: jnp.sum(v * mask) for k, v in transform_metrics.items()}
  return weighted_sum, jnp.sum(w), metric_sums, transform_sums


def finish_round(algorithm, server_state, agg_state, sums, num_clients,
                 noise_round_rng, origins=None):
  """The aggregator's finalize, the server update and the round's metrics
  (``origins``, if given, is filled with each metric's origin)."""
  weighted_sum, total_weight, metric_sums, transform_sums = sums
  aggregate, agg_state, agg_metrics = algorithm.aggregator.finalize(
      weighted_sum, total_weight, num_clients, agg_state,
      jax.random.fold_in(noise_round_rng, _AGGREGATOR_RNG_TAG))
  server_state = server_state._replace(aggregator_state=agg_state)
  metrics = {k: v / jnp.maximum(n, 1e-12) for k, (v, n) in metric_sums.items()}
  client_metric_names = list(metrics)
  if algorithm.server_update_uses_client_metrics:
    server_state, server_metrics = algorithm.server_update(
        server_state, aggregate, dict(metrics))
  else:
    server_state, server_metrics = algorithm.server_update(server_state,
                                                           aggregate)
  transform_metrics = {k: v / jnp.maximum(num_clients, 1.0)
                       for k, v in transform_sums.items()}
  metrics.update(transform_metrics)
  metrics.update(agg_metrics)
  metrics.update(server_metrics)
  engine_metrics = {
      "num_clients": num_clients, "total_weight": total_weight,
      "params_finite": jnp.all(jnp.asarray(
          [jnp.all(jnp.isfinite(p))
           for p in jax.tree.leaves(server_state.params)])).astype(
               jnp.float32)}
  metrics.update(engine_metrics)
  if origins is not None:
    # Later sources overwrite earlier ones of the same name, as in metrics.
    for origin, names in (("client", client_metric_names),
                          ("client_transform", transform_metrics),
                          ("aggregator", agg_metrics),
                          ("server", server_metrics),
                          ("engine", engine_metrics)):
      origins.update({name: origin for name in names})
  return server_state, metrics


def noise_round_rng(round_rng, noise_rng, round_index):
  """The round's key for the aggregator's noise: from ``noise_rng`` when
  given, else (as before it existed) the round's training key."""
  if noise_rng is None:
    return round_rng
  return jax.random.fold_in(noise_rng, round_index)
