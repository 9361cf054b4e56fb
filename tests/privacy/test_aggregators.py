"""DP aggregators: clipping bound, noise std, FedAvg identity, adaptive clip."""

import math

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import stats

from fedjax_lab.algorithms import fedavg
from fedjax_lab.engine.round import build_round
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.privacy import aggregators
from fedjax_lab.privacy.clipping import clip_to_norm, global_norm

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(3)

_leaf = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=0, max_dims=3, max_side=5),
    elements=st.floats(-1e4, 1e4, width=32))


@hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
@hypothesis.given(tree=st.dictionaries(st.sampled_from("abcde"),
                                       st.lists(_leaf, min_size=1, max_size=3),
                                       min_size=1),
                  clip_norm=st.floats(1e-3, 1e3))
def test_clipped_norm_is_at_most_clip_norm(tree, clip_norm):
  tree = jax.tree.map(jnp.asarray, tree)
  clipped, norm = clip_to_norm(tree, clip_norm)
  assert float(global_norm(clipped)) <= clip_norm * (1 + 1e-5)
  expected_norm = math.sqrt(sum(float(np.sum(np.square(
      np.asarray(x, np.float64)))) for x in jax.tree.leaves(tree)))
  # float32 squares of subnormal entries underflow to 0: hence the atol.
  np.testing.assert_allclose(float(norm), expected_norm, rtol=1e-4,
                             atol=1e-18)
  if expected_norm <= clip_norm:  # inside the ball: unchanged (XLA may
    # flush subnormal floats to zero, hence the atol)
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(clipped)):
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                                 atol=1e-37)
  else:  # direction kept
    for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(clipped)):
      np.testing.assert_allclose(np.asarray(b) * expected_norm / clip_norm,
                                 np.asarray(a), rtol=1e-3, atol=1e-3)


def _finalize(aggregator, total, num_clients=5.0, rng=RNG, state=None):
  state = aggregator.init() if state is None else state
  return aggregator.finalize(total, jnp.float32(num_clients),
                             jnp.float32(num_clients), state, rng)


@pytest.mark.parametrize("clip_norm,noise_multiplier", [(1.0, 1.0),
                                                        (0.1, 3.0)])
def test_noise_on_the_sum_has_the_configured_std(clip_norm, noise_multiplier):
  dim = 200_000
  expected_cohort = 8.0
  agg = aggregators.gaussian_sum(clip_norm, noise_multiplier, expected_cohort)
  zero_sum = {"w": jnp.zeros([dim // 2]), "b": jnp.zeros([dim // 2])}
  aggregate, _, metrics = _finalize(agg, zero_sum)
  noise = np.concatenate([np.asarray(x) for x in jax.tree.leaves(aggregate)])
  noise = noise * expected_cohort  # back to the noise on the sum
  want = noise_multiplier * clip_norm
  # 99.9999% chi-square interval for the sample variance of dim normals.
  lo, hi = stats.chi2.ppf([5e-7, 1 - 5e-7], dim) / dim
  assert lo * want**2 < np.var(noise) < hi * want**2
  assert abs(np.mean(noise)) < 6 * want / math.sqrt(dim)
  assert float(metrics["dp_noise_std"]) == pytest.approx(want)
  assert float(metrics["dp_noise_std_on_mean"]) == pytest.approx(
      want / expected_cohort)


def test_noise_differs_between_leaves_and_rounds():
  agg = aggregators.gaussian_sum(1.0, 1.0, 4.0)
  zero = {"a": jnp.zeros([1000]), "b": jnp.zeros([1000])}
  out1, _, _ = _finalize(agg, zero, rng=jax.random.key(1))
  out2, _, _ = _finalize(agg, zero, rng=jax.random.key(2))
  assert not np.allclose(out1["a"], out1["b"])
  assert not np.allclose(out1["a"], out2["a"])


def test_denominator_is_fixed_whatever_the_cohort_size():
  agg = aggregators.gaussian_sum(1.0, 0.0, expected_cohort_size=10.0)
  total = {"w": jnp.full([3], 6.0)}
  for num_clients in (3.0, 10.0, 17.0):
    aggregate, _, _ = _finalize(agg, total, num_clients=num_clients)
    np.testing.assert_allclose(aggregate["w"], 0.6)


def test_large_cohort_noise_simulation_scales_the_noise():
  assert aggregators.noise_std_on_sum(2.0, 1.5, 10, 1000) == pytest.approx(
      2.0 * 1.5 * 10 / 1000)
  agg = aggregators.gaussian_sum(2.0, 1.5, 10.0, noise_cohort_size=1000)
  _, _, metrics = _finalize(agg, {"w": jnp.zeros([4])})
  # The noise on the average is what a 1000-client cohort would get.
  assert float(metrics["dp_noise_std_on_mean"]) == pytest.approx(
      2.0 * 1.5 / 1000)


def test_client_transform_clips_and_drops_weights():
  agg = aggregators.gaussian_sum(1.0, 1.0, 4.0)
  delta = {"w": jnp.full([4], 3.0)}  # norm 6
  clipped, weight, metrics = agg.client_transform(delta, jnp.float32(57.0),
                                                  agg.init(), RNG)
  assert float(global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
  assert float(weight) == 1.0
  assert float(metrics["update_norm"]) == pytest.approx(6.0)
  assert float(metrics["fraction_clipped"]) == 1.0


@pytest.mark.parametrize("strategy", [Strategy("vmap", "scan"),
                                      Strategy("map", "unroll")])
def test_dp_with_zero_noise_and_infinite_clip_equals_fedavg(tiny_model,
                                                            strategy):
  clients = make_clients(6, seed=4)
  cohort = build_cohort(clients, [0, 2, 3, 5], batch_size=4)
  params = tiny_model.init(jax.random.key(0))
  plain = fedavg.fedavg(tiny_model, optax.sgd(0.1), weighting="uniform")
  private = fedavg.fedavg(tiny_model, optax.sgd(0.1), weighting="uniform",
                          aggregator=aggregators.gaussian_sum(
                              math.inf, 0.0, expected_cohort_size=4.0))
  results = []
  for alg in (plain, private):
    fn = build_round(alg, strategy, donate=False)
    state = alg.server_init(params)
    for _ in range(2):
      state, _, _ = fn(state, cohort, jnp.zeros([4]), RNG)
    results.append(state.params)
  for a, b in zip(*map(jax.tree.leaves, results)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_dp_round_clips_each_client_inside_the_engine(tiny_model):
  clients = make_clients(5, seed=1)
  cohort = build_cohort(clients, [0, 1, 2, 3, 4], batch_size=3)
  params = tiny_model.init(jax.random.key(0))
  clip_norm = 1e-3
  alg = fedavg.fedavg(tiny_model, optax.sgd(0.5), weighting="uniform",
                      aggregator=aggregators.gaussian_sum(clip_norm, 0.0, 5.0))
  fn = build_round(alg, Strategy(), donate=False)
  state, _, metrics = fn(alg.server_init(params), cohort, jnp.zeros([5]), RNG)
  moved = global_norm(jax.tree.map(jnp.subtract, state.params, params))
  assert float(moved) <= clip_norm * (1 + 1e-4)  # mean of 5 clipped deltas
  assert float(metrics["fraction_clipped"]) == 1.0
  assert float(metrics["update_norm"]) > clip_norm


def test_split_noise_multiplier_composes_to_the_total():
  z_delta = aggregators.split_noise_multiplier(1.0, clipped_count_stddev=5.0)
  assert z_delta**-2 + (2 * 5.0)**-2 == pytest.approx(1.0)
  assert z_delta > 1.0
  with pytest.raises(ValueError, match="clipped_count_stddev"):
    aggregators.split_noise_multiplier(3.0, clipped_count_stddev=1.0)


def _run_adaptive(norm_sampler, quantile, rounds, noise_multiplier,
                  cohort=100, seed=0):
  """Drives the aggregator with client updates of known norm distribution."""
  agg = aggregators.adaptive_clipping(
      initial_clip_norm=0.1, noise_multiplier=noise_multiplier,
      expected_cohort_size=cohort, target_quantile=quantile,
      clip_learning_rate=0.2)
  transform = jax.jit(jax.vmap(agg.client_transform, in_axes=(0, 0, None, 0)))
  finalize = jax.jit(agg.finalize)
  rng = np.random.default_rng(seed)
  state = agg.init()
  key = jax.random.key(seed)
  for r in range(rounds):
    norms = norm_sampler(rng, cohort)
    directions = rng.normal(size=[cohort, 16])
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    deltas = {"w": jnp.asarray(directions * norms[:, None], jnp.float32)}
    keys = jax.random.split(jax.random.fold_in(key, r), cohort + 1)
    out, weights, _ = transform(deltas, jnp.ones([cohort]), state, keys[1:])
    total = jax.tree.map(lambda d: jnp.tensordot(weights, d, axes=1), out)
    _, state, _ = finalize(total, jnp.sum(weights), jnp.float32(cohort),
                           state, keys[0])
  return float(state)


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.8])
def test_adaptive_clipping_converges_to_the_target_quantile(quantile):
  sampler = lambda rng, n: rng.lognormal(mean=0.0, sigma=0.5, size=n)
  clip = _run_adaptive(sampler, quantile, rounds=150, noise_multiplier=0.0)
  want = math.exp(0.5 * stats.norm.ppf(quantile))  # lognormal quantile
  assert clip == pytest.approx(want, rel=0.12)


def test_adaptive_clipping_with_noise_still_tracks_the_quantile():
  sampler = lambda rng, n: rng.uniform(0.0, 4.0, size=n)
  clip = _run_adaptive(sampler, 0.5, rounds=200, noise_multiplier=1.0,
                       cohort=200)
  assert clip == pytest.approx(2.0, rel=0.2)


def test_adaptive_count_query_has_sensitivity_one_half():
  """Adding or removing one client moves the summed count leaf by 1/2."""
  agg = aggregators.adaptive_clipping(1.0, 0.0, expected_cohort_size=4.0)
  for norm in (0.5, 3.0):  # unclipped and clipped clients
    (_, centred), _, _ = agg.client_transform(
        {"w": jnp.asarray([norm])}, 1.0, agg.init(), RNG)
    assert abs(float(centred)) == 0.5
  # With zero noise the fraction is recovered exactly when n = m.
  total = ({"w": jnp.zeros([1])}, jnp.float32(3 * 0.5 + 1 * -0.5))
  _, new_clip, metrics = agg.finalize(total, 4.0, jnp.float32(4.0),
                                      agg.init(), RNG)
  assert float(metrics["unclipped_fraction_noisy"]) == pytest.approx(0.75)
  assert float(new_clip) == pytest.approx(math.exp(-0.2 * (0.75 - 0.5)))


def test_local_dp_mean_carries_each_clients_noise():
  """The mean of K local reports has noise std z C / sqrt(K) per coordinate."""
  agg = aggregators.local_gaussian(clip_norm=1.0, noise_multiplier=2.0)
  delta = {"w": jnp.full([50_000], 10.0)}  # clipped to norm 1
  clipped, weight, _ = agg.client_transform(delta, 7.0, (), RNG)
  assert float(global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
  assert float(weight) == 1.0
  for num_clients in (1.0, 4.0, 25.0):
    total = jax.tree.map(lambda c: c * num_clients, clipped)
    mean, _, metrics = agg.finalize(total, num_clients,
                                    jnp.float32(num_clients), (), RNG)
    noise = np.asarray(mean["w"] - clipped["w"])
    want = 2.0 / math.sqrt(num_clients)
    assert np.std(noise) == pytest.approx(want, rel=0.02)
    assert abs(np.mean(noise)) < 6 * want / math.sqrt(noise.size)
    assert float(metrics["dp_noise_std_on_mean"]) == pytest.approx(want)
