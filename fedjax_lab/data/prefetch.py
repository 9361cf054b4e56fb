"""Background prefetching of per-round inputs (cohorts, batches).

:class:`Prefetcher` computes ``produce(round_index)`` for the next rounds in a
background thread while the training loop runs the current round, so sampling
and batching (numpy work that mostly releases the GIL) overlap with device
compute::

  with Prefetcher(lambda t: make_cohort(...), range(start, num_rounds)) as it:
    for round_index, cohort in it:
      state = run_round(state, cohort)
"""

from __future__ import annotations

import collections
import threading
from typing import Callable, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")


class Prefetcher(Generic[T]):
  """Iterator of ``(round_index, produce(round_index))``, computed ahead.

  Items come out in the order of ``round_indices``. At most ``depth`` finished
  items wait in the buffer; the background thread starts the next
  ``produce`` call only when there is room, so at most ``depth`` rounds are
  computed ahead of the consumer.

  If ``produce`` (or iterating ``round_indices``) raises, the exception is
  re-raised, unchanged in type and with its original traceback plus a note
  naming the round, when the consumer reaches that item; the iteration then
  ends. :meth:`close` (or leaving a ``with`` block) stops the thread: it waits
  for an in-flight ``produce`` call to return, discards buffered items and
  joins the thread.
  """

  def __init__(self, produce: Callable[[int], T],
               round_indices: Iterable[int], depth: int = 1):
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
      raise ValueError(f"depth must be a positive integer, got {depth!r}.")
    self._produce = produce
    self._round_indices = round_indices
    self._depth = depth
    # Entries: (round_index, item, exception); exception is None on success.
    self._buffer: collections.deque = collections.deque()
    self._condition = threading.Condition()
    self._closed = False
    self._producer_done = False
    self._thread = threading.Thread(
        target=self._run, name="fedjax_lab-prefetch", daemon=True)
    self._thread.start()

  def _run(self) -> None:
    """Background loop: produce items while there is room in the buffer."""
    try:
      iterator = iter(self._round_indices)
      while True:
        with self._condition:
          while len(self._buffer) >= self._depth and not self._closed:
            self._condition.wait()
          if self._closed:
            return
        try:
          round_index = next(iterator)
        except StopIteration:
          return
        try:
          entry = (round_index, self._produce(round_index), None)
        except BaseException as error:  # pylint: disable=broad-except
          error.add_note(
              f"(raised by Prefetcher's producer for round {round_index})")
          entry = (round_index, None, error)
        with self._condition:
          if self._closed:
            return
          self._buffer.append(entry)
          self._condition.notify_all()
        if entry[2] is not None:
          return
    except BaseException as error:  # pylint: disable=broad-except
      # Iterating round_indices failed: surface it to the consumer.
      error.add_note("(raised while iterating Prefetcher's round_indices)")
      with self._condition:
        self._buffer.append((None, None, error))
    finally:
      with self._condition:
        self._producer_done = True
        self._condition.notify_all()

  def __iter__(self) -> Iterator[tuple[int, T]]:
    return self

  def __next__(self) -> tuple[int, T]:
    """Blocks until the next item is ready; re-raises producer errors."""
    with self._condition:
      while not self._buffer and not self._producer_done and not self._closed:
        self._condition.wait()
      if self._closed or not self._buffer:
        raise StopIteration
      round_index, item, error = self._buffer.popleft()
      self._condition.notify_all()
    if error is not None:
      self.close()
      raise error
    return round_index, item

  def close(self) -> None:
    """Stops the background thread and waits for it; idempotent."""
    with self._condition:
      self._closed = True
      self._buffer.clear()
      self._condition.notify_all()
    if self._thread is not threading.current_thread():
      self._thread.join()

  @property
  def is_alive(self) -> bool:
    """Whether the background thread is still running."""
    return self._thread.is_alive()

  def __enter__(self) -> "Prefetcher[T]":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
