"""Tests for fedjax_lab.data.sampling."""

import math
import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fedjax_lab.data import sampling
from fedjax_lab.data.sampling import (PoissonSampler, ScheduleSampler,
                                      ShuffledSampler, UniformSampler,
                                      make_sampler)


def _check_cohort(cohort, num_clients):
  """Shared invariants of any sampled cohort."""
  assert cohort.dtype == np.int64
  assert cohort.ndim == 1
  assert np.all(np.diff(cohort) > 0), "must be sorted and without repeats"
  if cohort.size:
    assert cohort[0] >= 0 and cohort[-1] < num_clients


# ----------------------------------------------------------------- uniform


@settings(max_examples=60, deadline=None)
@given(num_clients=st.integers(1, 300), data=st.data(),
       seed=st.integers(0, 2**63 - 1), round_index=st.integers(0, 10**9))
def test_uniform_shape_and_determinism(num_clients, data, seed, round_index):
  cohort_size = data.draw(st.integers(1, num_clients))
  sampler = UniformSampler(num_clients, cohort_size, seed)
  cohort = sampler.sample(round_index)
  _check_cohort(cohort, num_clients)
  assert len(cohort) == cohort_size
  # Same (seed, round) -> same cohort, from a fresh object too.
  np.testing.assert_array_equal(
      cohort, UniformSampler(num_clients, cohort_size, seed).sample(
          round_index))


def test_uniform_stateless_across_rounds():
  """Resuming at round t (or sampling out of order) draws the same cohorts."""
  forward = UniformSampler(100, 10, seed=7)
  drawn = [forward.sample(t) for t in range(20)]
  resumed = UniformSampler(100, 10, seed=7)
  for t in reversed(range(5, 20)):
    np.testing.assert_array_equal(resumed.sample(t), drawn[t])


def test_uniform_varies_across_rounds_and_seeds():
  sampler = UniformSampler(1000, 10, seed=0)
  cohorts = {tuple(sampler.sample(t)) for t in range(50)}
  assert len(cohorts) == 50
  other_seed = UniformSampler(1000, 10, seed=1)
  assert not np.array_equal(sampler.sample(0), other_seed.sample(0))


def test_uniform_full_population():
  np.testing.assert_array_equal(UniformSampler(7, 7, 3).sample(4),
                                np.arange(7))


def test_uniform_covers_clients_uniformly():
  """Chi-square on per-client inclusion counts, and pairs are not biased."""
  num_clients, cohort_size, num_rounds = 20, 5, 2000
  sampler = UniformSampler(num_clients, cohort_size, seed=123)
  counts = np.zeros(num_clients)
  together = np.zeros([num_clients, num_clients])
  for t in range(num_rounds):
    cohort = sampler.sample(t)
    counts[cohort] += 1
    together[np.ix_(cohort, cohort)] += 1
  expected = num_rounds * cohort_size / num_clients
  chi_square = np.sum((counts - expected) ** 2 / expected)
  # df = 19: the 99.9% quantile is 43.8 (and the without-replacement
  # constraint only shrinks the statistic).
  assert chi_square < 43.8, chi_square
  # Each pair co-occurs with probability k(k-1) / (N(N-1)).
  pair_expected = num_rounds * cohort_size * (cohort_size - 1) / (
      num_clients * (num_clients - 1))
  off_diagonal = together[~np.eye(num_clients, dtype=bool)]
  pair_sd = math.sqrt(pair_expected)
  assert abs(off_diagonal.mean() - pair_expected) < 0.05 * pair_expected
  assert np.max(np.abs(off_diagonal - pair_expected)) < 5 * pair_sd


@pytest.mark.parametrize("kwargs, error", [
    (dict(num_clients=5, cohort_size=6, seed=0), "cannot exceed"),
    (dict(num_clients=5, cohort_size=0, seed=0), "cohort_size must be >= 1"),
    (dict(num_clients=0, cohort_size=1, seed=0), "num_clients must be >= 1"),
    (dict(num_clients=5, cohort_size=2, seed=-1), "seed must be >= 0"),
])
def test_uniform_rejects_bad_arguments(kwargs, error):
  with pytest.raises(ValueError, match=error):
    UniformSampler(**kwargs)


def test_uniform_rejects_non_integers():
  with pytest.raises(TypeError, match="cohort_size must be an integer"):
    UniformSampler(10, 2.5, 0)
  with pytest.raises(ValueError, match="round_index must be >= 0"):
    UniformSampler(10, 2, 0).sample(-1)


def test_kinds():
  assert UniformSampler(3, 1, 0).kind == "fixed"
  assert PoissonSampler(3, 0.5, 0).kind == "poisson"
  assert ShuffledSampler(3, 1, 0).kind == "shuffle"


# ----------------------------------------------------------------- poisson


@settings(max_examples=60, deadline=None)
@given(num_clients=st.integers(1, 500),
       sampling_rate=st.floats(1e-3, 1.0),
       seed=st.integers(0, 2**63 - 1), round_index=st.integers(0, 10**9))
def test_poisson_shape_and_determinism(num_clients, sampling_rate, seed,
                                       round_index):
  sampler = PoissonSampler(num_clients, sampling_rate, seed)
  cohort = sampler.sample(round_index)
  _check_cohort(cohort, num_clients)
  np.testing.assert_array_equal(
      cohort,
      PoissonSampler(num_clients, sampling_rate, seed).sample(round_index))


def test_poisson_cohort_size_moments():
  """Size ~ Binomial(N, q): mean N q and variance N q (1 - q)."""
  num_clients, rate, num_rounds = 1000, 0.05, 2000
  sampler = PoissonSampler(num_clients, rate, seed=2024)
  sizes = np.array([len(sampler.sample(t)) for t in range(num_rounds)])
  mean = num_clients * rate
  variance = num_clients * rate * (1 - rate)
  assert sampler.expected_cohort_size == pytest.approx(mean)
  # 5 standard errors of each estimator.
  assert abs(sizes.mean() - mean) < 5 * math.sqrt(variance / num_rounds)
  variance_se = variance * math.sqrt(2 / (num_rounds - 1))
  assert abs(sizes.var(ddof=1) - variance) < 5 * variance_se
  assert len(set(sizes.tolist())) > 10, "cohort size must actually vary"


def test_poisson_per_client_inclusion_rate():
  num_clients, rate, num_rounds = 50, 0.2, 2000
  sampler = PoissonSampler(num_clients, rate, seed=5)
  counts = np.zeros(num_clients)
  for t in range(num_rounds):
    counts[sampler.sample(t)] += 1
  expected = num_rounds * rate
  sd = math.sqrt(num_rounds * rate * (1 - rate))
  assert np.max(np.abs(counts - expected)) < 5 * sd
  chi_square = np.sum((counts - expected) ** 2 / (sd**2))
  # df = 50: the 99.9% quantile is 86.7.
  assert chi_square < 86.7, chi_square


def test_poisson_cost_does_not_grow_with_the_population():
  # An O(N) draw at N = 10^8 would allocate ~800 MB (one uniform per
  # client); the binomial count + subset draw touches O(cohort) memory only.
  tracemalloc.start()
  try:
    cohort = PoissonSampler(10**8, 2e-6, seed=1).sample(7)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert 100 < cohort.size < 320  # Binomial(1e8, 2e-6): mean 200, sd 14
  _check_cohort(cohort, 10**8)
  assert peak < 1_000_000, f"peak {peak} bytes"


def test_uniform_cost_does_not_grow_with_the_population():
  tracemalloc.start()
  try:
    cohort = UniformSampler(10**8, 1000, seed=3).sample(2)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  _check_cohort(cohort, 10**8)
  assert cohort.size == 1000
  assert peak < 1_000_000, f"peak {peak} bytes"


def test_poisson_inclusions_are_pairwise_independent():
  """P(i and j both in) = q^2 for every pair (a fixed-size draw would give
  q (k - 1) / (N - 1) instead): the pair counts over rounds match q^2."""
  num_clients, rate, num_rounds = 12, 0.4, 4000
  sampler = PoissonSampler(num_clients, rate, seed=11)
  together = np.zeros((num_clients, num_clients))
  for t in range(num_rounds):
    member = np.zeros(num_clients)
    member[sampler.sample(t)] = 1
    together += np.outer(member, member)
  pairs = together[np.triu_indices(num_clients, 1)] / num_rounds
  se = math.sqrt(rate**2 * (1 - rate**2) / num_rounds)
  assert abs(pairs.mean() - rate**2) < 5 * se / math.sqrt(len(pairs))
  assert np.max(np.abs(pairs - rate**2)) < 5 * se


def test_poisson_can_be_empty_and_full():
  small = PoissonSampler(10, 0.01, seed=0)
  empties = [c for c in (small.sample(t) for t in range(100)) if c.size == 0]
  assert empties, "P(empty) = 0.9 per round; 100 rounds must hit one"
  assert empties[0].dtype == np.int64 and empties[0].shape == (0,)
  np.testing.assert_array_equal(PoissonSampler(6, 1.0, 0).sample(3),
                                np.arange(6))


def test_poisson_varies_across_rounds_and_is_stateless():
  sampler = PoissonSampler(500, 0.1, seed=9)
  drawn = [sampler.sample(t) for t in range(30)]
  assert len({tuple(c) for c in drawn}) == 30
  np.testing.assert_array_equal(PoissonSampler(500, 0.1, 9).sample(17),
                                drawn[17])


def test_poisson_and_uniform_streams_are_unrelated():
  """Same seed must not make the two schemes pick correlated clients."""
  uniform = UniformSampler(1000, 100, seed=0).sample(0)
  poisson = PoissonSampler(1000, 0.1, seed=0).sample(0)
  overlap = len(np.intersect1d(uniform, poisson))
  # Independent draws overlap in ~10 clients (sd ~3).
  assert overlap < 30


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5, float("nan")])
def test_poisson_rejects_bad_rate(rate):
  with pytest.raises(ValueError, match=r"sampling_rate must be in \(0, 1\]"):
    PoissonSampler(10, rate, 0)


def test_poisson_rejects_non_numbers():
  with pytest.raises(TypeError, match="sampling_rate must be a number"):
    PoissonSampler(10, "0.1", 0)
  with pytest.raises(ValueError, match="seed"):
    PoissonSampler(10, 0.1, -3)


# ----------------------------------------------------------------- shuffle


@settings(max_examples=40, deadline=None)
@given(num_clients=st.integers(1, 200), data=st.data(),
       seed=st.integers(0, 2**63 - 1), epoch=st.integers(0, 10**6))
def test_shuffle_each_client_at_most_once_per_epoch(num_clients, data, seed,
                                                     epoch):
  cohort_size = data.draw(st.integers(1, num_clients))
  sampler = ShuffledSampler(num_clients, cohort_size, seed)
  rounds = sampler.rounds_per_epoch
  assert rounds == num_clients // cohort_size
  start = epoch * rounds
  cohorts = [sampler.sample(start + r) for r in range(rounds)]
  for cohort in cohorts:
    _check_cohort(cohort, num_clients)
    assert len(cohort) == cohort_size
  everyone = np.concatenate(cohorts)
  assert len(np.unique(everyone)) == rounds * cohort_size, "a client repeated"
  # Exactly num_clients % cohort_size clients sit the epoch out.
  assert num_clients - len(everyone) == num_clients % cohort_size
  assert all(sampler.epoch(start + r) == epoch for r in range(rounds))


def test_shuffle_draws_one_permutation_per_epoch(monkeypatch):
  sampler = ShuffledSampler(100, 10, seed=4)
  epochs_drawn = []
  original = sampling._round_rng

  def counting(seed, index, salt):
    epochs_drawn.append(index)
    return original(seed, index, salt)

  monkeypatch.setattr(sampling, "_round_rng", counting)
  cohorts = [sampler.sample(t) for t in range(25)]  # epochs 0, 1, 2
  assert epochs_drawn == [0, 1, 2]
  fresh = ShuffledSampler(100, 10, seed=4)
  for t in (24, 3, 17, 0):  # any order: still a pure function of the round
    np.testing.assert_array_equal(fresh.sample(t), cohorts[t])


def test_shuffle_deterministic_and_stateless():
  forward = ShuffledSampler(103, 10, seed=11)
  drawn = [forward.sample(t) for t in range(35)]
  resumed = ShuffledSampler(103, 10, seed=11)
  for t in reversed(range(35)):
    np.testing.assert_array_equal(resumed.sample(t), drawn[t])


def test_shuffle_epochs_and_seeds_differ():
  sampler = ShuffledSampler(1000, 100, seed=3)
  assert sampler.rounds_per_epoch == 10
  first_rounds = [tuple(sampler.sample(e * 10)) for e in range(20)]
  assert len(set(first_rounds)) == 20
  # Two epochs' first cohorts overlap like independent draws (~10 clients).
  overlap = len(np.intersect1d(sampler.sample(0), sampler.sample(10)))
  assert overlap < 30
  other_seed = ShuffledSampler(1000, 100, seed=4)
  assert not np.array_equal(sampler.sample(0), other_seed.sample(0))
  # Unrelated to the uniform sampler's stream for the same seed.
  uniform = UniformSampler(1000, 100, seed=3).sample(0)
  assert len(np.intersect1d(uniform, sampler.sample(0))) < 30


def test_shuffle_sitting_out_clients_rotate():
  """With N % M leftovers, who sits out changes from epoch to epoch."""
  sampler = ShuffledSampler(10, 3, seed=0)
  assert sampler.rounds_per_epoch == 3
  left_out = []
  for epoch in range(50):
    used = np.concatenate([sampler.sample(3 * epoch + r) for r in range(3)])
    left_out.append(int(np.setdiff1d(np.arange(10), used)[0]))
  assert len(set(left_out)) == 10


def test_shuffle_covers_clients_uniformly():
  num_clients, cohort_size, num_epochs = 20, 6, 600
  sampler = ShuffledSampler(num_clients, cohort_size, seed=77)
  counts = np.zeros(num_clients)
  for t in range(num_epochs * sampler.rounds_per_epoch):
    counts[sampler.sample(t)] += 1
  # Each client is in an epoch with probability 18/20; bounded counts.
  expected = num_epochs * 18 / 20
  sd = math.sqrt(num_epochs * 0.9 * 0.1)
  assert np.max(np.abs(counts - expected)) < 5 * sd


def test_shuffle_full_population_and_single_client_cohorts():
  np.testing.assert_array_equal(ShuffledSampler(7, 7, 3).sample(4),
                                np.arange(7))
  one = ShuffledSampler(5, 1, 2)
  assert sorted(int(one.sample(t)[0]) for t in range(5, 10)) == list(range(5))


@pytest.mark.parametrize("kwargs, error", [
    (dict(num_clients=5, cohort_size=6, seed=0), "cannot exceed"),
    (dict(num_clients=5, cohort_size=0, seed=0), "cohort_size must be >= 1"),
    (dict(num_clients=0, cohort_size=1, seed=0), "num_clients must be >= 1"),
    (dict(num_clients=5, cohort_size=2, seed=-1), "seed must be >= 0"),
])
def test_shuffle_rejects_bad_arguments(kwargs, error):
  with pytest.raises(ValueError, match=error):
    ShuffledSampler(**kwargs)


def test_shuffle_rejects_non_integers():
  with pytest.raises(TypeError, match="cohort_size must be an integer"):
    ShuffledSampler(10, 2.5, 0)
  with pytest.raises(ValueError, match="round_index must be >= 0"):
    ShuffledSampler(10, 2, 0).sample(-1)


# ------------------------------------------------------------ make_sampler


def test_make_sampler_kinds():
  fixed = make_sampler("fixed", 10, cohort_size=3, seed=4)
  assert isinstance(fixed, UniformSampler) and fixed.cohort_size == 3
  np.testing.assert_array_equal(fixed.sample(2),
                                UniformSampler(10, 3, 4).sample(2))
  assert isinstance(make_sampler("uniform", 10, cohort_size=3),
                    UniformSampler)
  poisson = make_sampler("Poisson", 10, sampling_rate=0.3, seed=1)
  assert isinstance(poisson, PoissonSampler)
  assert poisson.expected_cohort_size == pytest.approx(3.0)
  shuffle = make_sampler("shuffle", 10, cohort_size=3, seed=4)
  assert isinstance(shuffle, ShuffledSampler) and shuffle.cohort_size == 3
  assert shuffle.rounds_per_epoch == 3
  np.testing.assert_array_equal(shuffle.sample(5),
                                ShuffledSampler(10, 3, 4).sample(5))
  assert isinstance(make_sampler("Shuffled", 10, cohort_size=3),
                    ShuffledSampler)


@pytest.mark.parametrize("kind, kwargs, error", [
    ("fixed", {}, "needs cohort_size"),
    ("poisson", {}, "needs sampling_rate"),
    ("fixed", dict(cohort_size=2, sampling_rate=0.1), "only meaningful"),
    ("poisson", dict(cohort_size=2, sampling_rate=0.1), "only meaningful"),
    ("shuffle", {}, "needs cohort_size"),
    ("shuffle", dict(cohort_size=2, sampling_rate=0.1), "only meaningful"),
    ("shuffle", dict(cohort_size=11), "cannot exceed"),
    ("stratified", dict(cohort_size=2), "unknown sampler kind"),
])
def test_make_sampler_rejects_bad_configs(kind, kwargs, error):
  with pytest.raises(ValueError, match=error):
    make_sampler(kind, 10, **kwargs)



def test_schedule_sampler_replays_the_given_cohorts_sorted():
  sampler = ScheduleSampler(10, [[3, 1], [9], [0, 2, 4]])
  assert sampler.kind == "schedule"
  assert sampler.num_rounds == 3
  np.testing.assert_array_equal(sampler.sample(0), [1, 3])
  np.testing.assert_array_equal(sampler.sample(2), [0, 2, 4])
  assert sampler.sample(1).dtype == np.int64
  # Pure function of the round: asking again (or out of order) is the same.
  np.testing.assert_array_equal(sampler.sample(0), [1, 3])
  with pytest.raises(IndexError, match="3 cohorts"):
    sampler.sample(3)


@pytest.mark.parametrize("cohorts, match", [
    ([[0, 10]], "outside"), ([[1, 1]], "repeats"), ([], "at least one"),
    ([[0.5]], "1-D list"), ([[[0, 1]]], "1-D list")])
def test_schedule_sampler_refuses_bad_schedules(cohorts, match):
  with pytest.raises(ValueError, match=match):
    ScheduleSampler(10, cohorts)
