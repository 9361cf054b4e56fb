"""Tests for fedjax_lab.privacy.tree_noise (the tree mechanism's node noise,
prefix sums and increments).

The statistical checks use fixed seeds (so they cannot flake) and many i.i.d.
coordinates; tolerances are 6 standard errors of the estimator, far below the
gap a wrong number of tree nodes (a 1-node change in popcount) would make.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.privacy import tree
from fedjax_lab.privacy import tree_noise

NUM_COORDS = 40_000
SIGMA = 0.7


def _popcount(t):
  return bin(t).count("1")


def _node(key, level, index, shape, leaf=0, noise_std=SIGMA):
  """Noise of tree node ``(level, index)`` for leaf ``leaf``, as documented."""
  node_key = jax.random.fold_in(jax.random.fold_in(key, level), index)
  return noise_std * jax.random.normal(jax.random.fold_in(node_key, leaf),
                                       shape, jnp.float32)


def _assert_variance(sample, variance, num_se=6.0):
  """Sample variance within ``num_se`` standard errors of ``variance``."""
  sample = np.asarray(sample, np.float64).ravel()
  n = sample.size
  assert abs(sample.mean()) < num_se * math.sqrt(variance / n), sample.mean()
  se = variance * math.sqrt(2.0 / (n - 1))
  assert abs(sample.var(ddof=1) - variance) < num_se * se, (
      sample.var(ddof=1), variance)


def _assert_uncorrelated(a, b, num_se=6.0):
  a = np.asarray(a, np.float64).ravel()
  b = np.asarray(b, np.float64).ravel()
  corr = np.corrcoef(a, b)[0, 1]
  assert abs(corr) < num_se / math.sqrt(a.size), corr


def test_tree_module_reexports_the_noise_functions():
  for name in ("tree_depth", "tree_noise_key", "prefix_noise",
               "prefix_noise_increment", "prefix_noise_std"):
    assert getattr(tree, name) is getattr(tree_noise, name)


# ------------------------------------------------------------- prefix noise


def test_tree_depth():
  assert [tree_noise.tree_depth(n) for n in (1, 2, 3, 4, 7, 8, 100, 1024)] == [
      1, 2, 2, 3, 3, 4, 7, 11]
  with pytest.raises(ValueError, match="max_steps must be >= 1"):
    tree_noise.tree_depth(0)
  with pytest.raises(TypeError, match="max_steps must be an integer"):
    tree_noise.tree_depth(4.0)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 8, 13])
def test_prefix_noise_variance_is_popcount_times_sigma_squared(step):
  key = jax.random.key(1)
  template = {"a": jnp.zeros([NUM_COORDS]), "b": jnp.zeros([100, 200])}
  noise = tree_noise.prefix_noise(key, step, template, SIGMA, num_levels=4)
  assert jax.tree.structure(noise) == jax.tree.structure(template)
  variance = _popcount(step) * SIGMA**2
  _assert_variance(noise["a"], variance)
  _assert_variance(noise["b"], variance)
  assert noise["b"].shape == (100, 200) and noise["b"].dtype == jnp.float32
  # Different leaves get different (uncorrelated) draws.
  _assert_uncorrelated(noise["a"][:20_000], noise["b"].ravel())
  assert tree_noise.prefix_noise_std(step, SIGMA) == pytest.approx(
      math.sqrt(variance))


def test_prefix_noise_is_sum_of_documented_nodes():
  key = jax.random.key(5)
  shape = (1000,)
  noise = tree_noise.prefix_noise(key, 13, jnp.zeros(shape), SIGMA, num_levels=4)
  # 13 = 0b1101: nodes (0, 13), (2, 3), (3, 1).
  expected = (_node(key, 0, 13, shape) + _node(key, 2, 3, shape)
              + _node(key, 3, 1, shape))
  np.testing.assert_allclose(noise, expected, rtol=1e-6, atol=1e-6)


def test_shared_nodes_are_identical():
  key = jax.random.key(2)
  template = jnp.zeros([NUM_COORDS])

  def noise(t):
    return tree_noise.prefix_noise(key, t, template, SIGMA, num_levels=3)

  n4, n5, n6, n7 = noise(4), noise(5), noise(6), noise(7)
  # 6 = 4 + 2: S_6's noise is S_4's node plus the level-1 node (1, 3).
  only_level_1 = n6 - n4
  np.testing.assert_allclose(only_level_1, _node(key, 1, 3, (NUM_COORDS,)),
                             atol=1e-5)
  _assert_variance(only_level_1, SIGMA**2)
  _assert_uncorrelated(only_level_1, n4)
  # 7 = 6 + 1 and 5 = 4 + 1 add level-0 nodes of their own.
  np.testing.assert_allclose(n7 - n6, _node(key, 0, 7, (NUM_COORDS,)),
                             atol=1e-5)
  np.testing.assert_allclose(n5 - n4, _node(key, 0, 5, (NUM_COORDS,)),
                             atol=1e-5)
  _assert_uncorrelated(n7 - n6, n5 - n4)


@pytest.mark.parametrize("s, t, shared", [
    (4, 6, 1), (6, 7, 2), (5, 7, 1), (3, 4, 0), (8, 15, 1), (12, 13, 2),
    (9, 10, 1), (1, 2, 0),
])
def test_prefix_noise_covariance_counts_shared_nodes(s, t, shared):
  key = jax.random.key(3)
  template = jnp.zeros([NUM_COORDS])
  a = np.asarray(tree_noise.prefix_noise(key, s, template, SIGMA, 4), np.float64)
  b = np.asarray(tree_noise.prefix_noise(key, t, template, SIGMA, 4), np.float64)
  covariance = np.mean(a * b)
  # Var(a * b) <= E[a^2 b^2]; bound it by the fourth moments of Gaussians.
  se = SIGMA**2 * math.sqrt(3 * _popcount(s) * _popcount(t) / NUM_COORDS)
  assert abs(covariance - shared * SIGMA**2) < 6 * se, covariance


def test_prefix_noise_step_zero_and_zero_std():
  key = jax.random.key(0)
  template = {"w": jnp.ones([10])}
  np.testing.assert_array_equal(
      tree_noise.prefix_noise(key, 0, template, SIGMA, 4)["w"], np.zeros(10))
  np.testing.assert_array_equal(
      tree_noise.prefix_noise(key, 7, template, 0.0, 4)["w"], np.zeros(10))
  assert tree_noise.prefix_noise_std(0, SIGMA) == 0.0


def test_prefix_noise_under_jit_with_traced_step_and_std():
  key = jax.random.key(9)
  template = {"w": jax.ShapeDtypeStruct((50,), jnp.float32),
              "v": jnp.zeros((2, 3), jnp.bfloat16)}
  jitted = jax.jit(lambda k, t, std: tree_noise.prefix_noise(k, t, template, std,
                                                       num_levels=4))
  for step in (1, 6, 11, 15):
    eager = tree_noise.prefix_noise(key, step, template, SIGMA, num_levels=4)
    traced = jitted(key, jnp.int32(step), jnp.float32(SIGMA))
    np.testing.assert_allclose(traced["w"], eager["w"], rtol=1e-5,
                               atol=1e-6)
    assert traced["v"].dtype == jnp.bfloat16
  with pytest.raises(TypeError, match="floating-point"):
    tree_noise.prefix_noise(key, 1, jnp.zeros(3, jnp.int32), SIGMA, 2)


def test_prefix_noise_std_values():
  assert tree_noise.prefix_noise_std(1, 2.0) == 2.0
  assert tree_noise.prefix_noise_std(7, 2.0) == pytest.approx(2.0 * math.sqrt(3))
  assert tree_noise.prefix_noise_std(8, 2.0) == 2.0
  with pytest.raises(ValueError, match="step must be >= 0"):
    tree_noise.prefix_noise_std(-1, 1.0)


# ---------------------------------------------------- prefix noise increment


@pytest.mark.parametrize("num_levels", [0, 1, 3, 4, 6])
def test_prefix_noise_increment_is_difference_of_prefixes(num_levels):
  """N_t - N_{t-1}, also past the tree's depth (high bits are ignored)."""
  key = jax.random.key(12)
  template = {"w": jnp.zeros([300]), "v": jnp.zeros([2, 5])}
  for step in range(0, 70):
    increment = tree_noise.prefix_noise_increment(key, step, template, SIGMA,
                                            num_levels)
    assert jax.tree.structure(increment) == jax.tree.structure(template)
    if step == 0:
      expected = jax.tree.map(jnp.zeros_like, template)
    else:
      expected = jax.tree.map(
          jnp.subtract,
          tree_noise.prefix_noise(key, step, template, SIGMA, num_levels),
          tree_noise.prefix_noise(key, step - 1, template, SIGMA, num_levels))
    for name in ("w", "v"):
      np.testing.assert_allclose(increment[name], expected[name], rtol=0,
                                 atol=1e-5, err_msg=f"step {step}")


def test_prefix_noise_increment_uses_documented_nodes():
  key = jax.random.key(13)
  shape = (1000,)
  # 12 = 0b1100, 11 = 0b1011: level 3 node (3, 1) is shared; 12 adds
  # (2, 3), 11 has (0, 11) and (1, 5).
  increment = tree_noise.prefix_noise_increment(key, 12, jnp.zeros(shape), SIGMA,
                                          num_levels=4)
  expected = (_node(key, 2, 3, shape) - _node(key, 0, 11, shape)
              - _node(key, 1, 5, shape))
  np.testing.assert_allclose(increment, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
      tree_noise.prefix_noise_increment(key, 1, jnp.zeros(shape), SIGMA, 4),
      tree_noise.prefix_noise(key, 1, jnp.zeros(shape), SIGMA, 4))


def test_prefix_noise_increment_under_jit_with_traced_step_and_std():
  key = jax.random.key(14)
  template = {"w": jax.ShapeDtypeStruct((50,), jnp.float32),
              "v": jnp.zeros((2, 3), jnp.bfloat16)}
  jitted = jax.jit(lambda k, t, std: tree_noise.prefix_noise_increment(
      k, t, template, std, num_levels=4))
  for step in (1, 4, 6, 11, 16):
    eager = tree_noise.prefix_noise_increment(key, step, template, SIGMA, 4)
    traced = jitted(key, jnp.int32(step), jnp.float32(SIGMA))
    np.testing.assert_allclose(traced["w"], eager["w"], rtol=1e-5,
                               atol=1e-6)
    assert traced["v"].dtype == jnp.bfloat16
  with pytest.raises(TypeError, match="floating-point"):
    tree_noise.prefix_noise_increment(key, 1, jnp.zeros(3, jnp.int32), SIGMA, 2)
