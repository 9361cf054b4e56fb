"""Per-client states on disk: memory-mapped, O(cohort) per round, with an
undo journal so that a run resumed from a checkpoint is exact.

:class:`DiskClientStates` keeps one ``.npy`` file per leaf of one client's
state with a leading ``[num_clients]`` axis, memory-mapped, and a
``written.npy`` flag per client. The files are created sparse: a client whose
flag is 0 has never been written and reads as the template (its initial
state), so creating a store of 10^6 clients writes nothing but headers.
:func:`~fedjax_lab.engine.store.gather_client_states` and
:func:`~fedjax_lab.engine.store.scatter_client_states` dispatch to
:meth:`DiskClientStates.gather` / :meth:`DiskClientStates.scatter`, with the
numpy store's rules (padding index -1 reads row 0 and is never written;
repeated indices: the last row wins).

Crash safety (write-ahead undo logging). Before a scatter overwrites rows,
their old values are appended to the current journal segment
``undo/after-<c>.undo`` (``c``: the last committed round) and fsync'd; only
then are the rows written. :meth:`DiskClientStates.commit` (called by the
checkpoint of round ``r``) flushes the memory maps, then atomically records
``r`` in ``commits.json`` and starts the segment ``after-<r>.undo``: its cost
is the rows written since the last commit plus a small JSON file, never
O(population). The segments of the last ``keep_commits`` commits are kept, so
:meth:`DiskClientStates.open` can roll the files back to any of those rounds
by undoing the newer segments, newest entry first. Rolling back is
idempotent: a crash while rolling back (or while committing) leaves a
directory that the next ``open`` rolls back correctly.

The protocol with a run's checkpoints (see :meth:`checkpoint_entry`):

1. ``commit(r)`` *before* the checkpoint of round ``r`` is written; the
   checkpoint's record keeps :meth:`checkpoint_entry` (store id, round).
2. On resume from a checkpoint of round ``r``: ``open(directory, template,
   rollback_to=r, store_id=...)``. A crash between 1 and the checkpoint
   leaves a commit newer than the newest checkpoint: it is undone. A round
   older than the kept commits, or another store, raises
   :class:`StoreRollbackError`.

``durable=False`` skips the per-scatter fsync of the journal: still exact
after the process dies (kill -9, OOM, an exception), not after a power loss
or kernel crash.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from typing import Any

import jax
import numpy as np

from fedjax_lab.engine import undo_journal
from fedjax_lab.engine.undo_journal import LeafLayout, UndoEntry

PyTree = Any

META_FILE = "store.json"
COMMITS_FILE = "commits.json"
WRITTEN_FILE = "written.npy"
JOURNAL_DIR = "undo"
_FORMAT = 1


class StoreRollbackError(RuntimeError):
  """The store cannot be rolled back to the requested round (too old, never
  committed, or another store); the message says which rounds it can."""


@dataclasses.dataclass(frozen=True)
class CommitStats:
  """What one :meth:`DiskClientStates.commit` did.

  Attributes:
    round: the committed round.
    rows_flushed: client rows written (hence flushed) since the last commit.
    journal_bytes: bytes of the undo entries written since the last commit.
    metadata_bytes: bytes the commit itself wrote (``commits.json``).
  """

  round: int
  rows_flushed: int
  journal_bytes: int
  metadata_bytes: int


def _leaf_file(position: int) -> str:
  return f"leaf-{position:04d}.npy"


def _layouts(template: PyTree) -> tuple[list[np.ndarray], Any,
                                        list[LeafLayout]]:
  """Template leaves (numpy), treedef and layouts of one client's state."""
  leaves, treedef = jax.tree.flatten(template)
  leaves = [np.asarray(leaf) for leaf in leaves]
  layouts = [LeafLayout(leaf.shape, leaf.dtype) for leaf in leaves]
  return leaves, treedef, layouts


class DiskClientStates:
  """A population's per-client states in memory-mapped files.

  Create one with :meth:`create`, reopen (rolling back) with :meth:`open`.
  Attributes: ``directory``, ``num_clients``, ``store_id`` (random, fixed at
  creation), ``committed_rounds`` (the rounds it can roll back to, oldest
  first; the last is the current base).
  """

  def __init__(self, directory: str, template: PyTree, meta: dict[str, Any],
               committed: list[int], durable: bool):
    """Internal: use :meth:`create` or :meth:`open`."""
    self.directory = directory
    self.num_clients = int(meta["num_clients"])
    self.store_id = str(meta["store_id"])
    self.keep_commits = int(meta["keep_commits"])
    self.durable = durable
    self.committed_rounds = list(committed)
    self._template, self._treedef, self._layouts = _layouts(template)
    stored = [(tuple(s), np.dtype(d)) for s, d in meta["leaves"]]
    if stored != [(l.shape, l.dtype) for l in self._layouts]:
      raise ValueError(
          f"{directory} holds leaves {stored}, the template has "
          f"{[(l.shape, l.dtype) for l in self._layouts]}")
    maps = [undo_journal.map_npy(os.path.join(directory, name)) for name in
            [_leaf_file(i) for i in range(len(self._layouts))] +
            [WRITTEN_FILE]]
    self._maps = [mapped for mapped, _ in maps]
    self._leaves = [array for _, array in maps[:-1]]
    self._written = maps[-1][1]
    self._segment_fd: int | None = None
    self._rows_since_commit = 0
    self._journal_bytes_since_commit = 0

  # ------------------------------------------------------------ creating

  @classmethod
  def create(cls, directory: str, template: PyTree, num_clients: int, *,
             keep_commits: int = 4, durable: bool = True,
             initial_states: PyTree | None = None) -> "DiskClientStates":
    """A new store of ``num_clients`` clients, each starting at ``template``
    (one client's state), committed at round 0.

    Files are sparse: O(1) time and disk for any ``num_clients``. With
    ``initial_states`` (a stacked pytree ``[num_clients, ...]``, for
    per-client initial states) every row is written once instead.
    ``keep_commits``: how many committed rounds stay reachable by
    :meth:`open` (a run keeping ``k`` checkpoints needs ``k + 1``).

    Raises:
      FileExistsError: ``directory`` already holds a store.
    """
    if keep_commits < 1:
      raise ValueError(f"keep_commits must be >= 1, got {keep_commits}")
    if os.path.exists(os.path.join(directory, META_FILE)):
      raise FileExistsError(f"{directory} already holds a client store")
    os.makedirs(os.path.join(directory, JOURNAL_DIR), exist_ok=True)
    _, _, layouts = _layouts(template)
    for position, layout in enumerate(layouts):
      array = np.lib.format.open_memmap(
          os.path.join(directory, _leaf_file(position)), mode="w+",
          dtype=layout.dtype, shape=(num_clients,) + layout.shape)
      if initial_states is not None:
        array[...] = jax.tree.leaves(initial_states)[position]
      array.flush()
      del array
    written = np.lib.format.open_memmap(
        os.path.join(directory, WRITTEN_FILE), mode="w+", dtype=np.uint8,
        shape=(num_clients,))
    if initial_states is not None:
      written[...] = 1
    written.flush()
    del written
    undo_journal.write_file_atomically(
        os.path.join(directory, COMMITS_FILE),
        json.dumps({"committed": [0]}).encode())
    for base in undo_journal.segment_bases(
        os.path.join(directory, JOURNAL_DIR)):  # a crashed create's
      os.unlink(os.path.join(directory, JOURNAL_DIR,
                             undo_journal.segment_name(base)))
    meta = {"format": _FORMAT, "store_id": uuid.uuid4().hex,
            "num_clients": int(num_clients), "keep_commits": int(keep_commits),
            "leaves": [[list(l.shape), l.dtype.str] for l in layouts]}
    undo_journal.write_file_atomically(  # last: marks the store complete
        os.path.join(directory, META_FILE), json.dumps(meta).encode())
    store = cls(directory, template, meta, [0], durable)
    store._start_segment(0)
    return store

  @classmethod
  def open(cls, directory: str, template: PyTree, *,
           rollback_to: int | None = None, store_id: str | None = None,
           durable: bool = True) -> "DiskClientStates":
    """Reopens a store, rolled back to ``rollback_to`` (default: its last
    committed round), undoing every write made after that commit.

    Args:
      directory: the store's directory.
      template: one client's state (same structure, shapes and dtypes as at
        creation).
      rollback_to: the round to return to, one of ``committed_rounds``
        (e.g. the round of the checkpoint a run resumes from).
      store_id: when given, must be the store's id (from the checkpoint's
        :meth:`checkpoint_entry`).
      durable: fsync each journal entry before writing rows.

    Raises:
      FileNotFoundError: no (complete) store in ``directory``.
      StoreRollbackError: another store, or ``rollback_to`` not committed
        or no longer kept.
    """
    with open(os.path.join(directory, META_FILE)) as f:
      meta = json.load(f)
    if store_id is not None and meta["store_id"] != store_id:
      raise StoreRollbackError(
          f"{directory} holds client store {meta['store_id']}, the "
          f"checkpoint names {store_id}: not this run's client states")
    with open(os.path.join(directory, COMMITS_FILE)) as f:
      committed = list(json.load(f)["committed"])
    target = committed[-1] if rollback_to is None else int(rollback_to)
    if target not in committed:
      raise StoreRollbackError(
          f"the client store in {directory} cannot return to round {target}: "
          f"it can return to rounds {committed} only (keep_commits="
          f"{meta['keep_commits']}; was commit() called before each "
          "checkpoint, with keep_commits > checkpoints kept?)")
    committed = [c for c in committed if c <= target]
    store = cls(directory, template, meta, committed, durable)
    # First record the target: a crash from here on rolls back to it again.
    undo_journal.write_file_atomically(
        os.path.join(directory, COMMITS_FILE),
        json.dumps({"committed": committed}).encode())
    store._roll_back_to(target)
    store._start_segment(target)
    return store

  # ------------------------------------------------------ gather / scatter

  def gather(self, client_indices: np.ndarray) -> PyTree:
    """The cohort's rows: a pytree like the template with numpy leaves
    ``[C, ...]``; padding (index -1) reads row 0, as the numpy store does.
    Reads O(C) rows."""
    rows = np.maximum(np.asarray(client_indices, np.int64), 0)
    fresh = self._written[rows] == 0
    out = []
    for array, template in zip(self._leaves, self._template):
      values = np.array(array[rows])
      values[fresh] = template
      out.append(values)
    return jax.tree.unflatten(self._treedef, out)

  def scatter(self, client_indices: np.ndarray, rows: PyTree) -> int:
    """Writes the real clients' new rows (``rows``: pytree ``[C, ...]``);
    padding (-1) is never written, and of repeated indices the last row
    wins. The old values are journaled first. Returns the rows written."""
    client_indices = np.asarray(client_indices, np.int64)
    real = client_indices >= 0
    targets = client_indices[real]
    if targets.size == 0:
      return 0
    if np.any(targets >= self.num_clients):
      raise IndexError(f"client index {targets.max()} >= num_clients "
                       f"{self.num_clients}")
    new_leaves = jax.tree.leaves(rows)
    if len(new_leaves) != len(self._leaves):
      raise ValueError("rows do not have the template's structure")
    entry = UndoEntry(targets, np.array(self._written[targets]),
                      [np.array(array[targets]) for array in self._leaves])
    self._append(undo_journal.encode_entry(entry))
    for array, new in zip(self._leaves, new_leaves):
      array[targets] = np.asarray(new)[real]
    self._written[targets] = 1
    self._rows_since_commit += int(targets.size)
    return int(targets.size)

  # -------------------------------------------------------------- commits

  def commit(self, rounds_done: int) -> CommitStats:
    """Makes the current contents the state after ``rounds_done`` rounds:
    flushes the written rows, records the round atomically and starts a new
    journal segment. Call it before writing the checkpoint of that round.
    Cost: the rows written since the last commit + O(1) metadata.

    Raises:
      ValueError: ``rounds_done`` is not after the last committed round.
    """
    last = self.committed_rounds[-1]
    if rounds_done <= last:
      if rounds_done == last and self._rows_since_commit == 0:
        return CommitStats(rounds_done, 0, 0, 0)
      raise ValueError(f"commit({rounds_done}) after round {last} was "
                       "committed: rounds must increase")
    rows, journal_bytes = (self._rows_since_commit,
                           self._journal_bytes_since_commit)
    if rows:
      self._flush()
    os.fsync(self._segment_fd)
    committed = (self.committed_rounds + [rounds_done])[-self.keep_commits:]
    metadata = undo_journal.write_file_atomically(
        os.path.join(self.directory, COMMITS_FILE),
        json.dumps({"committed": committed}).encode())
    self.committed_rounds = committed
    self._start_segment(rounds_done)
    return CommitStats(rounds_done, rows, journal_bytes, metadata)

  def checkpoint_entry(self) -> dict[str, Any]:
    """What a checkpoint's record keeps about the store (after
    :meth:`commit`): ``{"store_id", "committed_round", "num_clients"}``;
    pass ``store_id`` and ``rollback_to=committed_round`` to :meth:`open`."""
    return {"store_id": self.store_id,
            "committed_round": self.committed_rounds[-1],
            "num_clients": self.num_clients}

  # ----------------------------------------------------------- inspection

  def nbytes_on_disk(self) -> int:
    """Bytes the store's files occupy on disk (allocated blocks: sparse
    regions do not count)."""
    total = 0
    for root, _, names in os.walk(self.directory):
      for name in names:
        total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total

  def nbytes_logical(self) -> int:
    """Bytes the population's states would take dense (all leaves)."""
    return self.num_clients * sum(l.row_bytes for l in self._layouts)

  def to_numpy(self, client_indices: np.ndarray | None = None) -> PyTree:
    """The states of ``client_indices`` (default: every client, O(N)
    memory; for tests and small populations) as numpy ``[n, ...]``."""
    if client_indices is None:
      client_indices = np.arange(self.num_clients)
    return self.gather(np.asarray(client_indices))

  def close(self) -> None:
    """Closes the journal and drops the memory maps; unflushed rows stay in
    the page cache, and are undone by the next :meth:`open` unless
    committed."""
    if self._segment_fd is not None:
      os.close(self._segment_fd)
      self._segment_fd = None
    self._leaves, self._written = [], None
    for mapped in self._maps:
      try:
        mapped.close()
      except BufferError:  # an outside view still uses it: left to the GC
        pass
    self._maps = []

  def __enter__(self) -> "DiskClientStates":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # ------------------------------------------------------------ internals

  def _journal_path(self, base: int) -> str:
    return os.path.join(self.directory, JOURNAL_DIR,
                        undo_journal.segment_name(base))

  def _append(self, data: bytes) -> None:
    """Appends one encoded entry to the open segment (fsync'd if durable)."""
    view = memoryview(data)
    while view:
      view = view[os.write(self._segment_fd, view):]
    if self.durable:
      os.fsync(self._segment_fd)
    self._journal_bytes_since_commit += len(data)

  def _flush(self) -> None:
    """Writes the dirty pages of every memory map to disk (msync)."""
    for mapped in self._maps:
      mapped.flush()

  def _start_segment(self, base: int) -> None:
    """Opens an empty segment after ``base`` for the next writes, and
    deletes the segments no kept commit needs."""
    if self._segment_fd is not None:
      os.close(self._segment_fd)
    journal = os.path.join(self.directory, JOURNAL_DIR)
    self._segment_fd = os.open(self._journal_path(base),
                               os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.fsync(self._segment_fd)
    for old in undo_journal.segment_bases(journal):
      if old < self.committed_rounds[0]:
        os.unlink(self._journal_path(old))
    undo_journal.fsync_directory(journal)
    self._rows_since_commit = 0
    self._journal_bytes_since_commit = 0

  def _roll_back_to(self, target: int) -> int:
    """Undoes every journaled write after the commit of ``target`` (the
    segments based at ``target`` or later, newest entry first), flushes,
    then deletes the newer segments newest first. Returns rows restored."""
    journal = os.path.join(self.directory, JOURNAL_DIR)
    bases = [b for b in undo_journal.segment_bases(journal) if b >= target]
    restored = 0
    for base in sorted(bases, reverse=True):
      entries, _ = undo_journal.read_entries(self._journal_path(base),
                                             self._layouts)
      for entry in reversed(entries):
        for array, old in zip(self._leaves, entry.leaves):
          array[entry.indices] = old
        self._written[entry.indices] = entry.written
        restored += len(entry.indices)
    if restored:
      self._flush()
    # Newest first: what is left is always a suffix-free run of segments
    # whose undoing (again) still ends at ``target``.
    for base in sorted(bases, reverse=True):
      if base > target:
        os.unlink(self._journal_path(base))
    undo_journal.fsync_directory(journal)
    return restored
