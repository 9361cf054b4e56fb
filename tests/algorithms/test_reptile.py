"""Reptile (Nichol et al. 2018) as a federated algorithm (Jiang et al. 2019)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg
from fedjax_lab.algorithms import reptile
from fedjax_lab.data.cohort import make_round_cohort
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.engine.round import build_round
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.privacy.aggregators import gaussian_sum
from fedjax_lab.privacy.clipping import global_norm

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(5)


@functools.lru_cache(maxsize=None)
def _round_fn(algorithm):
  """One compiled round per algorithm object (reused across cohorts)."""
  return build_round(algorithm, Strategy(), donate=False)


def _run(algorithm, params, cohort, rounds=1):
  fn = _round_fn(algorithm)
  state = algorithm.server_init(params)
  num = cohort["client_mask"].shape[0]
  metrics = None
  for _ in range(rounds):
    state, _, metrics = fn(state, cohort, jnp.zeros([num]), RNG)
  return state, {k: float(v) for k, v in metrics.items()}


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def test_invalid_arguments(deterministic_model):
  with pytest.raises(ValueError, match="num_inner_steps"):
    reptile.reptile(deterministic_model, optax.sgd(0.1), num_inner_steps=0)
  with pytest.raises(ValueError, match="meta_step_size"):
    reptile.reptile(deterministic_model, optax.sgd(0.1), 3,
                    meta_step_size=0.0)
  with pytest.raises(ValueError, match="not both"):
    reptile.reptile(deterministic_model, optax.sgd(0.1), 3,
                    meta_step_size=0.5, server_optimizer=optax.adam(0.1))
  with pytest.raises(ValueError, match="weighting"):
    reptile.reptile(deterministic_model, optax.sgd(0.1), 3, weighting="x")
  with pytest.raises(ValueError, match="batch_size"):
    reptile.cohort_schedule(3, 0)


def test_meta_step_one_without_cap_is_uniform_fedavg(tiny_model):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(7, seed=2)
  cohort = build_cohort(clients, [0, 2, 3, 6], batch_size=3, pad_clients=1,
                        extra_steps=1)
  ref, ref_metrics = _run(
      fedavg.fedavg(tiny_model, optax.sgd(0.1), weighting="uniform"), params,
      cohort, rounds=2)
  got, metrics = _run(reptile.reptile(tiny_model, optax.sgd(0.1), None),
                      params, cohort, rounds=2)
  _assert_trees_equal(got.params, ref.params)
  assert metrics["train_loss"] == ref_metrics["train_loss"]
  steps = [-(-len(clients[i][1]) // 3) for i in [0, 2, 3, 6]]
  assert metrics["inner_steps"] == pytest.approx(np.mean(steps))
  # A cap no client reaches changes nothing either.
  capped, _ = _run(reptile.reptile(tiny_model, optax.sgd(0.1), max(steps)),
                   params, cohort, rounds=2)
  _assert_trees_equal(capped.params, ref.params)


def test_step_cap_is_honoured(deterministic_model):
  """Clients with 1, 4 and 8 batches and a cap of 3: the round equals FedAvg
  on the batches cut after step 3, and the metrics count 1, 3 and 3 steps."""
  model = deterministic_model
  params = model.init(jax.random.key(1))
  sizes = [4, 15, 32]
  clients = [make_clients(1, seed=10 + i, min_size=n, max_size=n)[0]
             for i, n in enumerate(sizes)]
  cohort = build_cohort(clients, [0, 1, 2], batch_size=4, pad_clients=1)
  assert list(cohort["example_mask"].any(axis=2).sum(axis=1)) == [1, 4, 8, 0]
  truncated = build_cohort(clients, [0, 1, 2], batch_size=4, num_steps=3,
                           pad_clients=1)
  algorithm = reptile.reptile(model, optax.sgd(0.2), num_inner_steps=3)
  got, metrics = _run(algorithm, params, cohort)
  ref, ref_metrics = _run(fedavg.fedavg(model, optax.sgd(0.2),
                                        weighting="uniform"), params,
                          truncated)
  _assert_trees_close(got.params, ref.params, rtol=1e-6, atol=1e-7)
  assert metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"],
                                                rel=1e-6)
  assert metrics["inner_steps"] == pytest.approx((1 + 3 + 3) / 3)
  assert metrics["fraction_clients_short_of_inner_steps"] == pytest.approx(
      1 / 3)
  # The cap matters: uncapped training lands elsewhere.
  uncapped, _ = _run(reptile.reptile(model, optax.sgd(0.2), None), params,
                     cohort)
  assert not np.allclose(uncapped.params["Dense_0"]["kernel"],
                         got.params["Dense_0"]["kernel"], atol=1e-4)


def test_meta_step_size_interpolates(deterministic_model):
  """x + epsilon * mean(y_k - x): a fraction epsilon of the epsilon = 1 move."""
  params = deterministic_model.init(jax.random.key(2))
  clients = make_clients(5, seed=4)
  cohort = build_cohort(clients, [0, 1, 3, 4], batch_size=4)
  full, _ = _run(reptile.reptile(deterministic_model, optax.sgd(0.1), 2),
                 params, cohort)
  part, _ = _run(reptile.reptile(deterministic_model, optax.sgd(0.1), 2,
                                 meta_step_size=0.3), params, cohort)
  expected = jax.tree.map(lambda x, y: x + 0.3 * (y - x), params, full.params)
  _assert_trees_close(part.params, expected)


def test_cohort_schedule_gives_every_client_exactly_k_full_batches():
  sizes = [1, 3, 7, 40]
  store = ClientStore.from_client_arrays(
      [str(i) for i in range(len(sizes))],
      [{"x": np.zeros([n, 2], np.float32), "y": np.zeros([n], np.int32)}
       for n in sizes])
  schedule = reptile.cohort_schedule(num_inner_steps=5, batch_size=4)
  assert schedule == {"num_epochs": 20, "max_steps": 5}
  cohort = make_round_cohort(store, np.arange(4), batch_size=4,
                             seed=0, round_index=0, **schedule)
  np.testing.assert_array_equal(cohort.num_steps, [5, 5, 5, 5])
  per_step = cohort.example_mask.sum(axis=2)
  assert np.all(per_step[:, :5] == 4) and np.all(per_step[:, 5:] == 0)


def _deltas_one_by_one(model, params, clients, indices, num_inner_steps):
  """Each client's adapted model minus x, from a one-client round each
  (padded to 3 steps, so one compilation serves every client)."""
  algorithm = reptile.reptile(model, optax.sgd(0.2), num_inner_steps)
  deltas = []
  for i in indices:
    state, _ = _run(algorithm, params,
                    build_cohort(clients, [i], 4, num_steps=3))
    deltas.append(jax.tree.map(jnp.subtract, state.params, params))
  return deltas


def test_composes_with_gaussian_dp_aggregator(tiny_model):
  """gaussian_sum clips every y_k - x and divides by the expected cohort
  size; its noise on x is N(0, (epsilon z C / m)^2) per coordinate."""
  model = tiny_model
  params = model.init(jax.random.key(3))
  clients = make_clients(6, seed=6, min_size=8, max_size=12)
  indices, expected_cohort_size = [0, 2, 3, 5], 5.0
  cohort = build_cohort(clients, indices, batch_size=4, pad_clients=2)
  deltas = _deltas_one_by_one(model, params, clients, indices, 2)
  norms = np.array([float(global_norm(d)) for d in deltas])
  clip_norm, epsilon = float(np.median(norms)), 0.5
  assert norms.min() < clip_norm < norms.max()

  def run(noise_multiplier):
    algorithm = reptile.reptile(
        model, optax.sgd(0.2), 2, meta_step_size=epsilon,
        aggregator=gaussian_sum(clip_norm, noise_multiplier,
                                expected_cohort_size))
    return _run(algorithm, params, cohort)

  noiseless, metrics = run(0.0)
  clipped = [jax.tree.map(lambda d, n=n: d * min(1.0, clip_norm / n), d)
             for d, n in zip(deltas, norms)]
  expected = jax.tree.map(
      lambda x, *ds: x + epsilon * sum(ds) / expected_cohort_size, params,
      *clipped)
  _assert_trees_close(noiseless.params, expected)
  assert metrics["fraction_clipped"] == pytest.approx(np.mean(norms >
                                                              clip_norm))
  assert metrics["inner_steps"] == 2.0

  noise_multiplier = 1.3
  noisy, _ = run(noise_multiplier)
  noise = np.concatenate([
      np.ravel(np.asarray(a) - np.asarray(b))
      for a, b in zip(jax.tree.leaves(noisy.params),
                      jax.tree.leaves(noiseless.params))])
  std = epsilon * noise_multiplier * clip_norm / expected_cohort_size
  standardized = noise / std
  # 195 coordinates: the sample std is within ~5% of 1 (one sigma).
  assert standardized.size == 195
  assert 0.8 < standardized.std() < 1.2
  assert abs(standardized.mean()) < 4 / np.sqrt(standardized.size)
