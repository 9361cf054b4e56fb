"""The on-disk client-state store: the numpy store's gather/scatter rules,
rollback to a committed round after a crash (torn journal entries, crashes
while committing or rolling back), commit cost and memory independent of the
population, and ClientStates pairs."""

import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import tracemalloc

import jax
import numpy as np
import pytest

from fedjax_lab.algorithms import base
from fedjax_lab.engine import disk_states, store, undo_journal
from fedjax_lab.engine.disk_states import DiskClientStates, StoreRollbackError

NUM_CLIENTS = 40
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def _template():
  """A paired state: algorithm leaves and a per-client aggregation state."""
  return base.ClientStates(
      algorithm={"c": np.full([3, 2], 0.25, np.float32),
                 "count": np.int32(7)},
      aggregation=((np.zeros([4], np.float32), ()), ()))


def _rows(rng, template, size):
  """Random new rows ``[size, ...]`` shaped like ``template``."""
  return jax.tree.map(
      lambda leaf: rng.normal(size=(size,) + np.shape(leaf)).astype(
          np.asarray(leaf).dtype), template)


def _cohort(rng, num_clients, size=6):
  """Client indices with repeats and -1 padding mixed in."""
  indices = rng.integers(0, num_clients, size=size)
  indices[rng.random(size) < 0.25] = -1
  if size > 2:
    indices[1] = indices[0]  # a repeated client
  return indices


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def _play(states, rounds, seed, num_clients=NUM_CLIENTS):
  """Runs random rounds through the store API; returns each gather."""
  rng = np.random.default_rng(seed)
  gathered = []
  for _ in range(rounds):
    indices = _cohort(rng, num_clients)
    gathered.append(store.gather_client_states(states, indices))
    states = store.scatter_client_states(
        states, indices, _rows(rng, _template(), len(indices)),
        in_place=True)
  return states, gathered


def test_gather_and_scatter_match_the_numpy_store(tmp_path):
  memory = store.stack_client_states(_template(), NUM_CLIENTS)
  disk = DiskClientStates.create(str(tmp_path), _template(), NUM_CLIENTS)
  memory, expected = _play(memory, rounds=25, seed=1)
  disk_after, got = _play(disk, rounds=25, seed=1)
  assert disk_after is disk
  for a, b in zip(expected, got):
    _assert_same(a, b)
    assert isinstance(b, base.ClientStates)
  _assert_same(memory, disk.to_numpy())
  with pytest.raises(ValueError, match="in_place"):
    store.scatter_client_states(disk, np.array([0]), _rows(
        np.random.default_rng(0), _template(), 1))
  disk.close()


def test_per_client_initial_states(tmp_path):
  rng = np.random.default_rng(3)
  initial = _rows(rng, _template(), NUM_CLIENTS)
  disk = DiskClientStates.create(str(tmp_path), _template(), NUM_CLIENTS,
                                 initial_states=initial)
  _assert_same(jax.tree.map(np.asarray, initial), disk.to_numpy())
  memory, _ = _play(jax.tree.map(np.array, initial), 10, seed=4)
  _play(disk, 10, seed=4)
  _assert_same(memory, disk.to_numpy())
  disk.close()


def test_reopen_after_a_crash_rolls_back_to_the_last_commit(tmp_path):
  disk = DiskClientStates.create(str(tmp_path), _template(), NUM_CLIENTS)
  _play(disk, 5, seed=5)
  disk.commit(5)
  committed = disk.to_numpy()
  _play(disk, 4, seed=6)  # rounds 6-9: written, never committed
  del disk  # the process "dies": the written rows stay in the files
  reopened = DiskClientStates.open(str(tmp_path), _template())
  _assert_same(committed, reopened.to_numpy())
  assert reopened.committed_rounds == [0, 5]
  # Rerunning the lost rounds gives the uninterrupted run's states.
  _play(reopened, 4, seed=6)
  uninterrupted = store.stack_client_states(_template(), NUM_CLIENTS)
  uninterrupted, _ = _play(uninterrupted, 5, seed=5)
  uninterrupted, _ = _play(uninterrupted, 4, seed=6)
  _assert_same(uninterrupted, reopened.to_numpy())
  reopened.close()


def test_a_killed_process_is_rolled_back(tmp_path):
  script = textwrap.dedent(f"""
      import os, signal, numpy as np
      from tests.engine.test_disk_states import _play, _template
      from fedjax_lab.engine.disk_states import DiskClientStates
      disk = DiskClientStates.create({str(tmp_path)!r}, _template(), 40)
      _play(disk, 3, seed=7)
      disk.commit(3)
      _play(disk, 3, seed=8)
      os.kill(os.getpid(), signal.SIGKILL)
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=str(REPO_ROOT),
                          check=False, capture_output=True)
  assert result.returncode == -signal.SIGKILL, result.stderr.decode()
  expected, _ = _play(store.stack_client_states(_template(), NUM_CLIENTS), 3,
                      seed=7)
  with DiskClientStates.open(str(tmp_path), _template()) as reopened:
    _assert_same(expected, reopened.to_numpy())


@pytest.mark.parametrize("damage", ["truncated", "bad_checksum"])
def test_a_torn_last_journal_entry_is_ignored(tmp_path, damage):
  disk = DiskClientStates.create(str(tmp_path), _template(), NUM_CLIENTS)
  _play(disk, 3, seed=9)
  disk.commit(3)
  committed = disk.to_numpy()
  _play(disk, 2, seed=10)
  # The next scatter died while appending its entry (its rows were never
  # written: rows are written only after the entry is complete).
  indices = np.array([1, 2, 3])
  entry = undo_journal.UndoEntry(
      indices, np.zeros(3, np.uint8),
      [np.full((3,) + np.shape(leaf), 99, np.asarray(leaf).dtype)
       for leaf in jax.tree.leaves(_template())])
  data = bytearray(undo_journal.encode_entry(entry))
  if damage == "truncated":
    data = data[:len(data) // 2]
  else:
    data[-1] ^= 0xFF
  path = os.path.join(str(tmp_path), disk_states.JOURNAL_DIR,
                      undo_journal.segment_name(3))
  with open(path, "ab") as f:
    f.write(bytes(data))
  del disk
  with DiskClientStates.open(str(tmp_path), _template()) as reopened:
    _assert_same(committed, reopened.to_numpy())


def test_rolls_back_to_an_older_kept_commit_and_refuses_others(tmp_path):
  disk = DiskClientStates.create(str(tmp_path), _template(), NUM_CLIENTS,
                                 keep_commits=3)
  snapshots = {0: disk.to_numpy()}
  for rounds_done in (2, 4, 6, 8):
    _play(disk, 2, seed=rounds_done)
    disk.commit(rounds_done)
    snapshots[rounds_done] = disk.to_numpy()
  assert disk.committed_rounds == [4, 6, 8]
  store_id = disk.checkpoint_entry()["store_id"]
  assert disk.checkpoint_entry()["committed_round"] == 8
  _play(disk, 1, seed=11)
  del disk
  with pytest.raises(StoreRollbackError, match=r"\[4, 6, 8\]"):
    DiskClientStates.open(str(tmp_path), _template(), rollback_to=2)
  with pytest.raises(StoreRollbackError, match="not this run"):
    DiskClientStates.open(str(tmp_path), _template(), rollback_to=6,
                          store_id="another")
  # The newest checkpoint was lost: resume from round 6.
  with DiskClientStates.open(str(tmp_path), _template(), rollback_to=6,
                             store_id=store_id) as reopened:
    _assert_same(snapshots[6], reopened.to_numpy())
    assert reopened.committed_rounds == [4, 6]
    _play(reopened, 1, seed=12)
  with pytest.raises(StoreRollbackError):  # 8 was undone
    DiskClientStates.open(str(tmp_path), _template(), rollback_to=8)
  with DiskClientStates.open(str(tmp_path), _template(),
                             rollback_to=4) as reopened:
    _assert_same(snapshots[4], reopened.to_numpy())
    with pytest.raises(ValueError, match="increase"):
      _play(reopened, 1, seed=13)
      reopened.commit(3)


def test_a_crash_while_rolling_back_is_completed_by_the_next_open(
    tmp_path, monkeypatch):
  disk = DiskClientStates.create(str(tmp_path), _template(), NUM_CLIENTS)
  snapshots = {}
  for rounds_done in (2, 4, 6):
    _play(disk, 2, seed=20 + rounds_done)
    disk.commit(rounds_done)
    snapshots[rounds_done] = disk.to_numpy()
  _play(disk, 2, seed=30)
  del disk
  real_unlink, calls = os.unlink, []

  def unlink_then_die(path):
    calls.append(path)
    if len(calls) > 1:
      raise KeyboardInterrupt("killed while deleting segments")
    real_unlink(path)

  monkeypatch.setattr(os, "unlink", unlink_then_die)
  with pytest.raises(KeyboardInterrupt):
    DiskClientStates.open(str(tmp_path), _template(), rollback_to=2)
  monkeypatch.setattr(os, "unlink", real_unlink)
  # commits.json already names round 2: a plain open finishes the job.
  with DiskClientStates.open(str(tmp_path), _template()) as reopened:
    assert reopened.committed_rounds == [0, 2]
    _assert_same(snapshots[2], reopened.to_numpy())


@pytest.mark.parametrize("dies_in", ["write_file_atomically",
                                     "_start_segment"])
def test_a_crash_while_committing(tmp_path, monkeypatch, dies_in):
  disk = DiskClientStates.create(str(tmp_path), _template(), NUM_CLIENTS)
  _play(disk, 2, seed=40)
  disk.commit(2)
  before = disk.to_numpy()
  _play(disk, 2, seed=41)
  after = disk.to_numpy()

  def die(*args, **kwargs):
    raise KeyboardInterrupt(dies_in)

  owner = (undo_journal if dies_in == "write_file_atomically"
           else DiskClientStates)
  monkeypatch.setattr(owner, dies_in, die)
  with pytest.raises(KeyboardInterrupt):
    disk.commit(4)
  monkeypatch.undo()
  del disk
  # Before commits.json names round 4 the commit did not happen; after, it
  # did (and the missing new segment is simply created).
  expected = before if dies_in == "write_file_atomically" else after
  with DiskClientStates.open(str(tmp_path), _template()) as reopened:
    assert reopened.committed_rounds[-1] == (
        2 if dies_in == "write_file_atomically" else 4)
    _assert_same(expected, reopened.to_numpy())


def _one_round_and_commit(directory, num_clients, cohort_size=50):
  """Creates a store, runs one round of ``cohort_size`` clients, commits;
  returns the commit's stats and the disk growth during the commit."""
  template = {"w": np.zeros([16], np.float32)}
  disk = DiskClientStates.create(directory, template, num_clients)
  rng = np.random.default_rng(0)
  indices = rng.choice(num_clients, cohort_size, replace=False)
  disk.scatter(indices, {"w": rng.normal(size=(cohort_size, 16)).astype(
      np.float32)})
  before = disk.nbytes_on_disk()
  stats = disk.commit(1)
  growth = disk.nbytes_on_disk() - before
  disk.close()
  return stats, growth


def test_commit_cost_does_not_depend_on_the_population(tmp_path):
  small, small_growth = _one_round_and_commit(str(tmp_path / "small"), 1000)
  large, large_growth = _one_round_and_commit(str(tmp_path / "large"),
                                              1_000_000)
  assert small.rows_flushed == large.rows_flushed == 50
  assert small.journal_bytes == large.journal_bytes
  assert small.metadata_bytes == large.metadata_bytes < 100
  # Allocated on flush: at most a few pages per touched row (data, flag,
  # journal), never the 64 MB a dense population would take.
  page = 4096
  assert large_growth <= 50 * 3 * page + 64 * 1024, large_growth


def _resident_bytes() -> int:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"),
                    reason="needs /proc")
def test_a_round_at_a_million_clients_touches_only_the_cohort(tmp_path):
  template = {"w": np.zeros([64], np.float32)}  # 256 MB at 10^6 clients
  num_clients, cohort_size = 1_000_000, 100
  directory = str(tmp_path)
  DiskClientStates.create(directory, template, num_clients).close()
  rng = np.random.default_rng(0)
  indices = rng.choice(num_clients, cohort_size, replace=False)
  rows = {"w": rng.normal(size=(cohort_size, 64)).astype(np.float32)}
  resident = _resident_bytes()
  tracemalloc.start()
  disk = DiskClientStates.open(directory, template)
  gathered = store.gather_client_states(disk, indices)
  store.scatter_client_states(disk, indices, rows, in_place=True)
  disk.commit(1)
  _, peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  resident_growth = _resident_bytes() - resident
  np.testing.assert_array_equal(gathered["w"], 0.0)
  np.testing.assert_array_equal(disk.gather(indices)["w"], rows["w"])
  assert disk.nbytes_on_disk() < 4 * 1024 * 1024
  disk.close()
  population = num_clients * 64 * 4
  assert peak < 2 * 1024 * 1024, peak  # Python/numpy allocations
  assert resident_growth < population // 16, resident_growth
