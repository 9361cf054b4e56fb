"""Tests for fedjax_lab.data.prefetch."""

import itertools
import threading
import time
import traceback

import numpy as np
import pytest

from fedjax_lab.data.cohort import make_cohort
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.data.prefetch import Prefetcher

def _prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "fedjax_lab-prefetch"]


def _wait_for(condition, timeout=5.0):
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      raise AssertionError("timed out waiting")
    time.sleep(0.001)


@pytest.mark.parametrize("depth", [1, 3])
def test_prefetcher_yields_in_order(depth):
  rounds = [5, 3, 9, 0, 7]
  with Prefetcher(lambda t: t * t, rounds, depth=depth) as prefetcher:
    assert list(prefetcher) == [(t, t * t) for t in rounds]
  assert not prefetcher.is_alive


@pytest.mark.parametrize("depth", [1, 2])
def test_prefetcher_works_ahead_but_at_most_depth(depth):
  started = []

  def produce(round_index):
    started.append(round_index)
    return round_index

  with Prefetcher(produce, range(100), depth=depth) as prefetcher:
    assert next(prefetcher) == (0, 0)
    # While the consumer holds round 0, rounds 1..depth get produced ...
    _wait_for(lambda: len(started) == 1 + depth)
    time.sleep(0.05)
    # ... and no more until the consumer takes one.
    assert started == list(range(1 + depth))
    assert next(prefetcher) == (1, 1)
    _wait_for(lambda: len(started) == 2 + depth)


def test_prefetcher_reraises_at_the_failing_item():
  def produce_cohort(round_index):
    if round_index == 3:
      raise ValueError("bad round")
    return round_index

  prefetcher = Prefetcher(produce_cohort, range(10), depth=4)
  # The failure has happened before the consumer reaches it ...
  _wait_for(lambda: not prefetcher.is_alive)
  # ... but earlier items still come out first.
  assert [next(prefetcher) for _ in range(3)] == [(0, 0), (1, 1), (2, 2)]
  with pytest.raises(ValueError, match="bad round") as info:
    next(prefetcher)
  frames = [frame.name for frame in traceback.extract_tb(
      info.value.__traceback__)]
  assert "produce_cohort" in frames, "original traceback must be kept"
  assert any("round 3" in note for note in info.value.__notes__)
  with pytest.raises(StopIteration):
    next(prefetcher)
  prefetcher.close()


def test_prefetcher_reraises_round_index_errors():
  def rounds():
    yield 0
    raise RuntimeError("schedule broke")

  with Prefetcher(lambda t: t, rounds()) as prefetcher:
    assert next(prefetcher) == (0, 0)
    with pytest.raises(RuntimeError, match="schedule broke"):
      next(prefetcher)


def test_prefetcher_close_stops_promptly_without_leaks():
  before = len(_prefetch_threads())
  prefetcher = Prefetcher(lambda t: np.full(1000, t), itertools.count(),
                          depth=2)
  assert next(prefetcher)[0] == 0
  start = time.monotonic()
  prefetcher.close()
  assert time.monotonic() - start < 1.0
  assert not prefetcher.is_alive
  assert len(_prefetch_threads()) == before
  with pytest.raises(StopIteration):
    next(prefetcher)
  prefetcher.close()  # Idempotent.


def test_prefetcher_close_waits_for_running_producer():
  release = threading.Event()
  entered = threading.Event()

  def produce(round_index):
    entered.set()
    release.wait(5)
    return round_index

  prefetcher = Prefetcher(produce, itertools.count())
  entered.wait(5)
  threading.Timer(0.05, release.set).start()
  prefetcher.close()
  assert not prefetcher.is_alive


def test_prefetcher_context_manager_closes_on_break_and_error():
  before = len(_prefetch_threads())
  with Prefetcher(lambda t: t, itertools.count()) as prefetcher:
    for round_index, _ in prefetcher:
      if round_index == 2:
        break
  assert not prefetcher.is_alive
  with pytest.raises(KeyError):
    with Prefetcher(lambda t: t, itertools.count()) as failing:
      next(failing)
      raise KeyError("consumer failed")
  assert not failing.is_alive
  assert len(_prefetch_threads()) == before


def test_prefetcher_overlaps_with_consumer():
  """Producer and consumer run concurrently (numpy releases the GIL too)."""
  def produce(round_index):
    time.sleep(0.02)
    return round_index

  start = time.monotonic()
  with Prefetcher(produce, range(10)) as prefetcher:
    for _ in prefetcher:
      time.sleep(0.02)
  # Serial would take ~0.4 s; overlapped ~0.22 s.
  assert time.monotonic() - start < 0.35


def test_prefetcher_rejects_bad_depth():
  with pytest.raises(ValueError, match="depth"):
    Prefetcher(lambda t: t, range(3), depth=0)


def test_prefetcher_with_make_cohort():
  store = ClientStore.from_client_arrays(
      ["a", "b", "c", "d"],
      [{"id": np.arange(n) + 1} for n in (5, 9, 2, 7)])
  rounds = range(4)

  def produce(round_index):
    return make_cohort(store, np.array([round_index]), batch_size=3, seed=1,
                       round_index=round_index)

  with Prefetcher(produce, rounds) as prefetcher:
    for round_index, batch in prefetcher:
      expected = produce(round_index)
      np.testing.assert_array_equal(batch.features["id"],
                                    expected.features["id"])
