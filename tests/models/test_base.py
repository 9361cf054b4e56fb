"""The model interface: masked (padding) examples change no loss or metric
sum, and a user's own flax module trains through it."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.models import get_model
from fedjax_lab.models.base import batch_loss, eval_sums, from_flax
from tests.models.conftest import char_batch, image_batch


def _pad_with_junk(batch, num_junk: int, seed: int):
  """Appends ``num_junk`` random examples; returns (padded batch, mask)."""
  size = batch["x"].shape[0]
  junk_x = jax.random.randint(jax.random.key(seed), (num_junk,) +
                              batch["x"].shape[1:], 0, 90)
  junk_y = jax.random.randint(jax.random.key(seed + 1), (num_junk,) +
                              batch["y"].shape[1:], 0, 10)
  padded = {"x": jnp.concatenate([batch["x"], junk_x.astype(batch["x"].dtype)]),
            "y": jnp.concatenate([batch["y"], junk_y.astype(batch["y"].dtype)])}
  mask = jnp.concatenate([jnp.ones(size), jnp.zeros(num_junk)])
  return padded, mask


@pytest.mark.parametrize("name, input_shape, num_classes, kwargs", [
    ("cnn", (28, 28, 1), 10, {}),
    ("char_lstm", (12,), 90, {"hidden_size": 16}),
])
def test_masked_examples_change_nothing(name, input_shape, num_classes, kwargs):
  model = get_model(name, input_shape=input_shape, num_classes=num_classes,
                    **kwargs)
  params = model.init(jax.random.key(0))
  batch = image_batch(3, 10) if name == "cnn" else char_batch(3, seq_len=12)
  padded, mask = _pad_with_junk(batch, 2, seed=5)

  @jax.jit
  def sums_and_loss(params, batch, mask):
    return (eval_sums(model, params, batch, mask),
            batch_loss(model, params, batch, mask, None))

  sums, loss = sums_and_loss(params, batch, jnp.ones(3))
  padded_sums, padded_loss = sums_and_loss(params, padded, mask)
  assert set(sums) == {"loss", *model.example_metrics}
  for metric in sums:
    np.testing.assert_allclose(padded_sums[metric], sums[metric], rtol=1e-5)
  np.testing.assert_allclose(padded_loss, loss, rtol=1e-5)


class TinyUserNet(nn.Module):
  """A user's own module: one hidden layer with dropout."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    hidden = nn.relu(nn.Dense(16)(x))
    hidden = nn.Dropout(0.1, deterministic=not train)(hidden)
    return nn.Dense(3)(hidden)


def test_user_flax_module_trains():
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (64, 5))
  y = jnp.argmax(x @ jax.random.normal(key_w, (5, 3)), -1)
  batch, mask = {"x": x, "y": y}, jnp.ones(64)
  model = from_flax(TinyUserNet(), x[:1])
  assert model.name == "TinyUserNet"
  params = model.init(jax.random.key(1))

  @jax.jit
  def sgd_step(params, rng):
    loss, grads = jax.value_and_grad(batch_loss, argnums=1)(
        model, params, batch, mask, rng)
    return jax.tree.map(lambda p, g: p - 0.5 * g, params, grads), loss

  def eval_loss(params):
    loss_sum, weight = eval_sums(model, params, batch, mask)["loss"]
    return float(loss_sum / weight)

  initial_loss = eval_loss(params)
  for step in range(30):
    params, _ = sgd_step(params, jax.random.key(100 + step))
  assert eval_loss(params) < 0.7 * initial_loss
