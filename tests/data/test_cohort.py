"""Tests for fedjax_lab.data.cohort."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedjax_lab.data.cohort import (CohortBatch, client_steps, make_cohort,
                                    make_round_cohort,
                                    make_eval_batches, round_up_to_bucket)
from fedjax_lab.data.federated import ClientStore

GEOMETRIC = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256]


def make_store(sizes, seed=0):
  """Store whose ``id`` feature is 1 + the global row (0 marks padding).

  ``x`` is a ``[n, 3, 2]`` float32 feature derived from the id, to check that
  multi-dimensional features are gathered along with ``id``.
  """
  sizes = np.asarray(sizes, dtype=np.int64)
  total = int(sizes.sum())
  ids = np.arange(1, total + 1, dtype=np.int64)
  x = (ids[:, None, None] * 10.0 + np.arange(6).reshape(1, 3, 2)).astype(
      np.float32)
  rng = np.random.default_rng(seed)
  y = rng.integers(1, 10, total).astype(np.int32)
  offsets = np.concatenate([[0], np.cumsum(sizes)])
  return ClientStore(np.array([f"c{i}" for i in range(len(sizes))]), offsets,
                     {"id": ids, "x": x, "y": y})


def client_stream(batch: CohortBatch, position: int) -> np.ndarray:
  """Ids of the real examples of client ``position``, in step/batch order."""
  ids = batch.features["id"][position].reshape(-1)
  mask = batch.example_mask[position].reshape(-1)
  return ids[mask == 1]


# --------------------------------------------------------- bucket rounding


def test_geometric_buckets_first_values():
  values = sorted({round_up_to_bucket(n) for n in range(1, 257)})
  assert values == GEOMETRIC


def test_geometric_buckets_bounds():
  previous = 0
  for n in range(1, 5000):
    size = round_up_to_bucket(n)
    assert n <= size <= 1.5 * n or (n == 1 and size == 1)
    assert size >= previous, "must be monotone"
    previous = size
    # Either a power of two or 3 * a power of two.
    assert size & (size - 1) == 0 or (size % 3 == 0 and (
        (size // 3) & (size // 3 - 1)) == 0)


@given(n=st.integers(-5, 100_000), multiple_of=st.integers(1, 64))
def test_multiple_of(n, multiple_of):
  size = round_up_to_bucket(n, multiple_of=multiple_of)
  assert size % multiple_of == 0
  assert size >= max(n, 1)
  assert size == math.ceil(round_up_to_bucket(n) / multiple_of) * multiple_of
  assert size < round_up_to_bucket(n) + multiple_of


def test_non_positive_sizes_get_smallest_bucket():
  assert round_up_to_bucket(0) == 1
  assert round_up_to_bucket(-3) == 1
  assert round_up_to_bucket(0, multiple_of=8) == 8
  assert round_up_to_bucket(0, buckets=[16, 4, 8]) == 4
  assert round_up_to_bucket(0, buckets=[5], multiple_of=4) == 8


def test_explicit_buckets():
  buckets = [32, 8, 16]
  assert [round_up_to_bucket(n, buckets) for n in (1, 8, 9, 16, 17, 32)] == [
      8, 8, 16, 16, 32, 32]
  assert round_up_to_bucket(9, buckets, multiple_of=3) == 18
  with pytest.raises(ValueError, match="exceeds the largest bucket 32"):
    round_up_to_bucket(33, buckets)
  with pytest.raises(ValueError, match="non-empty"):
    round_up_to_bucket(3, [])
  with pytest.raises(ValueError, match="positive"):
    round_up_to_bucket(3, [0, 4])
  with pytest.raises(ValueError, match="multiple_of"):
    round_up_to_bucket(3, multiple_of=0)


def test_client_steps():
  np.testing.assert_array_equal(
      client_steps(np.array([0, 1, 10, 11, 25]), batch_size=5),
      [0, 1, 2, 3, 5])
  np.testing.assert_array_equal(
      client_steps(np.array([0, 1, 10, 11]), batch_size=4, num_epochs=3),
      [0, 1, 8, 9])
  np.testing.assert_array_equal(
      client_steps(np.array([3, 100]), 4, num_epochs=2, max_steps=5), [2, 5])
  assert int(client_steps(7, 2)) == 4
  with pytest.raises(ValueError, match="batch_size"):
    client_steps(np.array([3]), 0)
  with pytest.raises(ValueError, match="non-negative"):
    client_steps(np.array([-1]), 2)


# -------------------------------------------------------------- make_cohort


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=12),
       data=st.data(), batch_size=st.integers(1, 8),
       num_epochs=st.integers(1, 3),
       max_steps=st.one_of(st.none(), st.integers(1, 10)),
       seed=st.integers(0, 2**32), round_index=st.integers(0, 1000),
       min_cohort_size=st.integers(0, 20), multiple_of=st.integers(1, 4))
def test_make_cohort_invariants(sizes, data, batch_size, num_epochs,
                                max_steps, seed, round_index, min_cohort_size,
                                multiple_of):
  store = make_store(sizes)
  cohort_indices = np.array(data.draw(st.lists(
      st.integers(0, len(sizes) - 1), max_size=len(sizes), unique=True)),
                            dtype=np.int64)
  batch = make_cohort(store, cohort_indices, batch_size=batch_size,
                      num_epochs=num_epochs, max_steps=max_steps, seed=seed,
                      round_index=round_index,
                      min_cohort_size=min_cohort_size,
                      cohort_multiple_of=multiple_of)
  num_real = len(cohort_indices)
  client_sizes = store.client_sizes[cohort_indices]
  steps = np.array([
      min(math.ceil(num_epochs * n / batch_size), max_steps or 10**9)
      for n in client_sizes], dtype=np.int64)
  padded_clients, padded_steps, padded_batch = batch.padded_shape

  # Shapes, dtypes and bucket sizes.
  assert padded_batch == batch_size
  assert padded_clients == round_up_to_bucket(
      max(num_real, min_cohort_size), multiple_of=multiple_of)
  assert padded_steps == round_up_to_bucket(int(steps.max(initial=0)))
  assert batch.cohort_size == num_real
  assert batch.example_mask.dtype == np.float32
  assert batch.client_mask.dtype == np.float32
  assert batch.num_examples.dtype == np.float32
  assert batch.client_indices.dtype == np.int64
  assert batch.num_steps.dtype == np.int32
  for name, column in store.features.items():
    assert batch.features[name].dtype == column.dtype
    assert batch.features[name].shape == (
        batch.padded_shape + column.shape[1:])

  # Per-client vectors.
  np.testing.assert_array_equal(batch.client_indices[:num_real],
                                cohort_indices)
  assert np.all(batch.client_indices[num_real:] == -1)
  np.testing.assert_array_equal(batch.client_mask,
                                np.arange(padded_clients) < num_real)
  np.testing.assert_array_equal(batch.num_examples[:num_real], client_sizes)
  np.testing.assert_array_equal(batch.num_steps[:num_real], steps)
  assert not np.any(batch.num_examples[num_real:])
  assert not np.any(batch.num_steps[num_real:])

  # Padding is zero and masked.
  mask = batch.example_mask
  assert set(np.unique(mask)) <= {0.0, 1.0}
  for column in batch.features.values():
    assert not np.any(column[mask == 0])
  assert np.all(batch.features["id"][mask == 1] > 0)
  assert not np.any(mask[num_real:])

  for position, client in enumerate(cohort_indices):
    size, num_steps = int(client_sizes[position]), int(steps[position])
    flat_mask = mask[position].reshape(-1)
    stream_length = min(num_epochs * size, num_steps * batch_size)
    # Mask is a prefix of the flattened [S, B] slots: full steps, then at
    # most one partial step (the last), then nothing.
    assert flat_mask.sum() == stream_length
    assert np.all(flat_mask[:stream_length] == 1)
    per_step = mask[position].sum(axis=1)
    assert np.all(per_step[num_steps:] == 0)
    assert np.all(per_step[:max(num_steps - 1, 0)] == batch_size)
    if num_steps:
      assert per_step[num_steps - 1] > 0
    # Stream = consecutive epochs, each a permutation of the client's rows.
    stream = client_stream(batch, position) - 1
    own_rows = np.arange(store.offsets[client], store.offsets[client + 1])
    for epoch_start in range(0, stream_length, max(size, 1)):
      epoch = stream[epoch_start:epoch_start + size]
      assert len(np.unique(epoch)) == len(epoch)
      assert np.all(np.isin(epoch, own_rows))
    if max_steps is None:
      np.testing.assert_array_equal(
          np.bincount(stream - own_rows[0] if size else stream,
                      minlength=size),
          np.full(size, num_epochs))
    # Other features come from the same rows as ``id``.
    ids = batch.features["id"][position][mask[position] == 1]
    np.testing.assert_array_equal(batch.features["x"][position][
        mask[position] == 1], store.features["x"][ids - 1])
    np.testing.assert_array_equal(batch.features["y"][position][
        mask[position] == 1], store.features["y"][ids - 1])


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=3, max_size=10),
       data=st.data(), seed=st.integers(0, 1000))
def test_client_batches_independent_of_cohort(sizes, data, seed):
  """A client's batches depend on (seed, round, client, epoch) only."""
  store = make_store(sizes)
  target = data.draw(st.integers(0, len(sizes) - 1))
  others = data.draw(st.lists(st.integers(0, len(sizes) - 1), unique=True))
  others = [o for o in others if o != target]
  alone = make_cohort(store, np.array([target]), batch_size=4, num_epochs=2,
                      seed=seed, round_index=3)
  with_others = make_cohort(store, np.array(others + [target]), batch_size=4,
                            num_epochs=2, seed=seed, round_index=3)
  position = len(others)
  num_steps = int(alone.num_steps[0])
  assert with_others.num_steps[position] == num_steps
  for name in store.features:
    np.testing.assert_array_equal(
        alone.features[name][0, :num_steps],
        with_others.features[name][position, :num_steps])
  np.testing.assert_array_equal(alone.example_mask[0, :num_steps],
                                with_others.example_mask[position, :num_steps])


def test_max_steps_prefix_of_uncapped_stream():
  """Capping steps truncates the stream; it does not reshuffle it."""
  store = make_store([37, 5])
  full = make_cohort(store, np.array([0, 1]), batch_size=4, num_epochs=3,
                     seed=1, round_index=2)
  capped = make_cohort(store, np.array([0, 1]), batch_size=4, num_epochs=3,
                       max_steps=10, seed=1, round_index=2)
  np.testing.assert_array_equal(capped.num_steps, [10, 4])
  np.testing.assert_array_equal(client_stream(capped, 0),
                                client_stream(full, 0)[:40])
  np.testing.assert_array_equal(client_stream(capped, 1),
                                client_stream(full, 1))


def test_deterministic_and_varies_with_round_and_seed():
  store = make_store([50, 20, 33])
  kwargs = dict(batch_size=8, num_epochs=2)
  first = make_cohort(store, np.array([0, 2]), seed=3, round_index=5,
                      **kwargs)
  again = make_cohort(store, np.array([0, 2]), seed=3, round_index=5,
                      **kwargs)
  for name in store.features:
    np.testing.assert_array_equal(first.features[name], again.features[name])
  other_round = make_cohort(store, np.array([0, 2]), seed=3, round_index=6,
                            **kwargs)
  other_seed = make_cohort(store, np.array([0, 2]), seed=4, round_index=5,
                           **kwargs)
  assert not np.array_equal(first.features["id"], other_round.features["id"])
  assert not np.array_equal(first.features["id"], other_seed.features["id"])
  # Shuffled, and reshuffled between epochs.
  stream = client_stream(first, 0) - 1
  assert not np.array_equal(stream[:50], np.arange(50))
  assert not np.array_equal(stream[:50], stream[50:])


def test_equal_sized_clients_get_independent_shuffles():
  """The shuffle is keyed by the client too, not just (seed, round, epoch)."""
  store = make_store([30] * 4)
  batch = make_cohort(store, np.arange(4), batch_size=30, seed=0,
                      round_index=0)
  local_orders = {tuple(client_stream(batch, c) - 1 - 30 * c)
                  for c in range(4)}
  assert len(local_orders) == 4


def test_shuffle_is_uniform():
  """Where example 0 of a 4-example client lands is uniform over rounds."""
  store = make_store([4])
  counts = np.zeros(4)
  num_rounds = 800
  for t in range(num_rounds):
    batch = make_cohort(store, np.array([0]), batch_size=4, seed=0,
                        round_index=t)
    counts[np.flatnonzero(batch.features["id"][0, 0] == 1)] += 1
  expected = num_rounds / 4
  chi_square = np.sum((counts - expected) ** 2 / expected)
  assert chi_square < 16.3, counts  # df = 3, 99.9% quantile.


def test_empty_cohort():
  store = make_store([3, 4])
  batch = make_cohort(store, np.array([], dtype=np.int64), batch_size=5,
                      seed=0, round_index=0)
  assert batch.padded_shape == (1, 1, 5)
  assert batch.cohort_size == 0
  assert not np.any(batch.example_mask) and not np.any(batch.client_mask)
  assert batch.client_indices.tolist() == [-1]
  assert batch.features["x"].shape == (1, 1, 5, 3, 2)
  padded = make_cohort(store, [], batch_size=5, seed=0, round_index=0,
                       min_cohort_size=5, cohort_multiple_of=4)
  assert padded.padded_shape == (8, 1, 5)
  assert not np.any(padded.example_mask)


def test_client_without_examples_is_real_but_stepless():
  store = make_store([0, 6])
  batch = make_cohort(store, np.array([0]), batch_size=4, seed=0,
                      round_index=0)
  assert batch.padded_shape == (1, 1, 4)
  assert batch.client_mask.tolist() == [1.0]
  assert batch.num_examples.tolist() == [0.0]
  assert batch.num_steps.tolist() == [0]
  assert not np.any(batch.example_mask)


def test_explicit_buckets_and_rejections():
  store = make_store([10, 3, 7])
  batch = make_cohort(store, np.array([0, 1, 2]), batch_size=2, seed=0,
                      round_index=0, step_buckets=[8, 16],
                      cohort_buckets=[4, 8])
  assert batch.padded_shape == (4, 8, 2)
  with pytest.raises(ValueError, match="exceeds the largest bucket"):
    make_cohort(store, np.array([0]), batch_size=1, seed=0, round_index=0,
                step_buckets=[4])
  with pytest.raises(IndexError, match="client_indices"):
    make_cohort(store, np.array([3]), batch_size=2, seed=0, round_index=0)
  with pytest.raises(IndexError, match="client_indices"):
    make_cohort(store, np.array([-1]), batch_size=2, seed=0, round_index=0)
  with pytest.raises(ValueError, match="1-D"):
    make_cohort(store, np.array([[0]]), batch_size=2, seed=0, round_index=0)
  with pytest.raises(TypeError, match="integers"):
    make_cohort(store, np.array([0.0]), batch_size=2, seed=0, round_index=0)
  with pytest.raises(ValueError, match="batch_size"):
    make_cohort(store, np.array([0]), batch_size=0, seed=0, round_index=0)
  with pytest.raises(ValueError, match="non-negative"):
    make_cohort(store, np.array([0]), batch_size=2, seed=-1, round_index=0)


# ------------------------------------------------------- make_eval_batches


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 25), min_size=1, max_size=8),
       batch_size=st.integers(1, 9))
def test_eval_batches_cover_every_example_once(sizes, batch_size):
  store = make_store(sizes)
  features, mask = make_eval_batches(store, batch_size)
  total = store.num_examples
  num_batches = round_up_to_bucket(math.ceil(total / batch_size))
  assert mask.shape == (num_batches, batch_size) and mask.dtype == np.float32
  assert features["x"].shape == (num_batches, batch_size, 3, 2)
  ids = features["id"][mask == 1]
  np.testing.assert_array_equal(ids, np.arange(1, total + 1))
  np.testing.assert_array_equal(features["x"][mask == 1], store.features["x"])
  for column in features.values():
    assert not np.any(column[mask == 0])


def test_eval_batches_subsample():
  store = make_store([40, 30, 30])
  features, mask = make_eval_batches(store, 8, max_examples=20)
  assert mask.sum() == 20 and mask.shape == (3, 8)
  ids = features["id"][mask == 1]
  assert len(np.unique(ids)) == 20 and np.all(np.diff(ids) > 0)
  assert np.all((ids >= 1) & (ids <= 100))
  again, _ = make_eval_batches(store, 8, max_examples=20)
  np.testing.assert_array_equal(features["id"], again["id"])
  _, everything = make_eval_batches(store, 8, max_examples=1000)
  assert everything.sum() == 100
  with pytest.raises(ValueError, match="max_examples"):
    make_eval_batches(store, 8, max_examples=-1)


def test_eval_batches_empty_store():
  features, mask = make_eval_batches(make_store([0, 0]), 4)
  assert mask.shape == (1, 4) and not np.any(mask)
  assert features["x"].shape == (1, 4, 3, 2)


def test_in_order_batching_walks_each_clients_rows_in_stored_order():
  store = make_store([5, 3])
  batch = make_cohort(store, np.array([0, 1]), batch_size=2, num_epochs=2,
                      seed=0, round_index=0, shuffle=False)
  ids = batch.features["id"]
  # Client 0 owns ids 1..5, two epochs in order, cut into batches of 2.
  np.testing.assert_array_equal(ids[0].ravel()[:10],
                                [1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
  np.testing.assert_array_equal(ids[1].ravel()[:6], [6, 7, 8, 6, 7, 8])
  # The same batch regardless of seed or round (nothing is random).
  again = make_cohort(store, np.array([0, 1]), batch_size=2, num_epochs=2,
                      seed=7, round_index=3, shuffle=False)
  np.testing.assert_array_equal(again.features["id"], ids)
  shuffled = make_cohort(store, np.array([0, 1]), batch_size=2,
                         num_epochs=2, seed=0, round_index=0)
  assert not np.array_equal(shuffled.features["id"], ids)
  # Shuffling permutes within each epoch: the same examples are used.
  np.testing.assert_array_equal(np.sort(shuffled.features["id"].ravel()),
                                np.sort(ids.ravel()))


def test_fixed_step_padding_gives_every_cohort_the_same_shape():
  from fedjax_lab.data.cohort import fixed_step_padding, make_round_cohort
  store = make_store([1, 2, 9, 40])
  buckets = fixed_step_padding(store, batch_size=4, num_epochs=1)
  assert buckets == [10]
  shapes = {make_round_cohort(store, np.array(c), batch_size=4, num_epochs=1,
                              max_steps=None, seed=0, round_index=0,
                              step_buckets=buckets).padded_shape[1]
            for c in ([0], [0, 1], [2, 3], [3])}
  assert shapes == {10}
  bucketed = {make_round_cohort(store, np.array(c), batch_size=4,
                                num_epochs=1, max_steps=None, seed=0,
                                round_index=0).padded_shape[1]
              for c in ([0], [2])}
  assert bucketed == {1, 3}
  assert fixed_step_padding(store, batch_size=4, max_steps=5) == [5]


def test_make_client_eval_batches_places_each_clients_rows():
  from fedjax_lab.data.cohort import make_client_eval_batches
  store = make_store([6, 0, 3, 9])
  positions = np.array([2, 1, 3])  # client 1 has no examples
  features, mask = make_client_eval_batches(store, positions, batch_size=4,
                                            num_padded_clients=4)
  assert mask.shape == (4, 3, 4)  # ceil(9 / 4) = 3 batches
  for slot, k in enumerate(positions):
    n = store.client_sizes[k]
    flat_mask = mask[slot].reshape(-1)
    assert flat_mask[:n].all() and not flat_mask[n:].any()
    np.testing.assert_array_equal(features["id"][slot].reshape(-1)[:n],
                                  store.client(k)["id"])
    np.testing.assert_array_equal(features["x"][slot].reshape(-1, 3, 2)[:n],
                                  store.client(k)["x"])
  assert not mask[3].any()
  with pytest.raises(ValueError, match="num_padded_clients"):
    make_client_eval_batches(store, positions, batch_size=4,
                             num_padded_clients=2)


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=12),
       data=st.data(), num_shares=st.integers(1, 4))
def test_process_shares_concatenate_to_the_whole_cohort(sizes, data,
                                                        num_shares):
  # Each process of a multi-process run builds only its rows of the padded
  # cohort; its rows must be exactly those of the whole cohort's batch.
  store = make_store(sizes)
  indices = np.asarray(data.draw(st.lists(
      st.integers(0, len(sizes) - 1), min_size=0, max_size=10)), np.int64)
  kwargs = dict(batch_size=4, num_epochs=2, max_steps=None, seed=5,
                round_index=3, cohort_multiple_of=num_shares)
  whole = make_round_cohort(store, indices, **kwargs)
  padded = whole.padded_cohort_size
  assert padded == whole.client_mask.shape[0]
  share = padded // num_shares
  parts = [make_round_cohort(
      store, indices, **kwargs,
      client_rows=lambda size, i=i: (i * size // num_shares,
                                     (i + 1) * size // num_shares))
           for i in range(num_shares)]
  for part in parts:
    assert part.padded_cohort_size == padded
    assert part.client_mask.shape[0] == share
  for name in ("example_mask", "client_mask", "num_examples",
               "client_indices", "num_steps"):
    np.testing.assert_array_equal(
        getattr(whole, name),
        np.concatenate([getattr(part, name) for part in parts]))
  for name, values in whole.features.items():
    np.testing.assert_array_equal(
        values, np.concatenate([part.features[name] for part in parts]))


def test_process_share_outside_the_padded_cohort_is_rejected():
  store = make_store([3, 4])
  with pytest.raises(ValueError, match="client_rows"):
    make_cohort(store, np.array([0, 1]), batch_size=2, seed=0,
                round_index=0, client_rows=(1, 9))
