"""Padded, fixed-shape cohort batches for one jitted federated round.

The engine runs a round as one compiled function over arrays shaped
``[C, S, B, ...]``: ``C`` clients, ``S`` local steps, ``B`` examples per step.
Real cohorts are ragged (clients hold different numbers of examples, Poisson
sampling varies the cohort size), so :func:`make_cohort` pads them:

* every client's examples are shuffled once per epoch, the epochs are
  concatenated into one stream and cut into batches of ``B`` (only the final
  batch of the stream can be partial);
* ``S`` and ``C`` are rounded up to a few bucket sizes
  (:func:`round_up_to_bucket`), so a run compiles a handful of times;
* padding is zeros, flagged by ``example_mask == 0`` / ``client_mask == 0``.

The shuffle of a client depends only on ``(seed, round_index, client_index,
epoch)``: a client's batches are the same whichever other clients share its
cohort, and a resumed run reproduces them.

Everything is vectorised: one index array ``[C, S, B]`` into the store's rows is
built per cohort and each feature is gathered once.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from fedjax_lab.data.federated import ClientStore

_SHUFFLE_SALT = 0xC0_4021
_EVAL_SUBSAMPLE_SALT = 0xE7A1


def _geometric_bucket(n: int) -> int:
  """Smallest value >= max(n, 1) in {1, 2, 3, 4, 6, 8, 12, ...}."""
  if n <= 1:
    return 1
  power = 1 << (n - 1).bit_length()  # Smallest power of two >= n.
  if power >= 4 and 3 * (power // 4) >= n:
    return 3 * (power // 4)
  return power


def round_up_to_bucket(n: int, buckets: Sequence[int] | None = None,
                       multiple_of: int = 1) -> int:
  """Pads a size ``n`` up to a bucket so few distinct shapes get compiled.

  Args:
    n: the size needed (clients, steps, batches). ``n <= 0`` is treated as
      "nothing needed" and gets the smallest bucket.
    buckets: allowed sizes (any order). ``None`` uses the geometric series
      ``1, 2, 3, 4, 6, 8, 12, 16, ...`` (``2^k`` and ``3 * 2^(k-1)``), which
      never pads by more than 1.5x.
    multiple_of: the result is rounded up to a multiple of this (e.g. the
      number of devices the client axis is sharded over).

  Returns:
    The smallest bucket ``>= n``, rounded up to a multiple of ``multiple_of``.

  Raises:
    ValueError: if ``n`` exceeds every explicit bucket, or the arguments are
      invalid.
  """
  n = int(n)
  multiple_of = int(multiple_of)
  if multiple_of < 1:
    raise ValueError(f"multiple_of must be >= 1, got {multiple_of}.")
  if buckets is None:
    size = _geometric_bucket(n)
  else:
    sorted_buckets = sorted(int(b) for b in buckets)
    if not sorted_buckets:
      raise ValueError("buckets must be non-empty (or None for geometric).")
    if sorted_buckets[0] < 1:
      raise ValueError(f"buckets must be positive, got {list(buckets)}.")
    fitting = [b for b in sorted_buckets if b >= n]
    if not fitting:
      raise ValueError(
          f"size {n} exceeds the largest bucket {sorted_buckets[-1]}; add a "
          "larger bucket or pass buckets=None for geometric buckets.")
    size = fitting[0]
  return -(-size // multiple_of) * multiple_of


def client_steps(num_examples: np.ndarray | int, batch_size: int,
                 num_epochs: int = 1,
                 max_steps: int | None = None) -> np.ndarray:
  """Local steps per client: ``ceil(num_epochs * n_k / batch_size)``, capped.

  Args:
    num_examples: ``[K]`` (or scalar) examples held by each client.
    batch_size: examples per step ``B``.
    num_epochs: passes over the client's data.
    max_steps: optional cap on steps per client.

  Returns:
    int64 array shaped like ``num_examples``.
  """
  _check_positive("batch_size", batch_size)
  _check_positive("num_epochs", num_epochs)
  if max_steps is not None:
    _check_positive("max_steps", max_steps)
  sizes = np.asarray(num_examples, dtype=np.int64)
  if np.any(sizes < 0):
    raise ValueError("num_examples must be non-negative.")
  steps = -(-(sizes * num_epochs) // batch_size)
  if max_steps is not None:
    steps = np.minimum(steps, max_steps)
  return steps


def _check_positive(name: str, value: int) -> None:
  """Raises unless ``value`` is an integer >= 1."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@dataclasses.dataclass(frozen=True)
class CohortBatch:
  """A padded cohort: everything the engine needs for one round.

  ``C`` = padded cohort size, ``S`` = padded local steps, ``B`` = batch size.

  Attributes:
    features: feature name -> ``[C, S, B, ...]`` array (store dtype; zeros in
      padding).
    example_mask: float32 ``[C, S, B]``; 1 for real examples.
    client_mask: float32 ``[C]``; 1 for real clients (even one with no data).
    num_examples: float32 ``[C]``; examples the client holds (its dataset
      size, the usual aggregation weight), not the number it trains on this
      round; 0 for padding clients.
    client_indices: int64 ``[C]``; store positions, -1 for padding clients.
    num_steps: int32 ``[C]``; real local steps per client (0 for padding).
    padded_cohort_size: ``C`` of the whole cohort: the leading size of the
      arrays, except in one process's share (``client_rows``), which holds
      fewer rows.
  """

  features: dict[str, np.ndarray]
  example_mask: np.ndarray
  client_mask: np.ndarray
  num_examples: np.ndarray
  client_indices: np.ndarray
  num_steps: np.ndarray
  padded_cohort_size: int = -1

  def __post_init__(self):
    if self.padded_cohort_size < 0:
      object.__setattr__(self, "padded_cohort_size",
                         int(self.client_mask.shape[0]))

  @property
  def cohort_size(self) -> int:
    """Number of real (non-padding) clients."""
    return int(np.count_nonzero(self.client_indices >= 0))

  @property
  def padded_shape(self) -> tuple[int, int, int]:
    """``(C, S, B)``."""
    num_clients, num_steps, batch_size = self.example_mask.shape
    return num_clients, num_steps, batch_size


def _segment_positions(lengths: np.ndarray) -> np.ndarray:
  """``concat([arange(l) for l in lengths])`` without a Python loop."""
  total = int(lengths.sum())
  starts = np.cumsum(lengths) - lengths
  return np.arange(total, dtype=np.int64) - np.repeat(starts, lengths)


def _client_stream(num_examples: int, stream_length: int, seed: int,
                   round_index: int, client_index: int,
                   shuffle: bool = True) -> np.ndarray:
  """First ``stream_length`` local rows of a client's stream of epochs
  (each epoch a fresh permutation, or the rows in order)."""
  if stream_length == 0:
    return np.zeros([0], np.int64)
  epochs_needed = -(-stream_length // num_examples)
  if not shuffle:
    return np.tile(np.arange(num_examples, dtype=np.int64),
                   epochs_needed)[:stream_length]
  perms = [
      np.random.default_rng(
          [seed, round_index, client_index, epoch, _SHUFFLE_SALT]
      ).permutation(num_examples)
      for epoch in range(epochs_needed)
  ]
  return np.concatenate(perms)[:stream_length]


def _gather_padded(features: dict[str, np.ndarray],
                   rows: np.ndarray | slice, destinations: np.ndarray | slice,
                   num_slots: int,
                   shape: tuple[int, ...]) -> dict[str, np.ndarray]:
  """Gathers ``rows`` of each feature into zero arrays at ``destinations``.

  ``shape`` is the leading shape of the result (product ``num_slots``).
  """
  out = {}
  for name, column in features.items():
    column = np.asarray(column)
    padded = np.zeros((num_slots,) + column.shape[1:], column.dtype)
    padded[destinations] = column[rows]
    out[name] = padded.reshape(shape + column.shape[1:])
  return out


def make_cohort(store: ClientStore, client_indices: np.ndarray, *,
                batch_size: int, num_epochs: int = 1,
                max_steps: int | None = None, seed: int, round_index: int,
                step_buckets: Sequence[int] | None = None,
                cohort_buckets: Sequence[int] | None = None,
                cohort_multiple_of: int = 1,
                min_cohort_size: int = 0,
                shuffle: bool = True,
                client_rows: (tuple[int, int] |
                              Callable[[int], tuple[int, int]] | None) = None
                ) -> CohortBatch:
  """Builds the padded ``[C, S, B, ...]`` batch for one round.

  Args:
    store: the training clients.
    client_indices: ``[K]`` store positions of the cohort (``K`` may be 0).
      Order is kept; a repeated index yields identical rows.
    batch_size: examples per local step ``B``.
    num_epochs: passes over each client's data.
    max_steps: optional cap on local steps per client.
    seed: non-negative run seed.
    round_index: non-negative round number (with ``seed`` fixes the shuffle).
    step_buckets: allowed ``S`` values (``None``: geometric buckets).
    cohort_buckets: allowed ``C`` values (``None``: geometric buckets).
    cohort_multiple_of: ``C`` is a multiple of this (device sharding).
    min_cohort_size: pad ``C`` to at least this (e.g. the expected Poisson
      cohort size, to keep ``C`` stable across rounds).
    shuffle: shuffle each client's examples every epoch (``False``: every
      epoch walks the client's rows in stored order).
    client_rows: ``(start, stop)``: build only these rows of the padded
      client axis (one process's share of a cohort sharded over processes;
      the padded shape still comes from the whole cohort's sizes, so every
      process agrees on it). Only these rows' data is read. A callable gets
      the padded cohort size ``C`` and returns the rows.

  Returns:
    A :class:`CohortBatch` with ``C = round_up_to_bucket(max(K,
    min_cohort_size), cohort_buckets, cohort_multiple_of)`` and ``S =
    round_up_to_bucket(max steps, step_buckets)`` (``stop - start`` rows
    with ``client_rows``).
  """
  _check_positive("batch_size", batch_size)
  if seed < 0 or round_index < 0:
    raise ValueError(
        f"seed and round_index must be non-negative, got {seed}, "
        f"{round_index}.")
  indices = np.asarray(client_indices)
  if indices.ndim != 1:
    raise ValueError(
        f"client_indices must be 1-D, got shape {indices.shape}.")
  if indices.size and not np.issubdtype(indices.dtype, np.integer):
    raise TypeError(
        f"client_indices must be integers, got dtype {indices.dtype}.")
  indices = indices.astype(np.int64)
  if indices.size and (indices.min() < 0
                       or indices.max() >= store.num_clients):
    raise IndexError(
        f"client_indices must be in [0, {store.num_clients}), got range "
        f"[{indices.min()}, {indices.max()}].")

  cohort_size = len(indices)
  sizes = store.sizes_of(indices)
  steps = client_steps(sizes, batch_size, num_epochs, max_steps)
  padded_steps = round_up_to_bucket(int(steps.max(initial=0)), step_buckets)
  padded_clients = round_up_to_bucket(max(cohort_size, min_cohort_size),
                                      cohort_buckets, cohort_multiple_of)
  slots_per_client = padded_steps * batch_size

  if callable(client_rows):
    client_rows = client_rows(padded_clients)
  row_start, row_stop = client_rows or (0, padded_clients)
  if not 0 <= row_start <= row_stop <= padded_clients:
    raise ValueError(f"client_rows {client_rows} is not within the padded "
                     f"cohort [0, {padded_clients}).")
  real_stop = min(row_stop, cohort_size)
  real_start = min(row_start, real_stop)
  indices, sizes, steps = (a[real_start:real_stop]
                           for a in (indices, sizes, steps))
  num_real = real_stop - real_start
  num_rows = row_stop - row_start
  num_slots = num_rows * slots_per_client

  # Real examples per client this round: the stream is num_epochs * n_k long
  # but is cut at steps * B when max_steps caps it.
  stream_lengths = np.minimum(sizes * num_epochs, steps * batch_size)
  local_rows = [
      _client_stream(int(size), int(length), seed, round_index, int(client),
                     shuffle)
      for client, size, length in zip(indices, sizes, stream_lengths)
  ]
  local_rows = (np.concatenate(local_rows) if local_rows
                else np.zeros([0], np.int64))
  positions = _segment_positions(stream_lengths)
  owner = np.repeat(np.arange(num_real, dtype=np.int64), stream_lengths)
  rows = np.repeat(store.offsets[indices], stream_lengths) + local_rows
  destinations = owner * slots_per_client + positions

  shape = (num_rows, padded_steps, batch_size)
  features = _gather_padded(dict(store.features), rows, destinations,
                            num_slots, shape)
  example_mask = np.zeros(num_slots, np.float32)
  example_mask[destinations] = 1.0

  def padded(values: np.ndarray, dtype, fill) -> np.ndarray:
    out = np.full([num_rows], fill, dtype)
    out[:num_real] = values
    return out

  return CohortBatch(
      features=features,
      example_mask=example_mask.reshape(shape),
      client_mask=padded(np.ones(num_real), np.float32, 0),
      num_examples=padded(sizes, np.float32, 0),
      client_indices=padded(indices, np.int64, -1),
      num_steps=padded(steps, np.int32, 0),
      padded_cohort_size=padded_clients,
  )


def make_eval_batches(
    store: ClientStore, batch_size: int,
    max_examples: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """All examples of ``store`` as padded batches for centralized evaluation.

  Args:
    store: clients to evaluate on (client grouping is ignored).
    batch_size: examples per batch ``B``.
    max_examples: if set and smaller than the store, evaluate on a fixed
      uniformly random subset of this many examples (same subset on every
      call, kept in store order).

  Returns:
    ``(features, mask)``: feature name -> ``[num_batches, B, ...]`` (zeros in
    padding) and float32 mask ``[num_batches, B]``. ``num_batches`` is
    ``ceil(examples / B)`` rounded up with :func:`round_up_to_bucket`
    (at least 1, so an empty store gives one all-masked batch).
  """
  _check_positive("batch_size", batch_size)
  total = store.num_examples
  if max_examples is not None:
    if max_examples < 0:
      raise ValueError(f"max_examples must be >= 0, got {max_examples}.")
  if max_examples is not None and max_examples < total:
    rng = np.random.default_rng([_EVAL_SUBSAMPLE_SALT, total])
    rows = np.sort(rng.choice(total, size=max_examples, replace=False))
    num_rows = max_examples
  else:
    rows = slice(None)  # Every row, in order: copy without a gather.
    num_rows = total
  num_batches = round_up_to_bucket(-(-num_rows // batch_size))
  num_slots = num_batches * batch_size
  shape = (num_batches, batch_size)
  features = _gather_padded(dict(store.features), rows, slice(0, num_rows),
                            num_slots, shape)
  mask = np.zeros(num_slots, np.float32)
  mask[:num_rows] = 1.0
  return features, mask.reshape(shape)


def make_client_eval_batches(
    store: ClientStore, client_positions: np.ndarray, batch_size: int,
    num_padded_clients: int | None = None
) -> tuple[dict[str, np.ndarray], np.ndarray]:
  """Every example of each listed client, as padded per-client batches.

  Args:
    store: the clients' (test) examples.
    client_positions: ``[K]`` positions in ``store``.
    batch_size: examples per batch ``B``.
    num_padded_clients: ``C >= K`` (default ``K``); clients ``K..C-1`` are
      all padding.

  Returns:
    ``(features, mask)``: name -> ``[C, T, B, ...]`` (client ``k``'s examples
    in store order at its first ``n_k`` slots, zeros elsewhere) and float32
    ``mask [C, T, B]``. ``T = round_up_to_bucket(ceil(max n_k / B))``.
  """
  positions = np.asarray(client_positions, np.int64)
  num_clients = len(positions)
  padded_clients = num_clients if num_padded_clients is None else int(
      num_padded_clients)
  if padded_clients < num_clients:
    raise ValueError(f"num_padded_clients={padded_clients} < {num_clients} "
                     "clients.")
  sizes = store.sizes_of(positions)
  num_batches = round_up_to_bucket(
      -(-int(sizes.max(initial=0)) // batch_size))
  slots_per_client = num_batches * batch_size
  within = _segment_positions(sizes)
  rows = np.repeat(store.offsets[positions], sizes) + within
  destinations = (np.repeat(np.arange(num_clients, dtype=np.int64), sizes) *
                  slots_per_client + within)
  num_slots = padded_clients * slots_per_client
  shape = (padded_clients, num_batches, batch_size)
  features = _gather_padded(
      dict(store.features), rows, destinations, num_slots, shape)
  mask = np.zeros(num_slots, np.float32)
  mask[destinations] = 1.0
  return features, mask.reshape(shape)


def make_round_cohort(store: ClientStore, client_indices: np.ndarray, *,
                      batch_size: int, num_epochs: int,
                      max_steps: int | None, seed: int, round_index: int,
                      fixed_cohort_size: int | None = None,
                      cohort_multiple_of: int = 1,
                      step_buckets: Sequence[int] | None = None,
                      shuffle: bool = True,
                      client_rows: (tuple[int, int] |
                                    Callable[[int], tuple[int, int]] |
                                    None) = None
                      ) -> CohortBatch:
  """The cohort of a training round, as the runner (and the benchmark) builds it.

  Clients are ordered largest first, so a chunk of similar clients stops
  together (the round result does not depend on the order). A fixed-size
  cohort (``fixed_cohort_size``) is padded to exactly that size rounded up to
  ``cohort_multiple_of``; a Poisson cohort to the bucket series. Local steps
  are padded to the geometric bucket series unless ``step_buckets`` is given
  (:func:`fixed_step_padding` gives one bucket that fits every client, so a
  run compiles once); ``shuffle=False`` batches each client's examples in
  stored order. ``client_rows`` builds one process's rows only
  (:func:`make_cohort`).
  """
  client_indices = np.asarray(client_indices, dtype=np.int64)
  order = np.argsort(-store.sizes_of(client_indices), kind="stable")
  cohort_buckets = None
  if fixed_cohort_size is not None:
    cohort_buckets = [-(-fixed_cohort_size // cohort_multiple_of) *
                      cohort_multiple_of]
  return make_cohort(store, client_indices[order], batch_size=batch_size,
                     num_epochs=num_epochs, max_steps=max_steps, seed=seed,
                     round_index=round_index, cohort_buckets=cohort_buckets,
                     cohort_multiple_of=cohort_multiple_of,
                     step_buckets=step_buckets, shuffle=shuffle,
                     client_rows=client_rows)


def fixed_step_padding(store: ClientStore, batch_size: int,
                       num_epochs: int = 1,
                       max_steps: int | None = None) -> list[int]:
  """One step bucket that fits every client of ``store``: pass it as
  ``step_buckets`` to pad every round to the same ``S`` (one compilation, at
  the cost of padding small cohorts to the largest client's steps)."""
  steps = client_steps(store.client_sizes, batch_size, num_epochs, max_steps)
  return [max(int(steps.max(initial=0)), 1)]
