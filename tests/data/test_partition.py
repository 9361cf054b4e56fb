"""Tests of fedjax_lab.data.partition: coverage, sizes, skew, determinism."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lab.data import partition


def _assert_exact_cover(client_rows, num_examples):
  rows = np.concatenate(client_rows)
  assert len(rows) == num_examples
  np.testing.assert_array_equal(np.sort(rows), np.arange(num_examples))


def _mean_max_label_fraction(labels, client_rows):
  """Average over clients of the share of the client's most common label."""
  return float(np.mean([
      np.bincount(labels[r]).max() / len(r) for r in client_rows]))


@settings(max_examples=50, deadline=None)
@given(num_examples=st.integers(1, 500), num_clients=st.integers(1, 60),
       seed=st.integers(0, 2**32 - 1))
def test_iid_partition_covers_rows_once_with_balanced_sizes(
    num_examples, num_clients, seed):
  if num_clients > num_examples:
    with pytest.raises(ValueError):
      partition.iid_partition(num_examples, num_clients,
                              np.random.default_rng(seed))
    return
  parts = partition.iid_partition(num_examples, num_clients,
                                  np.random.default_rng(seed))
  assert len(parts) == num_clients
  _assert_exact_cover(parts, num_examples)
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1
  assert all(p.dtype == np.int64 for p in parts)


def test_iid_partition_is_deterministic_and_shuffled():
  a = partition.iid_partition(100, 5, np.random.default_rng(3))
  b = partition.iid_partition(100, 5, np.random.default_rng(3))
  c = partition.iid_partition(100, 5, np.random.default_rng(4))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, z) for x, z in zip(a, c))
  # Shuffled: client 0 is not simply the first 20 rows.
  assert not np.array_equal(a[0], np.arange(20))


@settings(max_examples=40, deadline=None)
@given(num_classes=st.integers(2, 8), num_clients=st.integers(1, 20),
       alpha=st.sampled_from([0.5, 1.0, 10.0]),
       seed=st.integers(0, 10_000))
def test_dirichlet_partition_covers_rows_once_and_respects_minimum(
    num_classes, num_clients, alpha, seed):
  # (Very small alpha with few classes and many clients can legitimately fail
  # the minimum size; that path is tested separately.)
  labels = np.random.default_rng(seed).integers(0, num_classes, 400)
  parts = partition.dirichlet_label_partition(
      labels, num_clients, alpha, np.random.default_rng(seed),
      min_examples_per_client=2)
  assert len(parts) == num_clients
  _assert_exact_cover(parts, len(labels))
  assert min(len(p) for p in parts) >= 2


def test_dirichlet_small_alpha_gives_more_label_skew():
  labels = np.repeat(np.arange(10), 300)
  skews = {}
  for alpha in (0.05, 1.0, 1000.0):
    parts = partition.dirichlet_label_partition(
        labels, 30, alpha, np.random.default_rng(0))
    skews[alpha] = _mean_max_label_fraction(labels, parts)
  assert skews[0.05] > 0.7          # most clients dominated by one label
  assert skews[1000.0] < 0.2        # close to the uniform 0.1
  assert skews[0.05] > skews[1.0] > skews[1000.0]


def test_dirichlet_large_alpha_approaches_proportional_sizes():
  labels = np.repeat(np.arange(4), 1000)
  parts = partition.dirichlet_label_partition(
      labels, 8, 1e4, np.random.default_rng(1))
  sizes = np.array([len(p) for p in parts])
  assert np.all(np.abs(sizes - 500) < 40)


def test_dirichlet_is_deterministic_from_rng_seed():
  labels = np.random.default_rng(0).integers(0, 10, 1000)
  a = partition.dirichlet_label_partition(labels, 20, 0.3,
                                          np.random.default_rng(7))
  b = partition.dirichlet_label_partition(labels, 20, 0.3,
                                          np.random.default_rng(7))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


def test_dirichlet_raises_when_minimum_cannot_be_met():
  labels = np.zeros(10, dtype=np.int64)
  with pytest.raises(ValueError, match="impossible"):
    partition.dirichlet_label_partition(labels, 6, 1.0,
                                        np.random.default_rng(0),
                                        min_examples_per_client=2)
  # Feasible in principle (exactly 2 each) but practically never drawn.
  labels = np.zeros(100, dtype=np.int64)
  with pytest.raises(ValueError, match="attempts"):
    partition.dirichlet_label_partition(labels, 50, 0.01,
                                        np.random.default_rng(0),
                                        min_examples_per_client=2)


def test_dirichlet_rejects_bad_arguments():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError):
    partition.dirichlet_label_partition(np.zeros(10, int), 2, 0.0, rng)
  with pytest.raises(ValueError):
    partition.dirichlet_label_partition(np.zeros((10, 2), int), 2, 1.0, rng)
  with pytest.raises(ValueError):
    partition.dirichlet_label_partition(np.zeros(10, int), 0, 1.0, rng)


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 60), min_size=1, max_size=15),
       test_fraction=st.sampled_from([0.0, 0.1, 0.2, 0.5, 0.9]),
       seed=st.integers(0, 10_000))
def test_train_test_split_per_client_invariants(sizes, test_fraction, seed):
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  client_rows = [np.arange(s, s + n) for s, n in zip(starts, sizes)]
  train, test = partition.train_test_split_per_client(
      client_rows, test_fraction, np.random.default_rng(seed))
  assert len(train) == len(test) == len(sizes)
  for rows, tr, te in zip(client_rows, train, test):
    assert len(tr) >= 1
    assert len(np.intersect1d(tr, te)) == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, te])), rows)
    n = len(rows)
    if test_fraction > 0 and n >= 2:
      assert len(te) >= 1
    if test_fraction == 0:
      assert len(te) == 0
    if n >= 20 and 0 < test_fraction <= 0.5:
      assert abs(len(te) - test_fraction * n) <= 1


def test_train_test_split_rejects_bad_input():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError):
    partition.train_test_split_per_client([np.arange(3)], 1.0, rng)
  with pytest.raises(ValueError):
    partition.train_test_split_per_client([np.arange(0)], 0.2, rng)


def test_partition_labelled_unknown_scheme():
  with pytest.raises(ValueError, match="iid"):
    partition.partition_labelled(np.zeros(10, int), 2, "pathological", 1.0,
                                 np.random.default_rng(0), 0.2)
