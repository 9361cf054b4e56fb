"""Tests for fedjax_lab.privacy.tree's DP-FTRL server optimizer.

The node noise is tested in ``test_tree_noise.py``; the aggregator form,
:func:`tree.tree_aggregator`, in ``test_tree_aggregator.py``.

The statistical checks use fixed seeds (so they cannot flake) and many i.i.d.
coordinates; tolerances are 6 standard errors of the estimator, far below the
gap a wrong number of tree nodes (a 1-node change in popcount) would make.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.privacy import tree
from fedjax_lab.privacy import tree_noise

NUM_COORDS = 40_000
SIGMA = 0.7


def _popcount(t):
  return bin(t).count("1")


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


def _grads(seed, num_steps, shape=(NUM_COORDS,)):
  """Deterministic, non-trivial pseudo-gradients (a dict pytree)."""
  rng = np.random.default_rng(seed)
  return [{"w": jnp.asarray(rng.normal(0.3, 1.0, shape), jnp.float32),
           "b": jnp.asarray(rng.normal(-0.1, 0.5, (3,)), jnp.float32)}
          for _ in range(num_steps)]


def _run(optimizer, params, grads):
  """Applies ``optimizer`` over ``grads``; params and states after each step."""
  state = optimizer.init(params)
  params_seq, states = [], []
  for g in grads:
    updates, state = optimizer.update(g, state, params)
    params = optax.apply_updates(params, updates)
    params_seq.append(params)
    states.append(state)
  return params_seq, states


# ------------------------------------------------------------------ dp_ftrl


@pytest.mark.parametrize("steps_per_tree", [1, 3, 4, 100])
def test_noiseless_dp_ftrl_is_sgd(steps_per_tree):
  grads = _grads(0, 10, shape=(64,))
  params = {"w": jnp.linspace(-1, 1, 64), "b": jnp.zeros(3)}
  ours, _ = _run(tree.dp_ftrl(0.3, 0.0, steps_per_tree), params, grads)
  reference, _ = _run(optax.sgd(0.3), params, grads)
  for mine, theirs in zip(ours, reference):
    for name in ("w", "b"):
      np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-5,
                                 atol=1e-5)


@pytest.mark.parametrize("steps_per_tree", [2, 5, 100])
def test_noiseless_dp_ftrl_momentum_is_heavy_ball_sgd(steps_per_tree):
  """Momentum carries over tree restarts, exactly like optax's trace."""
  grads = _grads(1, 12, shape=(64,))
  params = {"w": jnp.linspace(-1, 1, 64), "b": jnp.ones(3)}
  ours, _ = _run(tree.dp_ftrl(0.1, 0.0, steps_per_tree, momentum=0.9),
                 params, grads)
  reference, _ = _run(optax.sgd(0.1, momentum=0.9, nesterov=False), params,
                      grads)
  for mine, theirs in zip(ours, reference):
    for name in ("w", "b"):
      np.testing.assert_allclose(mine[name], theirs[name], rtol=1e-5,
                                 atol=1e-5)


def test_dp_ftrl_jit_with_donated_state_matches_eager():
  optimizer = tree.dp_ftrl(0.2, SIGMA, steps_per_tree=3, momentum=0.5,
                           noise_key=jax.random.key(7))
  grads = _grads(2, 7, shape=(32,))
  params0 = {"w": jnp.zeros(32), "b": jnp.zeros(3)}

  def step(params, state, g):
    updates, state = optimizer.update(g, state, params)
    return optax.apply_updates(params, updates), state

  donated = jax.jit(step, donate_argnums=(0, 1))
  eager_params, eager_states = _run(optimizer, params0, grads)
  params = jax.tree.map(jnp.copy, params0)
  state = optimizer.init(params)
  assert isinstance(state, tree.DPFTRLState)
  with warnings.catch_warnings():
    # Backends without donation support only warn.
    warnings.filterwarnings("ignore", message=".*donat.*")
    for t, g in enumerate(grads):
      params, state = donated(params, state, g)
      np.testing.assert_allclose(params["w"], eager_params[t]["w"],
                                 rtol=1e-5, atol=1e-6)
      assert int(state.step_in_tree) == int(eager_states[t].step_in_tree)
      assert int(state.tree_index) == int(eager_states[t].tree_index)
  assert state.step_in_tree.dtype == jnp.int32
  assert state.tree_index.dtype == jnp.int32


def test_dp_ftrl_params_are_ftrl_form_within_a_tree():
  """params_t = params_0 - lr * (S_t + prefix_noise(t)) for every step t."""
  lr, noise_key, steps = 0.05, jax.random.key(11), 13
  grads = _grads(3, steps, shape=(500,))
  params0 = {"w": jnp.linspace(0, 1, 500), "b": jnp.zeros(3)}
  optimizer = tree.dp_ftrl(lr, SIGMA, steps_per_tree=16, noise_key=noise_key)
  params_seq, states = _run(optimizer, params0, grads)
  key = tree_noise.tree_noise_key(noise_key, 0)
  exact = jax.tree.map(jnp.zeros_like, params0)
  for t in range(1, steps + 1):
    exact = jax.tree.map(jnp.add, exact, grads[t - 1])
    noise = tree_noise.prefix_noise(key, t, exact, SIGMA, tree_noise.tree_depth(16))
    for name in ("w", "b"):
      expected = params0[name] - lr * (exact[name] + noise[name])
      np.testing.assert_allclose(params_seq[t - 1][name], expected,
                                 rtol=1e-5, atol=1e-5)
    state = states[t - 1]
    assert int(state.step_in_tree) == t and int(state.tree_index) == 0


def test_dp_ftrl_state_holds_no_exact_sum_and_no_key():
  """Server states get published: only step, tree index and momentum."""
  assert tree.DPFTRLState._fields == ("step_in_tree", "tree_index",
                                      "momentum_buffer")
  grads = _grads(9, 3, shape=(200,))
  params0 = {"w": jnp.zeros(200), "b": jnp.zeros(3)}
  optimizer = tree.dp_ftrl(1.0, SIGMA, steps_per_tree=8,
                           noise_key=jax.random.key(3))
  _, states = _run(optimizer, params0, grads)
  exact = jax.tree.map(lambda *g: sum(g), *grads)
  for leaf in jax.tree.leaves(states[-1]):
    assert not jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)
    if leaf.shape == (200,):
      assert not np.allclose(leaf, exact["w"], atol=0.1)
      assert not np.allclose(leaf, grads[-1]["w"], atol=0.1)


def test_gradient_noise_telescopes_to_prefix_noise():
  """Sum over a tree of (noisy - true) gradients is the noise of S_T."""
  lr, noise_key, steps = 1.0, jax.random.key(4), 11
  grads = _grads(4, steps)
  optimizer = tree.dp_ftrl(lr, SIGMA, steps_per_tree=steps,
                           noise_key=noise_key)
  params = {"w": jnp.zeros(NUM_COORDS), "b": jnp.zeros(3)}
  state = optimizer.init(params)
  noise_sum = np.zeros(NUM_COORDS)
  for g in grads:
    updates, state = optimizer.update(g, state, params)
    noisy_grad = -np.asarray(updates["w"], np.float64) / lr
    noise_sum += noisy_grad - np.asarray(g["w"], np.float64)
  # Leaves are noised in pytree order, so the template is the params pytree.
  final_noise = tree_noise.prefix_noise(tree_noise.tree_noise_key(noise_key, 0), steps,
                                  params, SIGMA, tree_noise.tree_depth(steps))["w"]
  np.testing.assert_allclose(noise_sum, final_noise, atol=1e-4)
  _assert_variance(noise_sum, _popcount(steps) * SIGMA**2)


def test_dp_ftrl_restarts_tree_with_fresh_noise():
  lr, noise_key, per_tree = 1.0, jax.random.key(21), 4
  grads = _grads(5, 2 * per_tree + 1)
  params0 = {"w": jnp.zeros(NUM_COORDS), "b": jnp.zeros(3)}
  optimizer = tree.dp_ftrl(lr, SIGMA, steps_per_tree=per_tree,
                           noise_key=noise_key)
  params_seq, states = _run(optimizer, params0, grads)
  assert [int(s.step_in_tree) for s in states] == [1, 2, 3, 4, 1, 2, 3, 4, 1]
  assert [int(s.tree_index) for s in states] == [0, 0, 0, 0, 1, 1, 1, 1, 2]
  levels = tree_noise.tree_depth(per_tree)
  params_before = [params0] + params_seq

  def noise_w(key, t):
    return tree_noise.prefix_noise(key, t, params0, SIGMA, levels)["w"]

  def released_noise(position):
    """Noise on the gradient the update at 0-based ``position`` used."""
    noisy_grad = (params_before[position]["w"]
                  - params_before[position + 1]["w"]) / lr
    return np.asarray(noisy_grad - grads[position]["w"])

  for tree_index in (1, 2):
    first = per_tree * tree_index  # 0-based position of the tree's step 1.
    # Step 1 of the new tree: its own N_1, nothing of the old tree's
    # N_{per_tree} subtracted (params continue from the previous tree's end).
    new_noise = released_noise(first)
    expected = noise_w(tree_noise.tree_noise_key(noise_key, tree_index), 1)
    np.testing.assert_allclose(new_noise, expected, atol=1e-4)
    # Fresh key: independent of every node of the previous tree.
    old_key = tree_noise.tree_noise_key(noise_key, tree_index - 1)
    for t in (1, 2, 4):
      _assert_uncorrelated(new_noise, noise_w(old_key, t))
  _assert_uncorrelated(released_noise(0), released_noise(per_tree))


def test_param_noise_variance_matches_tree_mechanism():
  """Var(params_t - noiseless params_t) = lr^2 popcount(t) sigma^2."""
  lr, steps = 0.3, 15
  grads = _grads(6, steps)
  params0 = {"w": jnp.zeros(NUM_COORDS), "b": jnp.zeros(3)}
  noisy, _ = _run(tree.dp_ftrl(lr, SIGMA, steps_per_tree=16,
                               noise_key=jax.random.key(8)), params0, grads)
  clean, _ = _run(tree.dp_ftrl(lr, 0.0, steps_per_tree=16), params0, grads)
  for t in range(1, steps + 1):
    deviation = noisy[t - 1]["w"] - clean[t - 1]["w"]
    _assert_variance(deviation, lr**2 * _popcount(t) * SIGMA**2)
    assert lr * tree_noise.prefix_noise_std(t, SIGMA) == pytest.approx(
        math.sqrt(lr**2 * _popcount(t) * SIGMA**2))


def test_dp_ftrl_different_keys_differ_and_same_key_repeats():
  grads = _grads(7, 3, shape=(100,))
  params0 = {"w": jnp.zeros(100), "b": jnp.zeros(3)}
  key_a, key_c = jax.random.key(1), jax.random.key(2)
  a, _ = _run(tree.dp_ftrl(0.1, SIGMA, 4, noise_key=key_a), params0, grads)
  b, _ = _run(tree.dp_ftrl(0.1, SIGMA, 4, noise_key=jax.random.key(1)),
              params0, grads)
  c, _ = _run(tree.dp_ftrl(0.1, SIGMA, 4, noise_key=key_c), params0, grads)
  np.testing.assert_array_equal(a[-1]["w"], b[-1]["w"])
  assert not np.allclose(a[-1]["w"], c[-1]["w"])


def test_dp_ftrl_low_precision_params_keep_float32_sums():
  params = {"w": jnp.zeros(8, jnp.bfloat16)}
  optimizer = tree.dp_ftrl(0.1, SIGMA, 4, noise_key=jax.random.key(0))
  state = optimizer.init(params)
  assert state.momentum_buffer["w"].dtype == jnp.float32
  updates, state = optimizer.update({"w": jnp.ones(8, jnp.bfloat16)}, state,
                                    params)
  assert updates["w"].dtype == jnp.bfloat16
  assert state.momentum_buffer["w"].dtype == jnp.float32


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(learning_rate=0.0), ValueError, "learning_rate"),
    (dict(noise_std=-1.0), ValueError, "noise_std"),
    (dict(noise_std=float("nan")), ValueError, "noise_std"),
    (dict(steps_per_tree=0), ValueError, "steps_per_tree must be >= 1"),
    (dict(steps_per_tree=2.0), TypeError, "steps_per_tree must be an integer"),
    (dict(momentum=1.0), ValueError, "momentum"),
    (dict(momentum=-0.1), ValueError, "momentum"),
    (dict(noise_key=None), ValueError, "needs noise_key"),
    (dict(noise_key=7), TypeError, "noise_key must be one JAX PRNG key"),
    (dict(noise_key=jnp.zeros(2, jnp.int32)), TypeError, "PRNG key"),
    (dict(noise_key=jax.random.split(jax.random.key(0))), TypeError,
     "PRNG key"),
])
def test_dp_ftrl_rejects_bad_arguments(kwargs, error, message):
  arguments = dict(learning_rate=0.1, noise_std=1.0, steps_per_tree=4,
                   noise_key=jax.random.key(0))
  arguments.update(kwargs)
  with pytest.raises(error, match=message):
    tree.dp_ftrl(**arguments)


def test_dp_ftrl_noiseless_needs_no_key_and_accepts_raw_keys():
  tree.dp_ftrl(0.1, 0.0, 4)
  grads = _grads(10, 2, shape=(20,))
  params0 = {"w": jnp.zeros(20), "b": jnp.zeros(3)}
  typed, _ = _run(tree.dp_ftrl(0.1, SIGMA, 4, noise_key=jax.random.key(5)),
                  params0, grads)
  raw, _ = _run(tree.dp_ftrl(0.1, SIGMA, 4, noise_key=jax.random.PRNGKey(5)),
                params0, grads)
  np.testing.assert_array_equal(typed[-1]["w"], raw[-1]["w"])
