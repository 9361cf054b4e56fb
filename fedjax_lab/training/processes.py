"""A run's rounds over one process or many: placing inputs, collecting outputs,
agreeing on when to stop.

With one process this is the single-process path unchanged: the cohort and
the gathered client states go to the device(s) with ``device_put``, and the
round's outputs come back as they are.

When the run spans processes (:mod:`fedjax_lab.engine.distributed`), every
process runs the same loop:

* it builds and transfers only its own rows of each round's cohort (the
  rows its devices hold) and its own rows of the gathered client states;
* the server state and the random keys enter the round replicated on every
  device, and the round's server state and metrics come out replicated
  (every process can read them without communication);
* each round's new client states are all-gathered, so every process keeps
  the same host copy of the population's states (the next round may give
  any client to any process);
* only the coordinator (process 0) writes: it alone holds the workdir lock,
  the checkpoints, the metrics and the summary, runs the callbacks, and
  decides each round whether to stop; the others follow its decision
  (:meth:`ProcessGroup.agree`), so every process runs the same rounds.
"""

from __future__ import annotations

from typing import Any, Callable

from jax.sharding import Mesh

from fedjax_lab.engine import distributed
from fedjax_lab.engine import round as round_lib

PyTree = Any


class ProcessGroup:
  """This process's part in a run (a single process is a group of one).

  Attributes:
    mesh: the client mesh over every device of every process (None: one
      device).
    multiprocess: whether the run spans several processes.
    coordinator: whether this process writes the run's outputs.
  """

  def __init__(self, mesh: Mesh | None):
    self.mesh = mesh
    self.multiprocess = distributed.is_multiprocess()
    self.coordinator = distributed.is_coordinator()

  def client_rows(self) -> Callable[[int], tuple[int, int]] | None:
    """For ``make_round_cohort(client_rows=...)``: this process's rows of a
    padded cohort (None: all rows)."""
    if not self.multiprocess:
      return None
    mesh = self.mesh
    return lambda padded_size: distributed.local_client_rows(padded_size,
                                                             mesh)

  def replicate(self, tree: PyTree) -> PyTree:
    """Round inputs every process holds whole (server state, keys) as the
    compiled round takes them."""
    return distributed.place_replicated(tree, self.mesh)

  def round_inputs(self, cohort: dict[str, Any], padded_size: int,
                   client_states: PyTree) -> tuple[dict[str, Any], PyTree]:
    """``(placed cohort, placed client states of its clients)`` from this
    process's cohort rows (all rows with one process)."""
    gathered = round_lib.gather_client_states(client_states,
                                              cohort["client_indices"])
    if not self.multiprocess:
      return round_lib.place_cohort(cohort, self.mesh), gathered
    return (distributed.place_client_rows(cohort, self.mesh, padded_size),
            distributed.place_client_rows(gathered, self.mesh, padded_size))

  def host_server_state(self, server_state: PyTree) -> PyTree:
    """The server state the callbacks and checkpoints read: with several
    processes a host copy (the replicated device arrays span processes, so
    a computation on them would need every process)."""
    if not self.multiprocess:
      return server_state
    return distributed.replicated_to_host(server_state)

  def new_client_states(self, new_states: PyTree,
                        placed_cohort: dict[str, Any],
                        cohort: dict[str, Any]) -> tuple[PyTree, Any]:
    """``(new states, their client indices)`` of every cohort row, on the
    host of every process (an all-gather with several processes; with one,
    the host ``cohort``'s indices)."""
    if not self.multiprocess:
      return new_states, cohort["client_indices"]
    return distributed.gather_to_host(
        (new_states, placed_cohort["client_indices"]))

  def agree(self, decision: Any) -> Any:
    """The coordinator's ``decision`` (JSON-serialisable) on every
    process."""
    if not self.multiprocess:
      return decision
    return distributed.broadcast_json(decision)

  def agree_state(self, tree: PyTree) -> PyTree:
    """The coordinator's ``tree`` (numpy leaves and typed keys, the same
    structure everywhere) on every process."""
    if not self.multiprocess:
      return tree
    return distributed.broadcast_from_coordinator(tree)
