"""Where a run keeps its clients' persistent states: in memory or on disk.

``config.client_state_store``:

* ``"memory"`` (default): a numpy pytree with a leading ``[num_clients]``
  axis, saved whole in every checkpoint;
* ``"disk"``: :class:`~fedjax_lab.engine.disk_states.DiskClientStates` in
  ``workdir/client_states`` (memory-mapped, O(cohort) touched per round, for
  populations whose states do not fit in memory or would make every
  checkpoint copy the population). A checkpoint of round ``r`` commits the
  store at ``r`` (O(rows written since the last commit)) and records the
  store's id and round; the checkpoint's state then holds the server state
  only. A resume rolls the store back to the checkpoint's round, so a
  resumed run equals an uninterrupted one.

Either way the round loop gathers and scatters through
:mod:`fedjax_lab.engine.store`, which dispatches to the store.
"""

from __future__ import annotations

import os
from typing import Any

import jax

from fedjax_lab.engine import disk_states
from fedjax_lab.engine import round as round_lib
from fedjax_lab.training.setup import Experiment

PyTree = Any
STORES = ("memory", "disk")
STORE_DIR = "client_states"
RECORD_KEY = "client_store"


class StoreError(RuntimeError):
  """The run's client-state store cannot be opened as the checkpoint
  requires (the message says why and what to do)."""


def on_disk(exp: Experiment) -> bool:
  """Whether ``exp`` keeps its client states on disk."""
  store = exp.config.get("client_state_store", "memory")
  if store not in STORES:
    raise ValueError(f"client_state_store must be one of {STORES}, got "
                     f"{store!r}.")
  return store == "disk"


def initial_states(exp: Experiment, params: PyTree) -> PyTree:
  """Every client's initial state, in memory (``[num_clients, ...]``)."""
  num_clients = exp.dataset.train.num_clients
  if exp.client_states_init is not None:
    return exp.client_states_init(params, num_clients)
  return round_lib.stack_client_states(
      exp.algorithm.client_state_init(params), num_clients)


def open_disk_store(exp: Experiment, workdir: str, params: PyTree,
                    record: dict[str, Any] | None,
                    keep_commits: int) -> disk_states.DiskClientStates:
  """The run's on-disk store: created for a fresh run (``record`` None),
  rolled back to the checkpoint's round for a resumed one.

  Per-client initial states that differ between clients (an algorithm's
  ``client_states_init``) are written once, O(population); otherwise
  creating the store writes nothing but headers.

  Raises:
    StoreError: the checkpoint names no store, or the store cannot be
      rolled back to it.
  """
  directory = os.path.join(workdir, STORE_DIR)
  template = exp.algorithm.client_state_init(params)
  if record is None:
    initial = None
    if exp.client_states_init is not None:
      initial = exp.client_states_init(params, exp.dataset.train.num_clients)
    return disk_states.DiskClientStates.create(
        directory, template, exp.dataset.train.num_clients,
        keep_commits=keep_commits + 1, initial_states=initial)
  entry = record.get(RECORD_KEY)
  if entry is None:
    raise StoreError(
        f"{workdir}: the checkpoint holds the client states in memory but "
        "the config asks for client_state_store='disk'; resume with "
        "--config.client_state_store=memory or pass a new --workdir.")
  try:
    return disk_states.DiskClientStates.open(
        directory, template, rollback_to=int(entry["committed_round"]),
        store_id=entry["store_id"])
  except (disk_states.StoreRollbackError, FileNotFoundError, ValueError) as e:
    raise StoreError(
        f"{directory}: cannot restore the client states of the checkpoint "
        f"(round {entry['committed_round']}): {e}. Pass a new --workdir to "
        "start over.") from None


def checkpoint_state(server_state: PyTree, client_states: PyTree,
                     rounds_done: int
                     ) -> tuple[PyTree, dict[str, Any]]:
  """``(state to checkpoint, extra record fields)``: the in-memory store is
  saved whole; an on-disk store is committed at ``rounds_done`` and
  named in the record instead."""
  if isinstance(client_states, disk_states.DiskClientStates):
    client_states.commit(rounds_done)
    return ((server_state, None),
            {RECORD_KEY: client_states.checkpoint_entry()})
  return (server_state, client_states), {}


def checkpoint_template(server_state: PyTree, client_states: PyTree,
                        disk: bool) -> PyTree:
  """The structure a checkpoint of this run restores into."""
  return (server_state, None) if disk else (server_state, client_states)


def close(client_states: PyTree) -> None:
  """Closes an on-disk store (nothing for the in-memory one)."""
  if isinstance(client_states, disk_states.DiskClientStates):
    client_states.close()


def refuse_across_processes(exp: Experiment) -> None:
  """A multi-process run keeps a copy of the client states on every
  process; the on-disk store (one journal, committed by the coordinator's
  checkpoints) is single-process for now.

  Raises:
    StoreError: ``client_state_store='disk'`` with several processes.
  """
  if on_disk(exp) and jax.process_count() > 1:
    raise StoreError(
        "client_state_store='disk' runs in one process (each process would "
        "need its own journal committed with the coordinator's "
        "checkpoints); use client_state_store='memory' with "
        "--num_processes > 1.")
