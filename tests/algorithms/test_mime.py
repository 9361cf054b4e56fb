"""Mime and MimeLite (Karimireddy et al., NeurIPS 2021) through the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, mime
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.privacy import aggregators

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(5)
# Strategies x weightings for the pre-round path (each case compiles twice).
PRE_ROUND_CASES = [(Strategy("vmap", "scan"), "num_examples"),
                   (Strategy("vmap", "host"), "uniform"),
                   (Strategy("chunked", "unroll", 2), "num_examples"),
                   (Strategy("map", "scan"), "uniform")]


def _run(algorithm, params, cohort, strategy=Strategy(), rounds=1,
         state=None):
  fn = round_lib.build_round(algorithm, strategy, donate=False)
  state = algorithm.server_init(params) if state is None else state
  client_states = jnp.zeros(cohort["client_mask"].shape)
  metrics = None
  for _ in range(rounds):
    state, _, metrics = fn(state, cohort, client_states, RNG)
  return state, metrics


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _hand_gradient(params, x, y):
  """Gradient of the mean softmax cross-entropy of a linear model (float64)."""
  dense = params["Dense_0"]
  w = np.asarray(dense["kernel"], np.float64)
  b = np.asarray(dense["bias"], np.float64)
  logits = x.astype(np.float64) @ w + b
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  err = (probs - np.eye(w.shape[1])[y]) / len(y)
  return {"Dense_0": {"kernel": x.T @ err, "bias": err.sum(0)}}


def _cohort_data(clients, indices):
  x = np.concatenate([clients[i][0] for i in indices])
  y = np.concatenate([clients[i][1] for i in indices])
  return x, y


def _repeat_first_step(cohort, num_steps):
  """Every client's first batch (its whole data) as each of ``num_steps``."""
  out = dict(cohort)
  out["features"] = {k: np.repeat(v[:, :1], num_steps, axis=1)
                     for k, v in cohort["features"].items()}
  out["example_mask"] = np.repeat(cohort["example_mask"][:, :1], num_steps,
                                  axis=1)
  return out


def test_invalid_arguments(deterministic_model):
  with pytest.raises(ValueError, match="weighting"):
    mime.mime(deterministic_model, optax.sgd(1.0), 0.1, weighting="x")
  with pytest.raises(ValueError, match="client_learning_rate"):
    mime.mimelite(deterministic_model, optax.sgd(1.0), 0.0)
  with pytest.raises(ValueError, match="server_learning_rate"):
    mime.mime(deterministic_model, optax.sgd(1.0), 0.1,
              server_learning_rate=-1.0)


@pytest.mark.parametrize("strategy", [
    Strategy("vmap", "scan"), Strategy("chunked", "scan", 2)],
                         ids=lambda s: s.label)
def test_mimelite_with_sgd_is_fedavg_bit_for_bit(tiny_model, strategy):
  """Stateless base SGD: frozen state changes nothing, the gradient at x is a
  passenger; dropout (tiny_model) draws the same keys as FedAvg's steps."""
  params = tiny_model.init(jax.random.key(0))
  cohort = build_cohort(make_clients(7, seed=1), [0, 2, 3, 6], batch_size=3,
                        pad_clients=1, extra_steps=1)
  lite = mime.mimelite(tiny_model, optax.sgd(1.0), 0.07,
                       server_learning_rate=0.8)
  avg = fedavg.fedavg(tiny_model, optax.sgd(0.07), server_learning_rate=0.8)
  state, metrics = _run(lite, params, cohort, strategy, rounds=2)
  ref, ref_metrics = _run(avg, params, cohort, strategy, rounds=2)
  _assert_trees_equal(state.params, ref.params)
  assert float(metrics["train_loss"]) == float(ref_metrics["train_loss"])


def test_mime_single_client_full_batch_steps_is_fedavg(deterministic_model):
  """One client whose every step sees all its data: c = grad f(x; batch), so
  the correction vanishes and Mime with SGD is local full-batch GD."""
  params = deterministic_model.init(jax.random.key(1))
  cohort = _repeat_first_step(
      build_cohort(make_clients(1, seed=2, min_size=7, max_size=7), [0],
                   batch_size=8), num_steps=4)
  alg = mime.mime(deterministic_model, optax.sgd(1.0), 0.3)
  avg = fedavg.fedavg(deterministic_model, optax.sgd(0.3))
  state, _ = _run(alg, params, cohort, rounds=2)
  ref, _ = _run(avg, params, cohort, rounds=2)
  _assert_trees_close(state.params, ref.params)
  # With several clients the correction does not vanish: Mime != FedAvg.
  cohort = _repeat_first_step(
      build_cohort(make_clients(3, seed=2), [0, 1, 2], batch_size=12), 4)
  state, _ = _run(alg, params, cohort)
  ref, _ = _run(avg, params, cohort)
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(ref.params)))
  assert diff > 1e-3


@pytest.mark.parametrize("strategy,weighting", PRE_ROUND_CASES,
                         ids=lambda c: getattr(c, "label", c))
def test_mime_one_full_batch_step_is_fedsgd(deterministic_model, strategy,
                                            weighting):
  """One full-batch step per client: y_k = x - lr * c for every k, so the
  round is FedSGD's step x - lr * c (padded clients and steps are no-ops in
  both passes, for every strategy)."""
  lr = 0.4
  params = deterministic_model.init(jax.random.key(2))
  clients = make_clients(6, seed=3)
  cohort = build_cohort(clients, [1, 2, 4, 5], batch_size=12, pad_clients=2,
                        extra_steps=1)
  alg = mime.mime(deterministic_model, optax.sgd(1.0), lr,
                  weighting=weighting)
  sgd = fedavg.fedsgd(deterministic_model, optax.sgd(lr), weighting=weighting)
  state, _ = _run(alg, params, cohort, strategy)
  ref, _ = _run(sgd, params, cohort, Strategy())
  _assert_trees_close(state.params, ref.params)
  # extra holds c; FedSGD's step was x - lr * c.
  _assert_trees_close(
      jax.tree.map(lambda p, c: p - lr * c, params, state.extra), ref.params)


@pytest.mark.parametrize("lite", [False, True], ids=["mime", "mimelite"])
@pytest.mark.parametrize("base_optimizer", [
    optax.sgd(1.0, momentum=0.9), optax.adam(1.0, b1=0.8, b2=0.9)],
                         ids=["momentum", "adam"])
def test_server_state_is_optax_update_with_mean_full_batch_gradient(
    deterministic_model, lite, base_optimizer):
  """After each round s = optax's new state for c = the gradient of the mean
  loss over the cohort's examples at x (example weighting); two rounds."""
  params = deterministic_model.init(jax.random.key(3))
  clients = make_clients(5, seed=4)
  indices = [0, 1, 3]
  cohort = build_cohort(clients, indices, batch_size=4, pad_clients=1)
  build = mime.mimelite if lite else mime.mime
  alg = build(deterministic_model, base_optimizer, 0.05)
  x, y = _cohort_data(clients, indices)
  fn = round_lib.build_round(alg, Strategy(), donate=False)
  state = alg.server_init(params)
  expected_opt_state = state.opt_state
  for _ in range(2):
    grad = _hand_gradient(state.params, x, y)
    _, expected_opt_state = base_optimizer.update(
        jax.tree.map(lambda g: jnp.asarray(g, jnp.float32), grad),
        expected_opt_state, state.params)
    state, _, _ = fn(state, cohort, jnp.zeros([4]), RNG)
    _assert_trees_close(state.opt_state, expected_opt_state, rtol=1e-4,
                        atol=1e-6)
    if not lite:
      _assert_trees_close(state.extra, grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("lite", [False, True], ids=["mime", "mimelite"])
def test_local_steps_use_the_frozen_momentum(deterministic_model, lite):
  """One client, 3 steps: y <- y - lr (g_t + beta m0) with the server's m0
  unchanged at every step (optax trace: update = -(g + beta m))."""
  lr, beta = 0.2, 0.9
  params = deterministic_model.init(jax.random.key(4))
  cx, cy = make_clients(1, seed=5, min_size=11, max_size=11)[0]
  cohort = build_cohort([(cx, cy)], [0], batch_size=4)
  base_optimizer = optax.sgd(1.0, momentum=beta)
  build = mime.mimelite if lite else mime.mime
  alg = build(deterministic_model, base_optimizer, lr)
  rng = np.random.default_rng(6)
  state = alg.server_init(params)
  momentum = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape), jnp.float32),
      state.opt_state)
  state = state._replace(opt_state=momentum)
  new_state, _ = _run(alg, params, cohort, state=state)

  m0 = jax.tree.leaves(momentum)
  full = _hand_gradient(params, cx, cy)

  def trajectory(frozen):
    local, m = jax.tree.map(np.asarray, params), m0
    for s in range(3):
      bx, by = cx[4 * s:4 * (s + 1)], cy[4 * s:4 * (s + 1)]
      g = _hand_gradient(local, bx, by)
      if not lite:
        g = jax.tree.map(lambda gy, gx, c: gy - gx + c, g,
                         _hand_gradient(params, bx, by), full)
      leaves, treedef = jax.tree.flatten(g)
      new_m = [gl + beta * ml for gl, ml in zip(leaves, m)]
      if not frozen:
        m = new_m
      local = jax.tree.map(lambda p, d: p - lr * d, local,
                           jax.tree.unflatten(treedef, new_m))
    return local

  _assert_trees_close(new_state.params, trajectory(frozen=True), rtol=1e-4,
                      atol=1e-5)
  moving = trajectory(frozen=False)
  assert max(float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(
      jax.tree.leaves(new_state.params), jax.tree.leaves(moving))) > 1e-2
  # The server's new momentum is c + beta m0: local steps left m0 alone.
  _assert_trees_close(
      jax.tree.leaves(new_state.opt_state),
      [g + beta * m for g, m in zip(jax.tree.leaves(full), m0)], rtol=1e-4,
      atol=1e-5)


def test_mimelite_composes_with_gaussian_sum(deterministic_model):
  """The (delta, gradient) pair is clipped jointly and noised as one update."""
  params = deterministic_model.init(jax.random.key(6))
  cohort = build_cohort(make_clients(6, seed=7), [0, 1, 2, 4], batch_size=4,
                        pad_clients=1)
  base_optimizer = optax.sgd(1.0, momentum=0.9)
  make = lambda agg: mime.mimelite(deterministic_model, base_optimizer, 0.1,
                                   weighting="uniform", aggregator=agg)
  # No clipping in effect and no noise: the plain uniform mean.
  loose, _ = _run(make(aggregators.gaussian_sum(1e6, 0.0, 4.0)), params,
                  cohort)
  plain, _ = _run(make(None), params, cohort)
  _assert_trees_close(loose.params, plain.params)
  _assert_trees_close(loose.opt_state, plain.opt_state)
  # A tight clip bounds the mean pair: ||x+ - x||^2 + ||c||^2 <= C^2, where c
  # is the new momentum (the initial momentum is 0).
  clip_norm = 0.05
  clipped, metrics = _run(
      make(aggregators.gaussian_sum(clip_norm, 0.0, 4.0)), params, cohort)
  assert float(metrics["fraction_clipped"]) == 1.0
  delta = jax.tree.map(jnp.subtract, clipped.params, params)
  pair_norm = float(optax.tree.norm((delta, clipped.opt_state)))
  assert 0.5 * clip_norm < pair_norm <= clip_norm * (1 + 1e-5)
  # With noise the round runs and stays finite.
  noisy, metrics = _run(make(aggregators.gaussian_sum(clip_norm, 1.0, 4.0)),
                        params, cohort)
  assert float(metrics["params_finite"]) == 1.0
  assert float(metrics["dp_noise_std"]) == pytest.approx(clip_norm)
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(noisy.opt_state))
