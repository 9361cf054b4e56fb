"""The compiled federated round.

``build_round(algorithm, strategy)`` returns ``round_fn(server_state, cohort,
client_states, rng) -> (server_state, client_states, metrics)`` where
``cohort`` is the dict of padded arrays from :func:`cohort_arrays`:

* ``features``: name -> ``[C, S, B, ...]``
* ``example_mask`` ``[C, S, B]``, ``client_mask`` ``[C]``,
  ``num_examples`` ``[C]``, ``client_indices`` ``[C]`` (-1 for padding).

Local training, the per-client aggregation transform, the weighted sum, the
aggregator's finalize step and the server update all run inside one jitted
function (except ``step_loop="host"``). Padded steps and padded clients are
exact no-ops: a step whose examples are all masked leaves the carry untouched
(``jnp.where``), and padded clients enter every sum with weight 0. Each
client's randomness is ``fold_in(round_rng, client_index)``, so a client's
result does not depend on where in the cohort (or in which padding) it sits.

The aggregator's randomness (DP noise) comes from a separate ``noise_rng``
when one is given: ``fold_in(noise_rng, round)`` for the round, folded with the
client index for per-client (local DP) noise. A DP runner passes a secret key
there, so the noise cannot be regenerated from the (public) training seed.
Without it the noise keys derive from ``rng`` as before.

An algorithm with a ``pre_round`` (:class:`~fedjax_lab.algorithms.base.
PreRound`, e.g. Mime's full-batch gradient) gets a first pass over the same
cohort, run by the same code (vectorisation, step loop, padding rules); its
weighted mean is absorbed into the server state before the round's
``broadcast``. Without one the round is exactly the one-pass round.

When a ``jax.sharding.Mesh`` is given, the client axis of the cohort is
sharded over its ``"clients"`` axis and the sums over clients become the
compiler's collectives; the result equals the single-device one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_lab.algorithms import base
from fedjax_lab.engine.strategy import Strategy

PyTree = Any
RoundFn = Callable[..., tuple[base.ServerState, PyTree, dict[str, jax.Array]]]


# Folded into the round key for the aggregator's noise, and into each client's
# key for its transform's (local DP) noise; training itself uses other folds.
_AGGREGATOR_RNG_TAG = 2**31 - 1
# Folded into the round key for the pre-round pass (clients' keys are then
# folded from that), so its randomness is independent of local training's.
_PRE_ROUND_RNG_TAG = 2**31 - 2


def _client_rngs(round_rng: jax.Array, client_indices: jax.Array) -> jax.Array:
  """Each client's key: ``fold_in(round_rng, client_index)``."""
  return jax.vmap(lambda i: jax.random.fold_in(round_rng, i))(client_indices)


def cohort_arrays(cohort) -> dict[str, Any]:
  """The engine's view of a ``data.cohort.CohortBatch`` (numpy, host side)."""
  return {
      "features": dict(cohort.features),
      "example_mask": cohort.example_mask,
      "client_mask": cohort.client_mask,
      "num_examples": cohort.num_examples,
      "client_indices": cohort.client_indices,
  }


def stack_client_states(template: PyTree, num_clients: int) -> PyTree:
  """One client's initial state repeated for a population: the host-side
  store (numpy, leading ``[num_clients]`` axis) the gather/scatter below use."""
  return jax.tree.map(
      lambda leaf: np.repeat(np.asarray(leaf)[None], num_clients, axis=0),
      template)


def gather_client_states(states: PyTree, client_indices: np.ndarray) -> PyTree:
  """Rows of host-side stacked per-client states for a cohort (pads get row 0)."""
  rows = np.maximum(client_indices, 0)
  return jax.tree.map(lambda s: np.asarray(s)[rows], states)


def scatter_client_states(states: PyTree, client_indices: np.ndarray,
                          updated: PyTree, in_place: bool = False) -> PyTree:
  """Writes a cohort's new client states back into the stacked host states.

  By default the store is copied first (the input is left as it was). With
  ``in_place`` the rows are written into the given (writable numpy) arrays,
  so a round costs O(cohort) host memory traffic instead of O(population):
  what a runner that owns its store wants.
  """
  real = client_indices >= 0

  def put(all_rows, new_rows):
    if not in_place or not (isinstance(all_rows, np.ndarray) and
                            all_rows.flags.writeable):
      all_rows = np.array(all_rows)
    all_rows[client_indices[real]] = np.asarray(new_rows)[real]
    return all_rows

  return jax.tree.map(put, states, updated)


def _pre_round_algorithm(
    algorithm: base.FederatedAlgorithm) -> base.FederatedAlgorithm:
  """The algorithm's pre-round as an algorithm the client code path runs.

  Its ``(value, weight)`` becomes a stateless, metric-free ``ClientUpdate``
  whose plain weighted mean (no clipping, no noise) :func:`_absorb` hands to
  ``pre_round.absorb``.
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


def _absorb(pre_round: base.PreRound, server_state: base.ServerState,
            sums) -> base.ServerState:
  """``pre_round.absorb`` of the weighted mean of the pre-round's values."""
  weighted_sum, total_weight, _, _ = sums
  scale = 1.0 / jnp.maximum(total_weight, 1e-12)
  mean = jax.tree.map(lambda v: v * scale, weighted_sum)
  return pre_round.absorb(server_state, mean)


def _masked_step(algorithm: base.FederatedAlgorithm):
  """A local step that is the identity when every example is masked."""

  def step(carry, batch, mask):
    new_carry = algorithm.client_step(carry, batch, mask)
    active = jnp.any(mask > 0)
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new_carry, carry)

  return step


def _over_group(fn, in_axes, group_size: int):
  """``jax.vmap(fn, in_axes)``, or for a group of one, ``fn`` on the squeezed
  client (a vmap over one client still costs ~1.5x on XLA:CPU)."""
  if group_size != 1:
    return jax.vmap(fn, in_axes=in_axes)

  def single(*args):
    args = [a if axis is None else jax.tree.map(lambda x: x[0], a)
            for a, axis in zip(args, in_axes)]
    return jax.tree.map(lambda x: x[None], fn(*args))

  return single


def _group_fn(algorithm, step_loop: str, max_unroll_steps: int):
  """Trains a group of G clients together (vmapped), steps in a loop.

  Returns ``run_group(broadcast, agg_state, round_rng, noise_round_rng,
  client_states, features [G,S,B,..], mask [G,S,B], num_examples [G],
  client_indices [G]) ->
  (delta, weight, client_state, metrics, transform_metrics)``, each with a
  leading ``[G]`` axis. A step in which no client of the group has a real
  example is skipped outright (``lax.cond`` outside the vmap), so bucket
  padding and, with small groups, uneven client sizes cost no compute.
  """
  masked_step = _masked_step(algorithm)

  def run_group(broadcast, agg_state, round_rng, noise_round_rng,
                client_states, features, mask, num_examples, client_indices):
    group_size = mask.shape[0]
    step = _over_group(masked_step, (0, 0, 0), group_size)

    def step_or_skip(carry, batch, step_mask):
      return jax.lax.cond(jnp.any(step_mask > 0), step, lambda c, b, m: c,
                          carry, batch, step_mask)

    rngs = _client_rngs(round_rng, client_indices)
    carry = _over_group(algorithm.client_init, (None, 0, 0), group_size)(
        broadcast, client_states, rngs)

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
    finish = lambda c, n, r: _finish_client(algorithm, broadcast, agg_state, c,
                                            n, r)
    noise_rngs = _client_rngs(noise_round_rng, client_indices)
    return _over_group(finish, (0, 0, 0), group_size)(carry, num_examples,
                                                      noise_rngs)

  return run_group


def _finish_client(algorithm, broadcast, agg_state, carry, num_examples,
                   client_noise_rng):
  """``client_final`` then the aggregator's per-client transform, whose key
  is ``fold_in(client_noise_rng, tag)`` (the client's key in the round's
  noise stream)."""
  update = algorithm.client_final(broadcast, carry, num_examples)
  delta, weight, transform_metrics = algorithm.aggregator.client_transform(
      update.delta, update.weight, agg_state,
      jax.random.fold_in(client_noise_rng, _AGGREGATOR_RNG_TAG))
  return delta, weight, update.client_state, update.metrics, transform_metrics


def _sum_clients(outputs, client_mask):
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


def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


def _chunk(tree, num_chunks: int, strided: bool):
  """[C, ...] -> [num_chunks, C // num_chunks, ...].

  Contiguous chunks (clients ``j*k:(j+1)*k``) keep clients sorted by size
  together, so a chunk stops when its largest client does. Strided chunks
  (clients ``j::num_chunks``) keep each chunk spread over the devices of a
  sharded client axis (a contiguous block per device), so no data moves.
  """
  def f(a):
    per_chunk = a.shape[0] // num_chunks
    if not strided:
      return a.reshape((num_chunks, per_chunk) + a.shape[1:])
    return jnp.swapaxes(a.reshape((per_chunk, num_chunks) + a.shape[1:]), 0, 1)
  return jax.tree.map(f, tree)


def _unchunk(tree, strided: bool):
  def f(a):
    if strided:
      a = jnp.swapaxes(a, 0, 1)
    return a.reshape((-1,) + a.shape[2:])
  return jax.tree.map(f, tree)


def _pad_clients(tree, multiple: int):
  def f(a):
    extra = (-a.shape[0]) % multiple
    if extra == 0:
      return a
    if a.dtype == jnp.int32 or a.dtype == jnp.int64:
      fill = -1
    else:
      fill = 0
    pad = [(0, extra)] + [(0, 0)] * (a.ndim - 1)
    return jnp.pad(a, pad, constant_values=fill)
  return jax.tree.map(f, tree)


# Where each round metric comes from (``round_fn.metric_origins()``): the
# clients' own training (``client``), the aggregator's per-client transform
# (``client_transform``), its finalize step on the sum (``aggregator``), the
# server update on the aggregate (``server``), or the engine's bookkeeping
# (``engine``). A DP run's release policy decides from this what it may
# publish (fedjax_lab.privacy.release).
ORIGINS = ("client", "client_transform", "aggregator", "server", "engine")


def _finish_round(algorithm, server_state, agg_state, sums, num_clients,
                  noise_round_rng, origins=None):
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


def build_round(algorithm: base.FederatedAlgorithm, strategy: Strategy,
                mesh: Mesh | None = None, donate: bool = True) -> RoundFn:
  """Compiles a round of ``algorithm`` executed with ``strategy``.

  Args:
    algorithm: the federated algorithm.
    strategy: client-parallel and step-loop choices.
    mesh: optional mesh with a ``"clients"`` axis; the cohort's client axis is
      sharded over it (C must be a multiple of its size: use
      ``make_cohort(..., cohort_multiple_of=mesh.size)``).
    donate: donate the server state and client states buffers to the round.

  Returns:
    ``round_fn(server_state, cohort, client_states, rng, noise_rng=None) ->
    (server_state, client_states, metrics)``; ``rng`` is the run's base key
    (the round's key is ``fold_in(rng, server_state.round)``); ``noise_rng``,
    if given, keys the aggregator's noise instead (``fold_in(noise_rng,
    round)``; a DP run passes a secret key). ``round_fn.trace_count()`` says
    how many times it was traced (compiled); ``round_fn.metric_origins()``
    maps each metric name to one of :data:`ORIGINS` (filled when traced).
  """
  trace_counter = [0]
  origins: dict[str, str] = {}
  run_group = _group_fn(algorithm, strategy.step_loop,
                        strategy.max_unroll_steps)
  pre_run_group = None
  if algorithm.pre_round is not None:
    pre_run_group = _group_fn(_pre_round_algorithm(algorithm),
                              strategy.step_loop, strategy.max_unroll_steps)

  def shard(tree):
    if mesh is None:
      return tree
    spec = NamedSharding(mesh, PartitionSpec("clients"))
    return jax.tree.map(
        lambda a: jax.lax.with_sharding_constraint(a, spec), tree)

  def clients_phase(run_group, server_state, cohort, client_states,
                    round_rng, noise_round_rng):
    broadcast = algorithm.broadcast(server_state)
    agg_state = server_state.aggregator_state
    per_client = (client_states, cohort["features"], cohort["example_mask"],
                  cohort["num_examples"], cohort["client_indices"])
    per_client = shard(per_client)
    client_mask = shard(cohort["client_mask"])
    if strategy.client_parallel == "vmap":
      outputs = run_group(broadcast, agg_state, round_rng, noise_round_rng,
                          *per_client)
      return _sum_clients(outputs, client_mask), outputs[2]

    chunk = 1 if strategy.client_parallel == "map" else strategy.chunk_size
    num_clients = client_mask.shape[0]
    padded = _pad_clients((per_client, client_mask), chunk)
    num_chunks = -(-num_clients // chunk)
    strided = mesh is not None
    chunked = _chunk(padded, num_chunks, strided)

    def body(acc, xs):
      inputs, mask = xs
      out = run_group(broadcast, agg_state, round_rng, noise_round_rng,
                      *inputs)
      sums = _sum_clients(out, mask)
      return (sums if acc is None else _add(acc, sums)), out[2]

    first = jax.tree.map(lambda a: a[0], chunked)
    acc_shape, _ = jax.eval_shape(lambda xs: body(None, xs), first)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), acc_shape)
    sums, states = jax.lax.scan(body, zeros, chunked)
    states = _unchunk(states, strided)
    return sums, jax.tree.map(lambda a: a[:num_clients], states)

  def round_fn(server_state, cohort, client_states, rng, noise_rng=None):
    trace_counter[0] += 1
    round_rng = jax.random.fold_in(rng, server_state.round)
    noise_round_rng = _noise_round_rng(round_rng, noise_rng,
                                       server_state.round)
    if pre_run_group is not None:
      pre_rng = jax.random.fold_in(round_rng, _PRE_ROUND_RNG_TAG)
      pre_sums, _ = clients_phase(
          pre_run_group, server_state, cohort, client_states, pre_rng,
          pre_rng)
      server_state = _absorb(algorithm.pre_round, server_state, pre_sums)
    sums, new_states = clients_phase(run_group, server_state, cohort,
                                     client_states, round_rng,
                                     noise_round_rng)
    num_clients = jnp.sum(cohort["client_mask"])
    server_state, metrics = _finish_round(algorithm, server_state,
                                          server_state.aggregator_state, sums,
                                          num_clients, noise_round_rng,
                                          origins)
    return server_state, new_states, metrics

  if strategy.step_loop == "host":
    fn = _build_host_loop_round(algorithm, donate, trace_counter, shard,
                                origins)
  else:
    fn = jax.jit(round_fn, donate_argnums=(0, 2) if donate else ())
  fn.trace_count = lambda: trace_counter[0]
  fn.metric_origins = lambda: dict(origins)
  return fn


def _noise_round_rng(round_rng, noise_rng, round_index):
  """The round's key for the aggregator's noise: from ``noise_rng`` when
  given, else (as before it existed) the round's training key."""
  if noise_rng is None:
    return round_rng
  return jax.random.fold_in(noise_rng, round_index)


def _build_host_loop_round(algorithm, donate, trace_counter, shard, origins):
  """vmap over clients, Python loop over steps calling one jitted step."""
  step = jax.vmap(_masked_step(algorithm))

  @jax.jit
  def init(server_state, client_states, client_indices, rng):
    trace_counter[0] += 1
    round_rng = jax.random.fold_in(rng, server_state.round)
    broadcast = algorithm.broadcast(server_state)
    rngs = _client_rngs(round_rng, client_indices)
    return jax.vmap(algorithm.client_init, in_axes=(None, 0, 0))(
        broadcast, client_states, shard(rngs))

  jitted_step = jax.jit(step, donate_argnums=(0,) if donate else ())

  @jax.jit
  def finish(server_state, carry, cohort, rng, noise_rng):
    round_rng = jax.random.fold_in(rng, server_state.round)
    noise_round_rng = _noise_round_rng(round_rng, noise_rng,
                                       server_state.round)
    broadcast = algorithm.broadcast(server_state)
    agg_state = server_state.aggregator_state
    rngs = _client_rngs(noise_round_rng, cohort["client_indices"])
    outputs = jax.vmap(
        lambda c, n, r: _finish_client(algorithm, broadcast, agg_state, c, n,
                                       r))(carry, cohort["num_examples"], rngs)
    sums = _sum_clients(outputs, shard(cohort["client_mask"]))
    num_clients = jnp.sum(cohort["client_mask"])
    server_state, metrics = _finish_round(algorithm, server_state, agg_state,
                                          sums, num_clients, noise_round_rng,
                                          origins)
    return server_state, outputs[2], metrics

  pre_pass = None
  if algorithm.pre_round is not None:
    pre_pass = _host_pre_round(algorithm, donate, shard)

  def round_fn(server_state, cohort, client_states, rng, noise_rng=None):
    if pre_pass is not None:
      server_state = pre_pass(server_state, cohort, client_states, rng)
    carry = init(server_state, client_states, cohort["client_indices"], rng)
    carry = _host_steps(jitted_step, carry, cohort)
    return finish(server_state, carry, cohort, rng, noise_rng)

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
  client_states, rng) -> server_state`` with the pre-round mean absorbed."""
  pre_algorithm = _pre_round_algorithm(algorithm)
  jitted_step = jax.jit(jax.vmap(_masked_step(pre_algorithm)),
                        donate_argnums=(0,) if donate else ())

  def client_rngs(server_state, client_indices, rng):
    pre_rng = jax.random.fold_in(jax.random.fold_in(rng, server_state.round),
                                 _PRE_ROUND_RNG_TAG)
    return _client_rngs(pre_rng, client_indices)

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
        lambda c, n, r: _finish_client(pre_algorithm, broadcast, (), c, n, r))(
            carry, cohort["num_examples"], rngs)
    sums = _sum_clients(outputs, shard(cohort["client_mask"]))
    return _absorb(algorithm.pre_round, server_state, sums)

  def pre_pass(server_state, cohort, client_states, rng):
    carry = init(server_state, client_states, cohort["client_indices"], rng)
    carry = _host_steps(jitted_step, carry, cohort)
    return absorb(server_state, carry, cohort, rng)

  return pre_pass


def client_mesh(devices=None) -> Mesh:
  """A 1-D mesh over ``devices`` (default: all) with axis name ``"clients"``."""
  devices = np.asarray(devices if devices is not None else jax.devices())
  return Mesh(devices, ("clients",))


def place_cohort(cohort: dict[str, Any], mesh: Mesh | None) -> dict[str, Any]:
  """Transfers host cohort arrays to device(s), client axis sharded on a mesh."""
  if mesh is None:
    return jax.device_put(cohort)
  sharding = NamedSharding(mesh, PartitionSpec("clients"))
  return jax.device_put(cohort, sharding)
