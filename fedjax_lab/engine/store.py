"""Host-side per-client state store and cohort placement for the round.

Per-client states live on the host as numpy arrays with a leading
``[num_clients]`` axis; a round gathers its cohort's rows, runs, and scatters
the real clients' new rows back (padding rows are never written). When the
algorithm's aggregation keeps per-client state (e.g. error-feedback
residuals) each row is a :class:`~fedjax_lab.algorithms.base.ClientStates`
pair and travels the same way.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_lab.engine.disk_states import DiskClientStates

PyTree = Any


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


def gather_client_states(states: PyTree | DiskClientStates,
                         client_indices: np.ndarray) -> PyTree:
  """Rows of host-side stacked per-client states for a cohort (pads get row
  0); a :class:`DiskClientStates` reads its rows from disk (same rules)."""
  if isinstance(states, DiskClientStates):
    return states.gather(client_indices)
  rows = np.maximum(client_indices, 0)
  return jax.tree.map(lambda s: np.asarray(s)[rows], states)


def scatter_client_states(states: PyTree | DiskClientStates,
                          client_indices: np.ndarray, updated: PyTree,
                          in_place: bool = False
                          ) -> PyTree | DiskClientStates:
  """Writes a cohort's new client states back into the stacked host states.

  By default the store is copied first (the input is left as it was). With
  ``in_place`` the rows are written into the given (writable numpy) arrays,
  so a round costs O(cohort) host memory traffic instead of O(population):
  what a runner that owns its store wants. Padding clients (index -1) are
  never written. A :class:`DiskClientStates` is always written in place
  (journaled, see :meth:`DiskClientStates.scatter`) and returned; it needs
  ``in_place=True`` (it cannot be copied).
  """
  if isinstance(states, DiskClientStates):
    if not in_place:
      raise ValueError("a DiskClientStates is written in place: pass "
                       "in_place=True to scatter_client_states")
    states.scatter(client_indices, updated)
    return states
  real = client_indices >= 0

  def put(all_rows, new_rows):
    if not in_place or not (isinstance(all_rows, np.ndarray) and
                            all_rows.flags.writeable):
      all_rows = np.array(all_rows)
    all_rows[client_indices[real]] = np.asarray(new_rows)[real]
    return all_rows

  return jax.tree.map(put, states, updated)


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
