"""Optimizers by name: the Reddi et al. FedAdagrad update and the name checks."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import optimizers


def test_adagrad_tau_follows_reddi_et_al_algorithm_2():
  # Two server steps by hand: v_t = v_{t-1} + d_t^2,
  # x_{t+1} = x_t + lr * d_t / (sqrt(v_t) + tau); optax's descent sign means
  # the pseudo-gradient passed in is -d_t.
  learning_rate, tau = 0.3, 0.1
  deltas = [np.array([0.5, -2.0, 0.0]), np.array([-1.0, 1.0, 3.0])]
  optimizer = optimizers.build_optimizer("adagrad_tau", learning_rate,
                                         {"eps": tau})
  params = jnp.zeros(3)
  state = optimizer.init(params)
  expected = np.zeros(3)
  accumulator = np.zeros(3)
  for delta in deltas:
    updates, state = optimizer.update(-jnp.asarray(delta), state, params)
    params = optax.apply_updates(params, updates)
    accumulator = accumulator + delta ** 2
    expected = expected + learning_rate * delta / (np.sqrt(accumulator) + tau)
  np.testing.assert_allclose(params, expected, rtol=1e-6, atol=1e-7)


def test_adagrad_tau_differs_from_optax_adagrad_eps_inside_the_root():
  # The reason the second name exists: with the same eps the steps differ.
  gradient = jnp.array([0.2])
  ours = optimizers.build_optimizer("adagrad_tau", 1.0, {"eps": 0.1})
  theirs = optimizers.build_optimizer(
      "adagrad", 1.0, {"eps": 0.1, "initial_accumulator_value": 0.0})
  step_ours, _ = ours.update(gradient, ours.init(gradient))
  step_theirs, _ = theirs.update(gradient, theirs.init(gradient))
  np.testing.assert_allclose(step_ours, [-0.2 / (0.2 + 0.1)], rtol=1e-6)
  assert abs(float(step_ours[0]) - float(step_theirs[0])) > 0.1


def test_unknown_name_and_hyperparameter_are_named_errors():
  with pytest.raises(ValueError, match="adagrad_tau"):
    optimizers.build_optimizer("nosuch", 0.1)
  with pytest.raises(ValueError, match="does not take"):
    optimizers.build_optimizer("adagrad_tau", 0.1, {"b1": 0.9})
  with pytest.raises(ValueError, match="learning_rate must be > 0"):
    optimizers.build_optimizer("yogi", 0.0)
