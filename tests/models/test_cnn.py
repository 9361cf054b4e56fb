"""The CNN: parameter counts, the im2col convolution and max pool against
flax's, lax vs im2col equal in forward, gradient and under a client vmap,
and dropout only when training with a key."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.models.base import batch_loss
from fedjax_lab.models.cnn import (Im2colConv, cnn_model, max_pool_2x2,
                                   resolve_conv_impl)
from tests.models.conftest import assert_trees_close, count_params, image_batch


@pytest.mark.parametrize("conv_impl", ["lax", "im2col"])
@pytest.mark.parametrize("num_classes, expected", [(62, 1_206_590),
                                                   (10, 1_199_882)])
def test_cnn_param_count(conv_impl, num_classes, expected):
  model = cnn_model((28, 28, 1), num_classes, conv_impl=conv_impl)
  params = jax.eval_shape(model.init, jax.random.key(0))
  assert count_params(params) == expected


def test_auto_conv_impl_resolves_by_backend():
  expected = ("im2col" if jax.default_backend() in ("cpu", "gpu") else "lax")
  assert resolve_conv_impl("auto") == expected
  assert resolve_conv_impl("lax") == "lax"


@pytest.mark.parametrize("padding", ["VALID", "SAME"])
@pytest.mark.parametrize("kernel_size, in_shape", [((3, 3), (2, 9, 7, 3)),
                                                   ((2, 3), (1, 6, 6, 4))])
def test_im2col_conv_matches_flax_conv(padding, kernel_size, in_shape):
  x = jax.random.normal(jax.random.key(1), in_shape)
  reference = nn.Conv(5, kernel_size, padding=padding)
  im2col = Im2colConv(5, kernel_size, padding=padding)
  params = reference.init(jax.random.key(0), x)
  assert_trees_close(params, im2col.init(jax.random.key(0), x))
  np.testing.assert_allclose(im2col.apply(params, x), reference.apply(params, x),
                             atol=1e-5, rtol=1e-5)


def test_max_pool_2x2_matches_flax():
  x = jax.random.normal(jax.random.key(0), (2, 7, 6, 3))
  expected = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
  np.testing.assert_allclose(max_pool_2x2(x), expected)


def _cnn_pair(num_classes=62):
  return (cnn_model((28, 28, 1), num_classes, conv_impl="lax"),
          cnn_model((28, 28, 1), num_classes, conv_impl="im2col"))


def test_cnn_im2col_equals_lax_forward_and_gradient():
  lax_model, im2col_model = _cnn_pair()
  params = lax_model.init(jax.random.key(0))
  # Same rng -> same initial parameters, whichever implementation.
  assert_trees_close(params, im2col_model.init(jax.random.key(0)), atol=0)
  batch = image_batch(4)
  mask = jnp.ones(4)
  outputs = []
  for model in (lax_model, im2col_model):

    @jax.jit
    def forward_loss_grad(params, batch, model=model):
      logits = model.apply(params, batch, None, False)
      loss, grads = jax.value_and_grad(batch_loss, argnums=1)(
          model, params, batch, mask, jax.random.key(7))  # same dropout masks
      return logits, loss, grads

    outputs.append(forward_loss_grad(params, batch))
  (logits_a, loss_a, grads_a), (logits_b, loss_b, grads_b) = outputs
  np.testing.assert_allclose(logits_a, logits_b, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(loss_a, loss_b, atol=1e-5, rtol=1e-5)
  assert_trees_close(grads_a, grads_b, atol=1e-5, rtol=1e-4)


def test_cnn_im2col_equals_lax_under_client_vmap():
  num_clients, batch_size = 2, 3
  lax_model, im2col_model = _cnn_pair(num_classes=10)
  base_params = lax_model.init(jax.random.key(0))
  params = jax.tree.map(  # distinct parameters per client, leading axis
      lambda leaf: jnp.stack([leaf * (1.0 + 0.1 * client)
                              for client in range(num_clients)]), base_params)
  batch = image_batch(batch_size, 10, leading=(num_clients,))
  mask = jnp.ones((num_clients, batch_size))
  dropout_keys = jax.random.split(jax.random.key(1), num_clients)
  results = []
  for model in (lax_model, im2col_model):

    def forward_and_grad(params, batch, mask, rng, model=model):
      logits = model.apply(params, batch, None, False)
      grads = jax.grad(batch_loss, argnums=1)(model, params, batch, mask, rng)
      return logits, grads

    results.append(jax.jit(jax.vmap(forward_and_grad))(
        params, batch, mask, dropout_keys))
  (logits_a, grads_a), (logits_b, grads_b) = results
  assert logits_a.shape == (num_clients, batch_size, 10)
  np.testing.assert_allclose(logits_a, logits_b, atol=1e-5, rtol=1e-5)
  assert_trees_close(grads_a, grads_b, atol=1e-5, rtol=1e-4)


def test_cnn_dropout_only_in_train_mode_with_rng():
  model = cnn_model((28, 28, 1), 10)
  params = model.init(jax.random.key(0))
  batch = image_batch(3, 10)
  apply = model.apply  # eager: cheaper than compiling four variants
  evaluation = apply(params, batch, None, False)
  np.testing.assert_array_equal(apply(params, batch, None, True), evaluation)
  np.testing.assert_array_equal(
      apply(params, batch, jax.random.key(1), False), evaluation)
  train_1 = apply(params, batch, jax.random.key(1), True)
  train_2 = apply(params, batch, jax.random.key(2), True)
  assert not np.allclose(train_1, evaluation)
  assert not np.allclose(train_1, train_2)
  np.testing.assert_array_equal(
      apply(params, batch, jax.random.key(1), True), train_1)
