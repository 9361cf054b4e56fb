"""One experiment over many processes and hosts, with JAX's own runtime.

A run spread over processes is JAX's multi-controller model: every process
runs the same program, :func:`initialize` joins them through
``jax.distributed.initialize`` (a coordinator address, the process count and
this process's id, from arguments or from what a cluster provides: SLURM,
Open MPI, Kubernetes, Cloud TPU, or ``JAX_COORDINATOR_ADDRESS``), and
``jax.devices()`` then lists every device of every process. The round's
client axis is sharded over a mesh of all of them
(:func:`fedjax_lab.engine.store.client_mesh`); each process builds and
transfers only the cohort rows its own devices hold
(:func:`local_client_rows`, :func:`place_client_rows`); sums over clients
are the compiler's collectives (on CPU through gloo, which
:func:`initialize` selects). Everything replicated (the server state, the
aggregate, the DP noise drawn from the round's key) is computed identically
on every process: noise is drawn once for the cohort, never per process.

The host-side helpers here are the only places processes talk outside the
compiled round: :func:`broadcast_from_coordinator` (the run's starting
state, its secret seed, the stop decision of each round) and
:func:`gather_to_host` (a round's per-client states, which every process
keeps a copy of). Writing (metrics, checkpoints, summaries) is the
coordinator's job: :func:`is_coordinator`.

With one process every helper is the identity (or a plain device transfer),
so single-process code paths are unchanged.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

# Environment variables a launcher (experiments.run --num_processes) sets
# for each process it starts; a cluster job may set them instead of flags.
ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "FEDJAX_LAB_NUM_PROCESSES"
ENV_PROCESS_ID = "FEDJAX_LAB_PROCESS_ID"


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               initialization_timeout_s: int = 120) -> None:
  """Joins this process to a multi-process run (``jax.distributed``).

  Call before any other JAX use. Arguments left ``None`` come from
  :data:`ENV_COORDINATOR` / :data:`ENV_NUM_PROCESSES` /
  :data:`ENV_PROCESS_ID`, else from JAX's cluster detection. CPU devices use
  gloo collectives (the CPU backend has no others).

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: processes in the run.
    process_id: this process's id in ``[0, num_processes)``.
    initialization_timeout_s: how long to wait for every process to join.

  Raises:
    ValueError: an id outside ``[0, num_processes)``.
  """
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if num_processes is not None and process_id is not None and not (
      0 <= process_id < num_processes):
    raise ValueError(f"process_id must be in [0, {num_processes}), got "
                     f"{process_id}.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=initialization_timeout_s)


def requested_by_environment() -> bool:
  """Whether a launcher asked this process to join a multi-process run."""
  return bool(os.environ.get(ENV_NUM_PROCESSES)) and int(
      os.environ[ENV_NUM_PROCESSES]) > 1


def is_multiprocess() -> bool:
  """Whether this run spans more than one process."""
  return jax.process_count() > 1


def is_coordinator() -> bool:
  """Whether this process writes the run's outputs (process 0)."""
  return jax.process_index() == 0


def local_client_rows(num_clients: int, mesh: Mesh | None) -> tuple[int, int]:
  """``(start, stop)``: the rows of a ``[num_clients]`` client axis sharded
  over ``mesh`` that this process's devices hold (all rows without a mesh).

  Raises:
    ValueError: this process's rows are not one contiguous block (a mesh
      whose devices are not grouped by process).
  """
  if mesh is None or not is_multiprocess():
    return 0, num_clients
  sharding = NamedSharding(mesh, PartitionSpec("clients"))
  blocks = sorted(
      (index[0].start or 0, num_clients if index[0].stop is None
       else index[0].stop)
      for index in sharding.addressable_devices_indices_map(
          (num_clients,)).values())
  start, stop = blocks[0][0], blocks[0][1]
  for block_start, block_stop in blocks[1:]:
    if block_start > stop:
      raise ValueError(
          "this process's devices hold non-contiguous client rows; build the "
          "mesh with devices grouped by process (client_mesh() does).")
    stop = max(stop, block_stop)
  return start, stop


def place_client_rows(local: PyTree, mesh: Mesh, num_clients: int) -> PyTree:
  """Global arrays ``[num_clients, ...]`` sharded over ``mesh``'s
  ``"clients"`` axis from this process's rows
  (:func:`local_client_rows`); no process sends another one its data."""
  sharding = NamedSharding(mesh, PartitionSpec("clients"))

  def place(rows):
    rows = np.asarray(rows)
    return jax.make_array_from_process_local_data(
        sharding, rows, (num_clients,) + rows.shape[1:])
  return jax.tree.map(place, local)


def _is_key(leaf) -> bool:
  return jax.dtypes.issubdtype(getattr(leaf, "dtype", None),
                               jax.dtypes.prng_key)


def place_replicated(tree: PyTree, mesh: Mesh | None) -> PyTree:
  """``tree`` (the same values on every process) as arrays replicated on
  every device of ``mesh``; typed PRNG keys stay typed keys. Without a mesh
  or with one process it is returned as it is."""
  if mesh is None or not is_multiprocess():
    return tree
  sharding = NamedSharding(mesh, PartitionSpec())

  def place(leaf):
    if _is_key(leaf):
      return jax.random.wrap_key_data(place(jax.random.key_data(leaf)),
                                      impl=jax.random.key_impl(leaf))
    value = np.asarray(leaf)
    return jax.make_array_from_process_local_data(sharding, value,
                                                  value.shape)
  return jax.tree.map(place, tree)


def gather_to_host(tree: PyTree) -> PyTree:
  """Host numpy copies of (possibly sharded) global arrays, whole on every
  process (an all-gather when the run spans processes)."""
  if not is_multiprocess():
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def replicated_to_host(tree: PyTree) -> PyTree:
  """Host copies of replicated arrays (no communication: every process
  holds them whole); typed PRNG keys are kept as keys."""
  def get(leaf):
    if _is_key(leaf):
      data = np.asarray(jax.device_get(jax.random.key_data(leaf)))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
    return np.asarray(jax.device_get(leaf))
  return jax.tree.map(get, tree)


def broadcast_from_coordinator(tree: PyTree) -> PyTree:
  """Process 0's value of ``tree`` (numpy leaves, the same structure,
  shapes and dtypes on every process), on every process. Typed PRNG keys
  are sent as their key data."""
  if not is_multiprocess():
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree.flatten(tree)
  keys = [(i, jax.random.key_impl(leaf)) for i, leaf in enumerate(leaves)
          if _is_key(leaf)]
  key_positions = dict(keys)
  plain = [np.asarray(jax.random.key_data(leaf)) if i in key_positions
           else np.asarray(leaf) for i, leaf in enumerate(leaves)]
  received = multihost_utils.broadcast_one_to_all(plain)
  out = [jax.random.wrap_key_data(np.asarray(value), impl=key_positions[i])
         if i in key_positions else np.asarray(value).astype(plain[i].dtype)
         for i, value in enumerate(received)]
  return jax.tree.unflatten(treedef, out)


def broadcast_json(value: Any) -> Any:
  """Process 0's JSON-serialisable ``value`` on every process (other
  processes may pass anything, e.g. ``None``)."""
  if not is_multiprocess():
    return value
  data = np.frombuffer(json.dumps(value).encode() if is_coordinator()
                       else b"", np.uint8)
  length = int(broadcast_from_coordinator(np.array([data.size], np.int32))[0])
  buffer = np.zeros([length], np.uint8)
  if is_coordinator():
    buffer[:] = data
  buffer = broadcast_from_coordinator(buffer)
  return json.loads(bytes(buffer).decode())


def broadcast_int(value: int) -> int:
  """Process 0's ``value`` (a 64-bit integer) on every process."""
  if not is_multiprocess():
    return int(value)
  value = int(value) % 2**64
  words = np.array([value >> 32, value & 0xFFFFFFFF], np.uint32)
  words = broadcast_from_coordinator(words)
  return (int(words[0]) << 32) | int(words[1])
