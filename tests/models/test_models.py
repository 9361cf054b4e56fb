"""Tests for the model zoo: shapes, sizes, conv equivalence, dropout, metrics."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.models import MODEL_NAMES, Model, from_flax, get_model
from fedjax_lab.models import model_kwargs
from fedjax_lab.models.base import batch_loss, eval_sums
from fedjax_lab.models.cnn import (Im2colConv, cnn_model, max_pool_2x2,
                                   resolve_conv_impl)
from fedjax_lab.models.lstm import char_lstm_model, char_lstm_num_params

PAD, OOV, BOS, EOS = 0, 87, 88, 89


def count_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def assert_trees_close(tree_a, tree_b, atol=1e-5, rtol=1e-5):
  assert jax.tree.structure(tree_a) == jax.tree.structure(tree_b)
  for leaf_a, leaf_b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
    np.testing.assert_allclose(leaf_a, leaf_b, atol=atol, rtol=rtol)


def image_batch(batch_size: int, num_classes: int = 62, seed: int = 0,
                leading: tuple[int, ...] = ()):
  key_x, key_y = jax.random.split(jax.random.key(seed))
  return {
      "x": jax.random.uniform(key_x, (*leading, batch_size, 28, 28, 1)),
      "y": jax.random.randint(key_y, (*leading, batch_size), 0, num_classes),
  }


def char_batch(batch_size: int, seq_len: int = 80, seed: int = 0):
  tokens = jax.random.randint(jax.random.key(seed), (batch_size, seq_len + 1),
                              1, 90)
  return {"x": tokens[:, :-1], "y": tokens[:, 1:]}


# ---- registry ---------------------------------------------------------------


@pytest.mark.parametrize("name, input_shape, num_classes, kwargs, out_shape", [
    ("logistic", (28, 28, 1), 10, {}, (3, 10)),
    ("mlp", (28, 28), 10, {"hidden_sizes": (32, 16)}, (3, 10)),
    ("cnn", (28, 28, 1), 62, {}, (3, 62)),
    ("cnn", (28, 28), 10, {"conv_impl": "lax"}, (3, 10)),
    ("char_lstm", (80,), 90, {"hidden_size": 16}, (3, 80, 90)),
])
def test_output_shapes(name, input_shape, num_classes, kwargs, out_shape):
  model = get_model(name, input_shape=input_shape, num_classes=num_classes,
                    **kwargs)
  assert isinstance(model, Model)
  assert model.name == name
  params = model.init(jax.random.key(0))
  if name == "char_lstm":
    x = jnp.ones((3, *input_shape), jnp.int32)
  else:
    x = jnp.ones((3, *input_shape), jnp.float32)
  logits = jax.jit(lambda p, b: model.apply(p, b, None, False))(params, {"x": x})
  assert logits.shape == out_shape
  assert logits.dtype == jnp.float32


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match="char_lstm"):
    get_model("resnet", input_shape=(28, 28, 1), num_classes=10)
  assert set(MODEL_NAMES) == {"logistic", "mlp", "cnn", "char_lstm"}


def test_bad_kwargs_are_reported():
  with pytest.raises(TypeError, match="hidden_sizes"):
    get_model("cnn", input_shape=(28, 28, 1), num_classes=10,
              hidden_sizes=(3,))
  with pytest.raises(ValueError, match="conv_impl"):
    get_model("cnn", input_shape=(28, 28, 1), num_classes=10,
              conv_impl="fft")
  with pytest.raises(ValueError, match="hidden size"):
    get_model("mlp", input_shape=(4,), num_classes=2, hidden_sizes=(0,))
  assert "conv_impl" in model_kwargs("cnn")
  assert "eos_id" in model_kwargs("char_lstm")


# ---- parameter counts -------------------------------------------------------


@pytest.mark.parametrize("conv_impl", ["lax", "im2col"])
@pytest.mark.parametrize("num_classes, expected", [(62, 1_206_590),
                                                   (10, 1_199_882)])
def test_cnn_param_count(conv_impl, num_classes, expected):
  model = cnn_model((28, 28, 1), num_classes, conv_impl=conv_impl)
  params = jax.eval_shape(model.init, jax.random.key(0))
  assert count_params(params) == expected


def test_linear_param_counts():
  logistic = get_model("logistic", input_shape=(28, 28, 1), num_classes=10)
  shapes = jax.eval_shape(logistic.init, jax.random.key(0))
  assert count_params(shapes) == 784 * 10 + 10
  mlp = get_model("mlp", input_shape=(28, 28), num_classes=10)  # 2NN
  expected = (784 * 200 + 200) + (200 * 200 + 200) + (200 * 10 + 10)
  assert count_params(jax.eval_shape(mlp.init, jax.random.key(0))) == expected


@pytest.mark.parametrize("kwargs", [{}, {"embed_dim": 5, "hidden_size": 12,
                                         "num_layers": 3}])
def test_char_lstm_param_count(kwargs):
  model = char_lstm_model((80,), 90, **kwargs)
  params = jax.eval_shape(model.init, jax.random.key(0))
  assert count_params(params) == char_lstm_num_params(90, **kwargs)
  if not kwargs:  # embedding + 2 LSTMs (4 gates, one bias each) + dense
    expected = (90 * 8 + 4 * 256 * (8 + 256 + 1) + 4 * 256 * (256 + 256 + 1)
                + 256 * 90 + 90)
    assert count_params(params) == expected == 820_522


# ---- im2col convolution -----------------------------------------------------


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


# ---- dropout ----------------------------------------------------------------


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


# ---- masking and metrics ----------------------------------------------------


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


def test_sequence_metrics_ignore_special_tokens():
  model = char_lstm_model((6,), 90, pad_id=PAD, oov_id=OOV, bos_id=BOS,
                          eos_id=EOS)
  labels = jnp.array([[5, 6, OOV, EOS, PAD, PAD],
                      [BOS, 7, 8, 9, EOS, PAD]])
  predictions = jnp.array([[5, 1, OOV, EOS, 3, 4],     # right: 5, OOV, EOS
                           [BOS, 7, 1, 9, 2, PAD]])    # right: BOS, 7, 9
  logits = jax.nn.one_hot(predictions, 90) * 10.0
  batch = {"x": jnp.zeros_like(labels), "y": labels}
  expected = {  # metric -> (correct per row, counted tokens per row)
      "accuracy": ([3, 3], [4, 5]),             # ignore pad
      "accuracy_no_eos": ([2, 3], [3, 4]),      # ignore pad, EOS
      "accuracy_in_vocab": ([1, 2], [2, 3]),    # ignore pad, OOV, BOS, EOS
  }
  assert set(model.example_metrics) == set(expected)
  for metric, (correct, counted) in expected.items():
    value_sum, weight = model.example_metrics[metric](logits, batch)
    np.testing.assert_allclose(value_sum, correct, err_msg=metric)
    np.testing.assert_allclose(weight, counted, err_msg=metric)
  loss_sum, loss_weight = model.example_loss(logits, batch)
  np.testing.assert_allclose(loss_weight, [4, 5])  # loss ignores pad only
  log_probs = jax.nn.log_softmax(logits)
  token_loss = -jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss_sum, jnp.sum(token_loss * (labels != PAD), -1),
                             rtol=1e-6)


# ---- user modules -----------------------------------------------------------


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
