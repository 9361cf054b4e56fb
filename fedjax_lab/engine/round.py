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

The aggregator may be a chain of links
(:func:`fedjax_lab.algorithms.base.chain`); when it keeps per-client state
(error feedback) the stored client states are ``ClientStates`` pairs and the
round returns the new pairs (:mod:`fedjax_lab.engine.clients`).

The pieces live in :mod:`~fedjax_lab.engine.clients` (client side, sums,
finish), :mod:`~fedjax_lab.engine.host_loop` (``step_loop="host"``) and
:mod:`~fedjax_lab.engine.store` (host-side client-state store, placement;
re-exported here).

When a ``jax.sharding.Mesh`` is given, the client axis of the cohort is
sharded over its ``"clients"`` axis and the sums over clients become the
compiler's collectives; the result equals the single-device one.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_lab.algorithms import base
from fedjax_lab.engine import clients
from fedjax_lab.engine.clients import _PRE_ROUND_RNG_TAG
from fedjax_lab.engine.clients import ORIGINS
from fedjax_lab.engine.host_loop import build_host_loop_round
from fedjax_lab.engine.store import client_mesh
from fedjax_lab.engine.store import cohort_arrays
from fedjax_lab.engine.store import gather_client_states
from fedjax_lab.engine.store import place_cohort
from fedjax_lab.engine.store import scatter_client_states
from fedjax_lab.engine.store import stack_client_states
from fedjax_lab.engine.strategy import Strategy

__all__ = ["ORIGINS", "RoundFn", "build_round", "client_mesh",
           "cohort_arrays", "gather_client_states", "place_cohort",
           "scatter_client_states", "stack_client_states"]

PyTree = Any
RoundFn = Callable[..., tuple[base.ServerState, PyTree, dict[str, jax.Array]]]


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


def _sharded_chunk(chunk: int, num_clients: int, num_devices: int) -> int:
  """Clients per chunk when the client axis is sharded over ``num_devices``:
  the same number from every device (``map``: one each), so each device
  trains its own clients and no chunk needs another device's data. (A
  chunk of fewer clients than devices would leave the compiler a loop over
  a sharded axis, which it runs by gathering every client on every
  device.) ``num_clients`` is a multiple of ``num_devices``; the result
  divides it, so no padding reshards the axis."""
  per_device_total = num_clients // num_devices
  per_device = max(1, -(-chunk // num_devices))
  while per_device_total % per_device:
    per_device -= 1
  return per_device * num_devices


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


def build_round(algorithm: base.FederatedAlgorithm, strategy: Strategy,
                mesh: Mesh | None = None, donate: bool = True) -> RoundFn:
  """Compiles a round of ``algorithm`` executed with ``strategy``.

  Args:
    algorithm: the federated algorithm.
    strategy: client-parallel and step-loop choices.
    mesh: optional mesh with a ``"clients"`` axis; the cohort's client axis is
      sharded over it (C must be a multiple of its size: use
      ``make_cohort(..., cohort_multiple_of=mesh.shape["clients"])``). Other
      axes of the mesh are left to the caller (sweep members' round vmaps
      this round with the member axis sharded over one).
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
  run_group = clients.group_fn(algorithm, strategy.step_loop,
                        strategy.max_unroll_steps)
  pre_run_group = None
  if algorithm.pre_round is not None:
    pre_run_group = clients.group_fn(clients.pre_round_algorithm(algorithm),
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
      return clients.sum_clients(outputs, client_mask), outputs[2]

    chunk = 1 if strategy.client_parallel == "map" else strategy.chunk_size
    num_clients = client_mask.shape[0]
    if mesh is not None:
      chunk = _sharded_chunk(chunk, num_clients, mesh.shape["clients"])
    padded = _pad_clients((per_client, client_mask), chunk)
    num_chunks = -(-num_clients // chunk)
    strided = mesh is not None
    chunked = _chunk(padded, num_chunks, strided)

    def chunk_sums(inputs, mask, broadcast, agg_state, round_rng,
                   noise_round_rng):
      out = run_group(broadcast, agg_state, round_rng, noise_round_rng,
                      *inputs)
      return clients.sum_clients(out, mask), out[2]

    if mesh is not None:
      # Each device trains and sums its own clients of the chunk with no
      # communication (a step's skip test and the sums stay local; as one
      # SPMD program every step's test would be an all-reduce across the
      # processes); the devices' sums are added once after the loop.
      local_sums = chunk_sums

      def chunk_sums(inputs, mask, *replicated):
        sums, states = local_sums(inputs, mask, *replicated)
        return jax.tree.map(lambda a: a[None], sums), states

      clients_spec = PartitionSpec("clients")
      chunk_sums = jax.shard_map(
          chunk_sums, mesh=mesh,
          in_specs=(clients_spec, clients_spec) + (PartitionSpec(),) * 4,
          out_specs=(clients_spec, clients_spec),
          # The per-client code mixes replicated and per-device values (a
          # skipped step returns the replicated carry); outputs are all
          # per-device, so the replication check has nothing to add.
          check_vma=False)

    def body(acc, xs):
      inputs, mask = xs
      sums, states = chunk_sums(inputs, mask, broadcast, agg_state,
                                round_rng, noise_round_rng)
      return (sums if acc is None else _add(acc, sums)), states

    first = jax.tree.map(lambda a: a[0], chunked)
    acc_shape, _ = jax.eval_shape(lambda xs: body(None, xs), first)
    zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), acc_shape)
    sums, states = jax.lax.scan(body, zeros, chunked)
    if mesh is not None:
      sums = jax.tree.map(lambda a: jnp.sum(a, axis=0), sums)
    states = _unchunk(states, strided)
    return sums, jax.tree.map(lambda a: a[:num_clients], states)

  def round_fn(server_state, cohort, client_states, rng, noise_rng=None):
    trace_counter[0] += 1
    round_rng = jax.random.fold_in(rng, server_state.round)
    noise_round_rng = clients.noise_round_rng(round_rng, noise_rng,
                                              server_state.round)
    if pre_run_group is not None:
      pre_rng = jax.random.fold_in(round_rng, _PRE_ROUND_RNG_TAG)
      algorithm_states, _ = clients.split_states(algorithm, client_states)
      pre_sums, _ = clients_phase(
          pre_run_group, server_state, cohort, algorithm_states, pre_rng,
          pre_rng)
      server_state = clients.absorb(algorithm.pre_round, server_state,
                                    pre_sums)
    sums, new_states = clients_phase(run_group, server_state, cohort,
                                     client_states, round_rng,
                                     noise_round_rng)
    num_clients = jnp.sum(cohort["client_mask"])
    server_state, metrics = clients.finish_round(
        algorithm, server_state, server_state.aggregator_state, sums,
        num_clients, noise_round_rng, origins)
    return server_state, new_states, metrics

  if strategy.step_loop == "host":
    fn = build_host_loop_round(algorithm, donate, trace_counter, shard,
                               origins)
  else:
    out_shardings = None
    if mesh is not None:
      # The server state and metrics replicated, the client states sharded
      # like the cohort: what the next round (and other processes) take.
      replicated = NamedSharding(mesh, PartitionSpec())
      out_shardings = (replicated,
                       NamedSharding(mesh, PartitionSpec("clients")),
                       replicated)
    fn = jax.jit(round_fn, donate_argnums=(0, 2) if donate else (),
                 out_shardings=out_shardings)
  fn.trace_count = lambda: trace_counter[0]
  fn.metric_origins = lambda: dict(origins)
  return fn
