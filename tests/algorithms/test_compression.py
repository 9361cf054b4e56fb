"""Compression: quantization, Hadamard rotation, top-k, error feedback."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from fedjax_lab.algorithms import base, compression, fedavg, hadamard
from fedjax_lab.algorithms import scaffold
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.privacy import aggregators, clipping
from fedjax_lab.privacy.clipping import global_norm

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(5)
NUM_DRAWS = 4000


def _spiky_vector(size=100, seed=1):
  """Gaussian coordinates plus one outlier (the case rotation is made for)."""
  vector = np.random.default_rng(seed).normal(size=size).astype(np.float32)
  vector[3] = 20.0
  return vector


@functools.lru_cache(maxsize=None)
def _draws_fn(compressor):
  return jax.jit(jax.vmap(lambda x, k: compressor.compress(x, (), k)[0],
                          in_axes=(None, 0)))


def _decodings(compressor, vector, num_draws=NUM_DRAWS, seed=0):
  """``[num_draws, d]`` independent decodings of ``vector``."""
  keys = jax.random.split(jax.random.key(seed), num_draws)
  return np.asarray(_draws_fn(compressor)(jnp.asarray(vector), keys),
                    np.float64)


def _assert_unbiased(decoded, vector, coordinate_var_bound):
  """Mean of the draws vs ``vector``: a per-coordinate 5-sigma bound from the
  variance bound, and a chi-square check with the empirical variance."""
  num_draws = decoded.shape[0]
  error = decoded.mean(0) - vector
  assert np.all(np.abs(error) <= 5 * np.sqrt(coordinate_var_bound / num_draws)
                + 1e-6)
  std_error = decoded.std(0, ddof=1) / np.sqrt(num_draws)
  random = std_error > 0  # grid points are sent exactly
  mean_z2 = np.mean((error[random] / std_error[random])**2)
  # E = 1; std sqrt(2 / d) for independent coordinates (rotated draws are
  # correlated, so there the margin is only approximate).
  assert mean_z2 < 1 + 5 * np.sqrt(2 / random.sum())


# --------------------------------------------------------------- Hadamard


@pytest.mark.parametrize("size", [1, 2, 4, 16, 64])
def test_fwht_matches_scipy_hadamard(size):
  x = np.random.default_rng(size).normal(size=[3, size]).astype(np.float32)
  expected = x.astype(np.float64) @ scipy.linalg.hadamard(size).T
  np.testing.assert_allclose(np.asarray(hadamard.fwht(jnp.asarray(x))),
                             expected, rtol=1e-5, atol=1e-4)


def test_fwht_is_self_inverse_up_to_scale_and_rotation_is_orthogonal():
  x = jnp.asarray(np.random.default_rng(0).normal(size=32), jnp.float32)
  np.testing.assert_allclose(hadamard.fwht(hadamard.fwht(x)), 32 * x,
                             rtol=1e-5, atol=1e-5)
  size = 21  # padded to 32
  signs = hadamard.random_signs(jax.random.key(9), 32)
  assert set(np.asarray(signs).tolist()) == {-1.0, 1.0}
  rotation = jax.jit(jax.vmap(lambda e: hadamard.rotate(e, signs)))(
      jnp.eye(size))
  assert rotation.shape == (size, 32)
  np.testing.assert_allclose(rotation @ rotation.T, np.eye(size), atol=1e-6)
  v = x[:size]
  np.testing.assert_allclose(
      hadamard.unrotate(hadamard.rotate(v, signs), signs, size), v, atol=1e-5)
  with pytest.raises(ValueError, match="signs"):
    hadamard.rotate(v, signs[:16])
  with pytest.raises(ValueError, match="power-of-two"):
    hadamard.fwht(jnp.ones([12]))
  assert [hadamard.next_power_of_two(s) for s in (1, 2, 3, 600, 1024)] == [
      1, 2, 4, 1024, 1024]


# ------------------------------------------------------------ quantization


@pytest.mark.parametrize("num_bits", [1, 3])
def test_quantizer_is_unbiased_with_exact_variance(num_bits):
  vector = _spiky_vector()
  decoded = _decodings(compression.stochastic_quantization(num_bits), vector)
  step = (vector.max() - vector.min()) / (2**num_bits - 1)
  position = (vector.astype(np.float64) - vector.min()) / step
  below = vector.min() + np.floor(position) * step
  # The two grid neighbours: variance (x - g_low)(g_high - x) <= step^2 / 4.
  variance = (vector - below) * (below + step - vector)
  _assert_unbiased(decoded, vector, np.maximum(variance, 0))
  np.testing.assert_allclose(np.sum(decoded.var(0)), np.sum(variance),
                             rtol=0.1)


@pytest.mark.parametrize("num_bits", [1, 2])
def test_hadamard_quantizer_is_unbiased_and_meets_the_rotation_bound(num_bits):
  """Suresh et al. 2017, Sec. 4: E||Y - x||^2 <= (2 ln n + 2) ||x||^2 /
  (2^b - 1)^2 with rotation (n = 128 here); per coordinate the variance is at
  most that over n (each row of the rotation has unit norm)."""
  vector = _spiky_vector()
  padded = hadamard.next_power_of_two(vector.size)
  mse_bound = ((2 * np.log(padded) + 2) * np.sum(vector.astype(np.float64)**2)
               / (2**num_bits - 1)**2)
  rotated = _decodings(
      compression.stochastic_quantization(num_bits, "hadamard"), vector)
  _assert_unbiased(rotated, vector, np.full(vector.shape, mse_bound / padded))
  assert np.mean(np.sum((rotated - vector)**2, 1)) <= mse_bound
  if num_bits == 2:  # Without rotation the outlier's range breaks the bound.
    plain = _decodings(compression.stochastic_quantization(num_bits), vector,
                       num_draws=500)
    assert np.mean(np.sum((plain - vector)**2, 1)) > mse_bound


@pytest.mark.parametrize("per_leaf", [True, False])
@pytest.mark.parametrize("num_bits", [2, 3])
def test_decoded_values_lie_on_the_grid(num_bits, per_leaf):
  rng = np.random.default_rng(2)
  tree = {"w": jnp.asarray(rng.normal(size=[6, 5]), jnp.float32),
          "b": jnp.asarray(3 + rng.normal(size=[7]), jnp.float32)}
  quantizer = compression.stochastic_quantization(num_bits,
                                                  per_leaf=per_leaf)
  decoded, _, _ = jax.jit(quantizer.compress)(tree, (), jax.random.key(1))
  groups = ([(tree[k], decoded[k]) for k in tree] if per_leaf else
            [(jnp.concatenate([tree["b"], tree["w"].ravel()]),
              jnp.concatenate([decoded["b"], decoded["w"].ravel()]))])
  for original, out in groups:
    original, out = np.asarray(original), np.asarray(out)
    low, high = original.min(), original.max()
    level = (out - low) / ((high - low) / (2**num_bits - 1))
    np.testing.assert_allclose(level, np.round(level), atol=1e-4)
    assert level.min() > -1e-4 and level.max() < 2**num_bits - 1 + 1e-4
    # Each value is one of the two grid points around the original.
    spacing = (high - low) / (2**num_bits - 1)
    assert np.all(np.abs(out - original) <= spacing * (1 + 1e-5))


def test_many_bits_are_nearly_lossless():
  vector = jnp.asarray(_spiky_vector(), jnp.float32)
  value_range = float(vector.max() - vector.min())
  for num_bits, tolerance in ((32, 1e-6), (16, 1.0 / (2**16 - 1))):
    decoded, _, _ = compression.stochastic_quantization(num_bits).compress(
        vector, (), jax.random.key(3))
    assert float(jnp.max(jnp.abs(decoded - vector))) <= tolerance * value_range


def test_bit_counts_by_hand():
  tree = {"a": jnp.ones([3, 4]), "b": jnp.arange(5.0)}  # d = 17
  q = compression.stochastic_quantization
  expected = {
      q(4): 12 * 4 + 64 + 5 * 4 + 64,                # 196
      q(4, per_leaf=False): 17 * 4 + 64,             # 132
      q(4, "hadamard"): 16 * 4 + 64 + 8 * 4 + 64,    # 224: 12->16, 5->8
      q(4, "hadamard", per_leaf=False): 32 * 4 + 64,  # 192: 17 -> 32
      compression.top_k(k=3): 3 * (32 + 5),          # ceil(log2 17) = 5
      compression.top_k(fraction=0.2, error_feedback=False): 3 * 37,
      compression.identity(): 17 * 32,
  }
  for compressor, bits in expected.items():
    state = compressor.init(tree)
    _, _, counted = jax.jit(compressor.compress)(tree, state,
                                                 jax.random.key(0))
    assert float(counted) == bits, compressor.name
  assert [compression.index_bits(s) for s in (1, 2, 3, 4, 17, 1024)] == [
      0, 1, 2, 2, 5, 10]


# --------------------------------------------------- top-k, error feedback


def test_top_k_keeps_exactly_the_k_largest_magnitudes():
  rng = np.random.default_rng(4)
  tree = {"w": jnp.asarray(rng.normal(size=[10, 7]), jnp.float32),
          "b": jnp.asarray(rng.normal(size=[9]), jnp.float32)}
  flat = np.concatenate([np.asarray(tree["b"]), np.asarray(tree["w"]).ravel()])
  for compressor, k in ((compression.top_k(k=8, error_feedback=False), 8),
                        (compression.top_k(fraction=0.1,
                                           error_feedback=False), 8)):
    decoded, _, _ = compressor.compress(tree, (), RNG)
    out = np.concatenate([np.asarray(decoded["b"]),
                          np.asarray(decoded["w"]).ravel()])
    kept = out != 0
    assert kept.sum() == k
    np.testing.assert_array_equal(out[kept], flat[kept])
    assert np.abs(flat[kept]).min() > np.abs(flat[~kept]).max()


@pytest.mark.parametrize("compressor", [
    compression.top_k(k=3),
    compression.with_error_feedback(compression.stochastic_quantization(1)),
], ids=lambda c: c.name)
def test_error_feedback_preserves_the_sum(compressor):
  rng = np.random.default_rng(5)
  shapes = {"w": (4, 5), "b": (3,)}
  raw = [{k: jnp.asarray(rng.normal(size=s), jnp.float32)
          for k, s in shapes.items()} for _ in range(6)]
  state = compressor.init(raw[0])
  sent_sum = jax.tree.map(jnp.zeros_like, raw[0])
  for r, delta in enumerate(raw):
    sent, state, _ = compressor.compress(delta, state, jax.random.key(r))
    sent_sum = jax.tree.map(jnp.add, sent_sum, sent)
  residual = state[0]
  assert float(global_norm(residual)) > 0.5
  raw_sum = jax.tree.map(lambda *d: sum(d), *raw)
  for k in shapes:
    np.testing.assert_allclose(sent_sum[k] + residual[k], raw_sum[k],
                               atol=2e-5)
  # Without memory the dropped mass is lost.
  plain = compression.top_k(k=3, error_feedback=False)
  plain_sum = sum(float(jnp.sum(plain.compress(d, (), RNG)[0]["w"]))
                  for d in raw)
  assert abs(plain_sum - float(jnp.sum(raw_sum["w"]))) > 0.1


def test_invalid_arguments():
  with pytest.raises(ValueError, match="num_bits"):
    compression.stochastic_quantization(0)
  with pytest.raises(ValueError, match="num_bits"):
    compression.stochastic_quantization(33)
  with pytest.raises(ValueError, match="rotation"):
    compression.stochastic_quantization(4, rotation="dct")
  with pytest.raises(ValueError, match="exactly one"):
    compression.top_k()
  with pytest.raises(ValueError, match="exactly one"):
    compression.top_k(fraction=0.1, k=3)
  with pytest.raises(ValueError, match="fraction"):
    compression.top_k(fraction=1.5)
  with pytest.raises(ValueError, match="clip_norm"):
    clipping.clip(0.0)


# ------------------------------------------------------- through the engine


def _round(algorithm, params, cohort, client_states=None, strategy=Strategy(),
           state=None):
  if client_states is None:
    population = int(np.max(cohort["client_indices"])) + 1
    client_states = round_lib.gather_client_states(
        _stacked_states(algorithm, params, population),
        cohort["client_indices"])
  fn = round_lib.build_round(algorithm, strategy, donate=False)
  return fn(state or algorithm.server_init(params), cohort, client_states,
            RNG)


def _stacked_states(algorithm, params, population):
  return jax.tree.map(lambda a: np.zeros((population,) + a.shape, np.float32),
                      algorithm.client_state_init(params))


def _compressed(factory, compressor, *links_after, pre_clip_norm=None,
                **kwargs):
  """``factory(..., aggregator=chain([clip,] compress, *links_after))`` with
  paired client states (weighted mean when no link follows)."""
  links = [compression.compress(compressor)] + list(
      links_after or [base.weighted_mean()])
  if pre_clip_norm is not None:
    links.insert(0, clipping.clip(pre_clip_norm))
  return base.pair_client_states(factory(aggregator=base.chain(*links),
                                         **kwargs))


def test_delta_template_of_scaffold_is_its_pair(deterministic_model):
  params = deterministic_model.init(jax.random.key(0))
  alg = _compressed(functools.partial(
      scaffold.scaffold, deterministic_model, 0.1, optax.sgd(1.0),
      num_clients=3), compression.top_k(k=2))
  control, ((residual, ()), ()) = alg.client_state_init(params)
  # SCAFFOLD's delta is the (model delta, control delta) pair.
  assert jax.tree.structure(residual) == jax.tree.structure((params, params))
  assert jax.tree.structure(control) == jax.tree.structure(params)


def test_names():
  names = [c.name for c in (compression.stochastic_quantization(8),
                            compression.stochastic_quantization(2, "hadamard"),
                            compression.top_k(fraction=0.01))]
  assert names == ["q8", "q2-hadamard", "topk0.01-ef"]


def test_identity_and_32_bit_quantization_match_fedavg(deterministic_model):
  params = deterministic_model.init(jax.random.key(0))
  cohort = build_cohort(make_clients(6, seed=1), [0, 2, 3, 5], batch_size=4,
                        pad_clients=1, extra_steps=1)
  avg = functools.partial(fedavg.fedavg, deterministic_model, optax.sgd(0.1))
  ref, _, ref_metrics = _round(avg(), params, cohort, jnp.zeros([5]))
  same, _, metrics = _round(_compressed(avg, compression.identity()),
                            params, cohort)
  for a, b in zip(jax.tree.leaves(same.params), jax.tree.leaves(ref.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert metrics["train_loss"] == ref_metrics["train_loss"]
  d = sum(np.size(p) for p in jax.tree.leaves(params))
  assert float(metrics["bits_uploaded"]) == 32 * d  # padded client excluded
  assert float(metrics["compression_error_norm"]) == 0.0

  close, _, metrics = _round(_compressed(
      avg, compression.stochastic_quantization(32)), params, cohort)
  step = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in
          zip(jax.tree.leaves(ref.params), jax.tree.leaves(params))]
  for a, b in zip(jax.tree.leaves(close.params), jax.tree.leaves(ref.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                               atol=1e-6 * max(step))
  assert float(metrics["compression_relative_error"]) < 1e-6
  leaves = jax.tree.leaves(params)
  assert float(metrics["bits_uploaded"]) == sum(32 * np.size(p) + 64
                                                for p in leaves)


@pytest.mark.parametrize("step_loop", ["scan", "host"])
def test_only_sampled_clients_residuals_change(deterministic_model,
                                               step_loop):
  """Error-feedback residuals are per-client state: they survive rounds, and
  neither unsampled nor padding clients' rows change."""
  population = 6
  params = deterministic_model.init(jax.random.key(1))
  clients = make_clients(population, seed=3)
  alg = _compressed(functools.partial(fedavg.fedavg, deterministic_model,
                                      optax.sgd(0.1)),
                    compression.top_k(fraction=0.1))
  states = _stacked_states(alg, params, population)
  assert isinstance(states, base.ClientStates)
  state = alg.server_init(params)
  rounds = ((Strategy("vmap", step_loop), [0, 2, 4]),
            (Strategy("chunked" if step_loop == "scan" else "vmap",
                      step_loop, 2), [2, 3]))
  for strategy, indices in rounds:
    cohort = build_cohort(clients, indices, 4, pad_clients=1)
    gathered = round_lib.gather_client_states(states,
                                              cohort["client_indices"])
    state, new_states, _ = _round(alg, params, cohort, gathered, strategy,
                                  state)
    before = states
    states = round_lib.scatter_client_states(states, cohort["client_indices"],
                                             new_states)
    for k in range(population):
      source = (jax.tree.map(lambda a: a[indices.index(k)], new_states)
                if k in indices else jax.tree.map(lambda a: a[k], before))
      for a, b in zip(jax.tree.leaves(jax.tree.map(lambda a: a[k], states)),
                      jax.tree.leaves(source)):
        np.testing.assert_array_equal(a, b)
  for k in range(population):
    touched = any(np.any(a[k]) for a in jax.tree.leaves(states))
    assert touched == (k in (0, 2, 3, 4))


def test_residual_carries_into_the_next_round(deterministic_model):
  """What a client did not send in round 1 is added to its round-2 update:
  sent_1 + sent_2 + residual_2 == delta_1 + delta_2 (one client)."""
  params = deterministic_model.init(jax.random.key(4))
  cohort = build_cohort(make_clients(1, seed=7, min_size=8, max_size=8), [0],
                        batch_size=4)
  factory = functools.partial(fedavg.fedavg, deterministic_model,
                              optax.sgd(0.5))
  alg = _compressed(factory, compression.top_k(k=3))
  states = _stacked_states(alg, params, 1)
  sent_total = jax.tree.map(jnp.zeros_like, params)
  raw_total = jax.tree.map(jnp.zeros_like, params)
  state = alg.server_init(params)
  for _ in range(2):
    ref, _, _ = _round(factory(), state.params, cohort, jnp.zeros([1]))
    raw_total = jax.tree.map(lambda t, a, b: t + a - b, raw_total,
                             ref.params, state.params)
    start = state.params
    state, states, _ = _round(alg, params, cohort, states, state=state)
    sent_total = jax.tree.map(lambda t, a, b: t + a - b, sent_total,
                              state.params, start)
  residual = jax.tree.map(lambda a: a[0], states.aggregation[0][0])
  for s, r, raw in zip(jax.tree.leaves(sent_total), jax.tree.leaves(residual),
                       jax.tree.leaves(raw_total)):
    np.testing.assert_allclose(s + r, raw, rtol=1e-5, atol=1e-6)


def test_pre_clip_then_error_feedback_on_clipped_update(deterministic_model):
  """One client: step sent + residual kept == the clipped FedAvg step."""
  params = deterministic_model.init(jax.random.key(2))
  cohort = build_cohort(make_clients(1, seed=4, min_size=12, max_size=12),
                        [0], batch_size=4)
  avg = functools.partial(fedavg.fedavg, deterministic_model, optax.sgd(0.5))
  ref, _, _ = _round(avg(), params, cohort, jnp.zeros([1]))
  full_step = jax.tree.map(jnp.subtract, ref.params, params)
  clip_norm = 0.5 * float(global_norm(full_step))
  alg = _compressed(avg, compression.top_k(k=4), pre_clip_norm=clip_norm)
  state, new_states, metrics = _round(alg, params, cohort)
  sent = jax.tree.map(jnp.subtract, state.params, params)
  # chain (clip, compress, mean): the compress link's (residual, ()).
  residual = jax.tree.map(lambda a: a[0], new_states.aggregation[1][0])
  clipped = jax.tree.map(lambda s: s * 0.5, full_step)
  for a, b, c in zip(jax.tree.leaves(sent), jax.tree.leaves(residual),
                     jax.tree.leaves(clipped)):
    np.testing.assert_allclose(a + b, c, rtol=1e-5, atol=1e-6)
  assert sum(int(np.sum(np.asarray(a) != 0)) for a in
             jax.tree.leaves(sent)) == 4
  np.testing.assert_allclose(float(metrics["compression_error_norm"]),
                             float(global_norm(residual)), rtol=1e-5)


def test_composes_with_central_dp_aggregator(deterministic_model):
  """Quantization lengthens the pre-clipped update; the DP aggregator clips
  the decoded update again (the sum it noises has norm <= m C), and the noise
  on the sum is the uncompressed mechanism's z C (so is the accounting)."""
  params = deterministic_model.init(jax.random.key(3))
  cohort = build_cohort(make_clients(5, seed=6), [0, 1, 2, 4], batch_size=3,
                        pad_clients=1)
  clip_norm, noise_multiplier, expected_cohort = 0.02, 1.0, 5.0
  alg = _compressed(
      functools.partial(fedavg.fedavg, deterministic_model, optax.sgd(0.1),
                        weighting="uniform"),
      compression.stochastic_quantization(1, "hadamard"),
      aggregators.gaussian_sum(clip_norm, noise_multiplier, expected_cohort),
      pre_clip_norm=clip_norm)
  state, _, metrics = _round(alg, params, cohort)
  assert float(metrics["update_norm"]) > clip_norm * 1.05  # decoded, > C
  assert float(metrics["fraction_clipped"]) == 1.0
  assert float(metrics["clipped_sum_norm"]) <= 4 * clip_norm * (1 + 1e-5)
  assert float(metrics["compression_relative_error"]) > 0.05
  assert float(metrics["dp_noise_std"]) == pytest.approx(
      noise_multiplier * clip_norm)
  step = jax.tree.map(jnp.subtract, state.params, params)
  noise_norm = noise_multiplier * clip_norm / expected_cohort * np.sqrt(27)
  assert float(global_norm(step)) > 0.5 * noise_norm  # the noise was added
  assert float(metrics["params_finite"]) == 1.0
