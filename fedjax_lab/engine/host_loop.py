"""The round with ``step_loop="host"``: clients vmapped, local steps driven
from Python (one jitted call per step), then one jitted finish.

Same results as the compiled round of :mod:`fedjax_lab.engine.round` (same
keys, same padding rules, same per-client aggregation state handling).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.engine import clients


def build_host_loop_round(algorithm, donate, trace_counter, shard, origins):
  """vmap over clients, Python loop over steps calling one jitted step."""
  step = jax.vmap(clients.masked_step(algorithm))

  @jax.jit
  def init(server_state, client_states, client_indices, rng):
    trace_counter[0] += 1
    round_rng = jax.random.fold_in(rng, server_state.round)
    broadcast = algorithm.broadcast(server_state)
    rngs = clients.client_rngs(round_rng, client_indices)
    algorithm_states, _ = clients.split_states(algorithm, client_states)
    return jax.vmap(algorithm.client_init, in_axes=(None, 0, 0))(
        broadcast, algorithm_states, shard(rngs))

  jitted_step = jax.jit(step, donate_argnums=(0,) if donate else ())

  @jax.jit
  def finish(server_state, carry, cohort, client_states, rng, noise_rng):
    round_rng = jax.random.fold_in(rng, server_state.round)
    noise_round_rng = clients.noise_round_rng(round_rng, noise_rng,
                                              server_state.round)
    broadcast = algorithm.broadcast(server_state)
    agg_state = server_state.aggregator_state
    indices = cohort["client_indices"]
    noise_rngs = clients.client_rngs(noise_round_rng, indices)
    public_rngs = clients.client_rngs(round_rng, indices)
    _, aggregation_states = clients.split_states(algorithm, client_states)
    outputs = jax.vmap(
        lambda c, n, r, p, a: clients.finish_client(
            algorithm, broadcast, agg_state, c, n, r, p, a))(
                carry, cohort["num_examples"], noise_rngs, public_rngs,
                aggregation_states)
    sums = clients.sum_clients(outputs, shard(cohort["client_mask"]))
    num_clients = jnp.sum(cohort["client_mask"])
    server_state, metrics = clients.finish_round(
        algorithm, server_state, agg_state, sums, num_clients,
        noise_round_rng, origins)
    return server_state, outputs[2], metrics

  pre_pass = None
  if algorithm.pre_round is not None:
    pre_pass = _host_pre_round(algorithm, donate, shard)

  def round_fn(server_state, cohort, client_states, rng, noise_rng=None):
    if pre_pass is not None:
      algorithm_states, _ = clients.split_states(algorithm, client_states)
      server_state = pre_pass(server_state, cohort, algorithm_states, rng)
    carry = init(server_state, client_states, cohort["client_indices"], rng)
    carry = _host_steps(jitted_step, carry, cohort)
    return finish(server_state, carry, cohort, client_states, rng, noise_rng)

  return round_fn


def _host_steps(jitted_step, carry, cohort):
  """Runs the cohort's local steps from Python, one jitted call per step."""
  features, mask = cohort["features"], cohort["example_mask"]
  # Steps after the longest client's last step are padding: skip them.
  active_steps = np.flatnonzero(np.asarray(mask).any(axis=(0, 2)))
  for s in range(active_steps[-1] + 1 if len(active_steps) else 0):
    carry = jitted_step(carry, jax.tree.map(lambda a: a[:, s], features),
                        mask[:, s])
  return carry


def _host_pre_round(algorithm, donate, shard):
  """The pre-round pass of ``step_loop="host"``: ``(server_state, cohort,
  algorithm_states, rng) -> server_state`` with the pre-round mean absorbed."""
  pre_algorithm = clients.pre_round_algorithm(algorithm)
  jitted_step = jax.jit(jax.vmap(clients.masked_step(pre_algorithm)),
                        donate_argnums=(0,) if donate else ())

  def client_rngs(server_state, client_indices, rng):
    pre_rng = jax.random.fold_in(jax.random.fold_in(rng, server_state.round),
                                 clients._PRE_ROUND_RNG_TAG)  # pylint: disable=protected-access
    return clients.client_rngs(pre_rng, client_indices)

  @jax.jit
  def init(server_state, client_states, client_indices, rng):
    broadcast = algorithm.broadcast(server_state)
    rngs = client_rngs(server_state, client_indices, rng)
    return jax.vmap(pre_algorithm.client_init, in_axes=(None, 0, 0))(
        broadcast, client_states, shard(rngs))

  @jax.jit
  def absorb(server_state, carry, cohort, rng):
    broadcast = algorithm.broadcast(server_state)
    rngs = client_rngs(server_state, cohort["client_indices"], rng)
    outputs = jax.vmap(
        lambda c, n, r: clients.finish_client(pre_algorithm, broadcast, (), c,
                                              n, r, r))(
            carry, cohort["num_examples"], rngs)
    sums = clients.sum_clients(outputs, shard(cohort["client_mask"]))
    return clients.absorb(algorithm.pre_round, server_state, sums)

  def pre_pass(server_state, cohort, client_states, rng):
    carry = init(server_state, client_states, cohort["client_indices"], rng)
    carry = _host_steps(jitted_step, carry, cohort)
    return absorb(server_state, carry, cohort, rng)

  return pre_pass
