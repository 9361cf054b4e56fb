"""Tests for fedjax_lab.privacy.tree.tree_aggregator (DP-FTRL as an aggregator).

Kairouz et al. 2021: the aggregator returns ``ĝ_t = g_t + N_t - N_{t-1}``,
so ``optax.sgd`` on it is DP-FTRL. Rounds are simulated the way the engine
runs them: ``client_transform`` per client (vmapped), the masked weighted sum,
then ``finalize`` with a fresh key per round. Statistical checks use fixed
seeds and many coordinates.
"""

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.privacy import aggregators
from fedjax_lab.privacy import tree
from fedjax_lab.privacy import tree_noise

CLIP = 1.5
COHORT = 4.0
MULTIPLIER = 1.2
NODE_STD = MULTIPLIER * CLIP / COHORT


def _nodes(step):
  """The nodes ``(level, index)`` of ``step``'s binary decomposition."""
  return {(level, step >> level) for level in range(step.bit_length())
          if (step >> level) & 1}


def _cohorts(seed, num_rounds, num_clients=3, size=40):
  """Per round, a list of client deltas (dict pytrees), some over the clip."""
  rng = np.random.default_rng(seed)
  return [[{"w": jnp.asarray(rng.normal(0.0, scale, size), jnp.float32),
            "b": jnp.asarray(rng.normal(0.0, scale, 2), jnp.float32)}
           for scale in rng.choice([0.05, 0.5], num_clients)]
          for _ in range(num_rounds)]


def _clipped_mean(deltas, clip_norm=CLIP, denominator=COHORT):
  """Reference: clip every client in float64 and divide by the denominator."""
  total = {"w": 0.0, "b": 0.0}
  for delta in deltas:
    norm = math.sqrt(sum(float(np.sum(np.square(np.asarray(leaf, np.float64))))
                         for leaf in delta.values()))
    scale = min(1.0, clip_norm / norm)
    for name in total:
      total[name] = total[name] + scale * np.asarray(delta[name], np.float64)
  return {name: value / denominator for name, value in total.items()}


def _round(aggregator, deltas, state, rng, mask=None):
  """One engine-style round: ``(aggregate, state, metrics, client_metrics)``."""
  stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *deltas)
  num = len(deltas)
  mask = jnp.ones([num]) if mask is None else jnp.asarray(mask, jnp.float32)
  client_rngs = jax.random.split(jax.random.fold_in(rng, 99), num)
  clipped, weights, client_metrics = jax.vmap(
      aggregator.client_transform, in_axes=(0, 0, None, 0))(
          stacked, jnp.full([num], 7.0), state, client_rngs)
  masked = mask * weights
  weighted_sum = jax.tree.map(lambda d: jnp.tensordot(masked, d, axes=1),
                              clipped)
  aggregate, state, metrics = aggregator.finalize(
      weighted_sum, jnp.sum(masked), jnp.sum(mask), state, rng)
  return aggregate, state, metrics, client_metrics


def _round_keys(seed, num_rounds):
  base = jax.random.key(seed)
  return [jax.random.fold_in(base, r) for r in range(num_rounds)]


def _train(aggregator, optimizer, params, cohorts, keys):
  """Rounds of aggregator + server optimizer; per-round params and states."""
  agg_state = aggregator.init()
  opt_state = optimizer.init(params)
  params_seq, agg_states, aggregates, metrics_seq = [], [], [], []
  for deltas, key in zip(cohorts, keys):
    aggregate, agg_state, metrics, _ = _round(aggregator, deltas, agg_state,
                                              key)
    updates, opt_state = optimizer.update(aggregate, opt_state, params)
    params = optax.apply_updates(params, updates)
    params_seq.append(params)
    agg_states.append(agg_state)
    aggregates.append(aggregate)
    metrics_seq.append(metrics)
  return params_seq, agg_states, aggregates, metrics_seq


def _key(state):
  return jax.random.wrap_key_data(state.tree_key, impl="threefry2x32")


def _params0(size=40):
  return {"w": jnp.linspace(-1.0, 1.0, size), "b": jnp.zeros(2)}


# ------------------------------------------------------------- noiseless


@pytest.mark.parametrize("steps_per_tree", [1, 3, 100])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_noiseless_aggregator_with_sgd_is_sgd_on_clipped_means(
    steps_per_tree, momentum):
  cohorts = _cohorts(0, 8)
  params0 = _params0()
  aggregator = tree.tree_aggregator(CLIP, 0.0, COHORT, steps_per_tree)
  ours, _, aggregates, _ = _train(aggregator, optax.sgd(0.3, momentum),
                                  params0, cohorts, _round_keys(1, 8))
  means = [_clipped_mean(deltas) for deltas in cohorts]
  reference_opt = optax.sgd(0.3, momentum)
  params, opt_state = params0, reference_opt.init(params0)
  for t, mean in enumerate(means):
    np.testing.assert_allclose(aggregates[t]["w"], mean["w"], rtol=1e-5,
                               atol=1e-6)
    grads = jax.tree.map(lambda m: jnp.asarray(m, jnp.float32), mean)
    updates, opt_state = reference_opt.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    for name in ("w", "b"):
      np.testing.assert_allclose(ours[t][name], params[name], rtol=1e-5,
                                 atol=1e-5)


def test_noiseless_aggregate_is_exactly_clipped_averaging():
  """No noise is drawn at all: bit-equal to gaussian_sum without noise."""
  ours = tree.tree_aggregator(CLIP, 0.0, COHORT, 4)
  reference = aggregators.gaussian_sum(CLIP, 0.0, COHORT)
  deltas = _cohorts(2, 1)[0]
  key = jax.random.key(3)
  aggregate, _, metrics, client_metrics = _round(ours, deltas, ours.init(),
                                                 key)
  expected, _, _, expected_client = _round(reference, deltas,
                                           reference.init(), key)
  for name in ("w", "b"):
    np.testing.assert_array_equal(aggregate[name], expected[name])
  for name in ("update_norm", "fraction_clipped"):
    np.testing.assert_array_equal(client_metrics[name],
                                  expected_client[name])
  assert float(metrics["dp_noise_std"]) == 0.0
  assert float(metrics["dp_noise_std_on_mean"]) == 0.0


def test_noiseless_infinite_clip_norm_is_plain_sum_over_denominator():
  aggregator = tree.tree_aggregator(math.inf, 0.0, COHORT, 4)
  deltas = _cohorts(4, 1)[0]
  aggregate, _, _, _ = _round(aggregator, deltas, aggregator.init(),
                              jax.random.key(0))
  expected = sum(np.asarray(d["w"], np.float64) for d in deltas) / COHORT
  np.testing.assert_allclose(aggregate["w"], expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------ tree noise


def test_aggregator_with_sgd_is_ftrl_form_within_a_tree():
  """params_t = params_0 - lr (S_t + N_t), N_t from the state's tree key."""
  lr, steps, per_tree = 0.05, 13, 16
  cohorts = _cohorts(5, steps)
  params0 = _params0()
  aggregator = tree.tree_aggregator(CLIP, MULTIPLIER, COHORT, per_tree)
  params_seq, states, _, metrics_seq = _train(
      aggregator, optax.sgd(lr), params0, cohorts, _round_keys(6, steps))
  key = _key(states[0])
  exact = {"w": 0.0, "b": 0.0}
  for t in range(1, steps + 1):
    mean = _clipped_mean(cohorts[t - 1])
    exact = {name: exact[name] + mean[name] for name in exact}
    noise = tree_noise.prefix_noise(key, t, params0, NODE_STD,
                              tree_noise.tree_depth(per_tree))
    for name in ("w", "b"):
      expected = np.asarray(params0[name]) - lr * (exact[name] + noise[name])
      np.testing.assert_allclose(params_seq[t - 1][name], expected,
                                 rtol=1e-5, atol=1e-5)
    assert int(states[t - 1].step_in_tree) == t
    np.testing.assert_array_equal(states[t - 1].tree_key, states[0].tree_key)
    assert float(metrics_seq[t - 1]["tree_step"]) == t


def test_aggregator_with_momentum_is_dp_ftrlm_across_restarts():
  """Heavy-ball on ĝ_t = g_t + N_t - N_{t-1}; momentum kept over restarts."""
  lr, momentum, steps, per_tree = 0.1, 0.9, 7, 3
  cohorts = _cohorts(7, steps)
  params0 = _params0()
  aggregator = tree.tree_aggregator(CLIP, MULTIPLIER, COHORT, per_tree)
  params_seq, states, _, _ = _train(aggregator, optax.sgd(lr, momentum),
                                    params0, cohorts, _round_keys(8, steps))
  levels = tree_noise.tree_depth(per_tree)
  params = {name: np.asarray(p, np.float64) for name, p in params0.items()}
  velocity = {"w": 0.0, "b": 0.0}
  for r in range(steps):
    step = int(states[r].step_in_tree)
    key = _key(states[r])
    current = tree_noise.prefix_noise(key, step, params0, NODE_STD, levels)
    previous = tree_noise.prefix_noise(key, step - 1, params0, NODE_STD, levels)
    mean = _clipped_mean(cohorts[r])
    for name in params:
      noisy_grad = mean[name] + np.asarray(current[name] - previous[name])
      velocity[name] = momentum * velocity[name] + noisy_grad
      params[name] = params[name] - lr * velocity[name]
      np.testing.assert_allclose(params_seq[r][name], params[name],
                                 rtol=1e-5, atol=1e-5)


def test_restarts_take_a_new_key_from_that_rounds_rng():
  per_tree, steps = 3, 7
  cohorts = _cohorts(9, steps, size=20_000)
  keys = _round_keys(10, steps)
  aggregator = tree.tree_aggregator(CLIP, MULTIPLIER, COHORT, per_tree)
  _, states, aggregates, metrics_seq = _train(
      aggregator, optax.sgd(1.0), _params0(20_000), cohorts, keys)
  assert [int(s.step_in_tree) for s in states] == [1, 2, 3, 1, 2, 3, 1]
  assert [float(m["tree_step"]) for m in metrics_seq] == [1, 2, 3, 1, 2, 3, 1]
  for first in (0, 3, 6):
    expected = jax.random.key_data(jax.random.fold_in(keys[first],
                                                      tree._TREE_KEY_SALT))
    np.testing.assert_array_equal(states[first].tree_key, expected)
    # The round's key itself is not stored.
    assert not np.array_equal(states[first].tree_key,
                              jax.random.key_data(keys[first]))
    for later in range(first + 1, min(first + per_tree, steps)):
      np.testing.assert_array_equal(states[later].tree_key, expected)
  assert len({tuple(np.asarray(states[r].tree_key)) for r in (0, 3, 6)}) == 3

  # Step 1 of each tree carries only its own node (1, 1): the old tree's
  # N_{per_tree} is not subtracted.
  def noise_w(round_index):
    return np.asarray(aggregates[round_index]["w"]) - _clipped_mean(
        cohorts[round_index])["w"]

  for first in (3, 6):
    expected = tree_noise.prefix_noise(_key(states[first]), 1, _params0(20_000),
                                 NODE_STD, tree_noise.tree_depth(per_tree))["w"]
    np.testing.assert_allclose(noise_w(first), expected, atol=1e-5)
    corr = np.corrcoef(noise_w(first), noise_w(first - per_tree))[0, 1]
    assert abs(corr) < 6 / math.sqrt(20_000), corr


def test_only_the_restart_rounds_rng_sets_the_tree_key():
  aggregator = tree.tree_aggregator(CLIP, MULTIPLIER, COHORT, 3)
  cohorts = _cohorts(11, 3)
  keys = _round_keys(12, 3)
  other = [keys[0], jax.random.key(77), jax.random.key(78)]
  _, states_a, aggregates_a, _ = _train(aggregator, optax.sgd(1.0),
                                        _params0(), cohorts, keys)
  _, states_b, aggregates_b, _ = _train(aggregator, optax.sgd(1.0),
                                        _params0(), cohorts, other)
  for r in range(3):
    np.testing.assert_array_equal(states_a[r].tree_key, states_b[r].tree_key)
    np.testing.assert_array_equal(aggregates_a[r]["w"], aggregates_b[r]["w"])
  _, states_c, aggregates_c, _ = _train(
      aggregator, optax.sgd(1.0), _params0(), cohorts,
      [jax.random.key(79)] + keys[1:])
  assert not np.array_equal(states_a[0].tree_key, states_c[0].tree_key)
  assert not np.allclose(aggregates_a[2]["w"], aggregates_c[2]["w"])


@pytest.mark.parametrize("per_tree", [8, 5])
def test_noise_increment_variance_counts_unshared_nodes(per_tree):
  """Var(N_t - N_{t-1}) = node_std^2 * |nodes(t) symmetric-diff nodes(t-1)|."""
  size = 100_000
  aggregator = tree.tree_aggregator(CLIP, MULTIPLIER, COHORT, per_tree)
  state = aggregator.init()
  zero = [{"w": jnp.zeros(size), "b": jnp.zeros(2)}]
  for t, key in enumerate(_round_keys(13, per_tree), start=1):
    aggregate, state, _, _ = _round(aggregator, zero, state, key, mask=[0.0])
    unshared = len(_nodes(t) ^ _nodes(t - 1))
    assert unshared == (t & -t).bit_length()  # 1 + trailing zeros of t
    sample = np.asarray(aggregate["w"], np.float64)
    variance = NODE_STD**2 * unshared
    assert abs(sample.mean()) < 6 * math.sqrt(variance / size)
    assert sample.var() == pytest.approx(variance, rel=0.03), t


# ------------------------------------------------------ privacy properties


def test_state_is_two_small_arrays_whatever_the_model():
  """No array of the model's shape: no exact (or noisy) sum is remembered."""
  aggregator = tree.tree_aggregator(CLIP, MULTIPLIER, COHORT, 4)
  state = aggregator.init()
  assert isinstance(state, tree.TreeAggregatorState)
  assert state.step_in_tree.dtype == jnp.int32
  assert state.step_in_tree.shape == ()
  assert int(state.step_in_tree) == 4  # the first round starts a tree
  assert state.tree_key.dtype == jnp.uint32 and state.tree_key.shape == (2,)
  np.testing.assert_array_equal(state.tree_key, np.zeros(2, np.uint32))
  deltas = [{"w": jnp.ones([300, 7]), "b": jnp.ones([5])}] * 3
  for r in range(6):
    _, state, _, _ = _round(aggregator, deltas, state, jax.random.key(r))
    leaves = jax.tree.leaves(state)
    assert len(leaves) == 2
    assert sum(np.size(leaf) for leaf in leaves) == 3
    assert [leaf.shape for leaf in leaves] == [(), (2,)]
    assert [leaf.dtype for leaf in leaves] == [jnp.int32, jnp.uint32]


def test_metrics_are_public_and_never_read_the_unnoised_sum():
  aggregator = tree.tree_aggregator(CLIP, MULTIPLIER, COHORT, 4)
  key = jax.random.key(14)
  small = _cohorts(15, 1)[0]
  large = [jax.tree.map(lambda x: 100.0 * x + 3.0, d) for d in small]
  _, _, metrics, _ = _round(aggregator, small, aggregator.init(), key)
  _, _, other, _ = _round(aggregator, large, aggregator.init(), key)
  assert set(metrics) == {"dp_noise_std", "dp_noise_std_on_mean",
                          "clip_norm", "tree_step"}
  for name, value in metrics.items():
    assert value.dtype == jnp.float32 and value.shape == (), name
    np.testing.assert_array_equal(value, other[name])
  assert float(metrics["dp_noise_std"]) == pytest.approx(MULTIPLIER * CLIP)
  assert float(metrics["dp_noise_std_on_mean"]) == pytest.approx(NODE_STD)
  assert float(metrics["clip_norm"]) == pytest.approx(CLIP)
  assert float(metrics["tree_step"]) == 1.0


def test_one_client_moves_the_aggregate_by_at_most_clip_over_cohort():
  aggregator = tree.tree_aggregator(CLIP, 0.0, COHORT, 4)
  others = _cohorts(16, 1, num_clients=3)[0]
  huge = {"w": jnp.full([40], 1e6), "b": jnp.full([2], -1e6)}
  key = jax.random.key(0)
  without, _, _, _ = _round(aggregator, others + [huge], aggregator.init(),
                            key, mask=[1, 1, 1, 0])
  with_huge, _, _, client_metrics = _round(
      aggregator, others + [huge], aggregator.init(), key)
  moved = math.sqrt(sum(float(jnp.sum(jnp.square(with_huge[n] - without[n])))
                        for n in ("w", "b")))
  assert moved == pytest.approx(CLIP / COHORT, rel=1e-4)
  assert float(client_metrics["fraction_clipped"][3]) == 1.0
  assert float(client_metrics["update_norm"][3]) > 1e6
  # Weights are ignored: every client counts once.
  np.testing.assert_allclose(with_huge["w"], _clipped_mean(others + [huge])[
      "w"], rtol=1e-5, atol=1e-6)


def test_finalize_under_jit_with_donated_state_matches_eager():
  aggregator = tree.tree_aggregator(CLIP, MULTIPLIER, COHORT, 3)
  cohorts = _cohorts(17, 5)
  keys = _round_keys(18, 5)

  def finalize(weighted_sum, state, rng):
    return aggregator.finalize(weighted_sum, jnp.float32(3.0),
                               jnp.float32(3.0), state, rng)

  donated = jax.jit(finalize, donate_argnums=(1,))
  eager_state = aggregator.init()
  state = aggregator.init()
  with warnings.catch_warnings():
    # Backends without donation support only warn.
    warnings.filterwarnings("ignore", message=".*donat.*")
    for deltas, key in zip(cohorts, keys):
      weighted_sum = jax.tree.map(lambda *d: sum(d), *deltas)
      expected, eager_state, expected_metrics = finalize(weighted_sum,
                                                         eager_state, key)
      aggregate, state, metrics = donated(weighted_sum, state, key)
      np.testing.assert_allclose(aggregate["w"], expected["w"], rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_array_equal(state.tree_key, eager_state.tree_key)
      assert int(state.step_in_tree) == int(eager_state.step_in_tree)
      assert float(metrics["tree_step"]) == float(
          expected_metrics["tree_step"])


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(clip_norm=0.0), ValueError, "clip_norm"),
    (dict(clip_norm=math.inf), ValueError, "clip_norm"),
    (dict(clip_norm="1"), TypeError, "clip_norm"),
    (dict(noise_multiplier=-1.0), ValueError, "noise_multiplier"),
    (dict(noise_multiplier=float("nan")), ValueError, "noise_multiplier"),
    (dict(expected_cohort_size=0.0), ValueError, "expected_cohort_size"),
    (dict(steps_per_tree=0), ValueError, "steps_per_tree must be >= 1"),
    (dict(steps_per_tree=2.0), TypeError, "steps_per_tree must be an integer"),
    (dict(steps_per_tree=2**31), ValueError, "steps_per_tree must be < 2"),
])
def test_tree_aggregator_rejects_bad_arguments(kwargs, error, message):
  arguments = dict(clip_norm=1.0, noise_multiplier=1.0,
                   expected_cohort_size=10.0, steps_per_tree=4)
  arguments.update(kwargs)
  with pytest.raises(error, match=message):
    tree.tree_aggregator(**arguments)
