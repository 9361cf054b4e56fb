"""Logistic regression and the MLP: parameter counts."""

from __future__ import annotations

import jax

from fedjax_lab.models import get_model
from tests.models.conftest import count_params


def test_linear_param_counts():
  logistic = get_model("logistic", input_shape=(28, 28, 1), num_classes=10)
  shapes = jax.eval_shape(logistic.init, jax.random.key(0))
  assert count_params(shapes) == 784 * 10 + 10
  mlp = get_model("mlp", input_shape=(28, 28), num_classes=10)  # 2NN
  expected = (784 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10)
  assert count_params(jax.eval_shape(mlp.init, jax.random.key(0))) == expected
