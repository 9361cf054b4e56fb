"""The group-norm ResNet-18: parameter counts (an independent layer list and
torchvision's published count), im2col = lax, shapes, per-example
independence, training, jit and vmap."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.models import get_model, model_kwargs
from fedjax_lab.models.base import batch_loss, from_flax
from fedjax_lab.models.resnet import (ResNet18, conv2d_im2col, max_pool_same,
                                      resnet18_num_params)
from tests.models.conftest import count_params

# torchvision.models.resnet18: "num_params 11689512" (ImageNet, 1,000
# classes; https://pytorch.org/vision/stable/models/generated/
# torchvision.models.resnet18.html). Its 20 batch norms and our 20 group
# norms have the same total width (4,800 channels), so with affine group
# norms the counts agree.
TORCHVISION_RESNET18_PARAMS = 11_689_512


def layer_list(num_classes, in_channels=3):
  """The reference's layers, written out: (kind, shape...)."""
  layers = [("conv", 7, in_channels, 64), ("norm", 64)]
  layers += [("conv", 3, 64, 64),                       # stage 1, block 1
             ("norm", 64), ("conv", 3, 64, 64)]
  layers += [("norm", 64), ("conv", 3, 64, 64),         # stage 1, block 2
             ("norm", 64), ("conv", 3, 64, 64)]
  for cin, cout in [(64, 128), (128, 256), (256, 512)]:
    layers += [("norm", cin), ("conv", 3, cin, cout),   # first block
               ("norm", cout), ("conv", 3, cout, cout),
               ("conv", 1, cin, cout), ("norm", cout)]  # shortcut
    layers += [("norm", cout), ("conv", 3, cout, cout),  # second block
               ("norm", cout), ("conv", 3, cout, cout)]
  layers += [("norm", 512), ("dense", 512, num_classes)]
  return layers


def count_layers(layers, affine=True):
  total = 0
  for kind, *shape in layers:
    if kind == "conv":
      kernel, cin, cout = shape
      total += kernel * kernel * cin * cout
    elif kind == "norm":
      total += 2 * shape[0] if affine else 0
    else:
      total += shape[0] * shape[1] + shape[1]
  return total


@pytest.mark.parametrize("num_classes, affine", [(100, True), (1000, True),
                                                 (100, False)])
def test_param_count(num_classes, affine):
  model = get_model("resnet18", input_shape=(24, 24, 3),
                    num_classes=num_classes, norm_affine=affine)
  params = jax.eval_shape(model.init, jax.random.key(0))
  expected = count_layers(layer_list(num_classes), affine)
  assert count_params(params) == expected == resnet18_num_params(
      num_classes, norm_affine=affine)
  if affine and num_classes == 1000:
    assert expected == TORCHVISION_RESNET18_PARAMS
  if affine and num_classes == 100:
    assert expected == 11_227_812
  convs = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
           if "conv" in jax.tree_util.keystr(path)]
  assert len(convs) == 20  # stem + 16 block convs + 3 shortcuts
  assert all(len(kernel.shape) == 4 for kernel in convs)  # no conv biases


@pytest.mark.parametrize("size, kernel, stride, padding", [
    (9, 3, 1, "SAME"), (9, 7, 2, "SAME"), (24, 7, 2, "SAME"),
    (7, 1, 2, "VALID")])
def test_im2col_conv_and_pool_match_lax(size, kernel, stride, padding):
  key_x, key_k = jax.random.split(jax.random.key(size * kernel + stride))
  x = jax.random.normal(key_x, (2, size, size + 1, 3))
  weights = jax.random.normal(key_k, (kernel, kernel, 3, 5))
  expected = jax.lax.conv_general_dilated(
      x, weights, (stride, stride), padding,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  conv = jax.jit(conv2d_im2col, static_argnums=(2, 3))
  np.testing.assert_allclose(conv(x, weights, (stride, stride), padding),
                             expected, atol=1e-4, rtol=1e-4)
  pool = jax.jit(max_pool_same, static_argnums=(1, 2))
  np.testing.assert_array_equal(
      pool(x, (3, 3), (2, 2)),
      nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME"))


def small(conv_impl="im2col", downsample=False):
  """ResNet-18's code at 1/8 width and two stages of 2 and 1 blocks (every
  kind of block and shortcut, a quicker compile)."""
  module = ResNet18(num_classes=10, stage_sizes=(2, 1),
                    initial_filters=8, conv_impl=conv_impl,
                    downsample=downsample)
  return from_flax(module, jnp.zeros((1, 16, 16, 3)), name="resnet18")


@pytest.fixture(scope="module")
def params():
  """He-normal-like parameters of :func:`small` drawn with numpy (compiling
  the model's random initialisers on CPU costs more than these tests'
  models); every variant of :func:`small` has the same ones."""
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "scale" in name:
      return jnp.ones(leaf.shape)
    if "bias" in name:
      return jnp.zeros(leaf.shape)
    fan_in = int(np.prod(leaf.shape[:-1]))
    return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) *
                       np.sqrt(2.0 / fan_in))

  shapes = jax.eval_shape(small().init, jax.random.key(0))
  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_im2col_model_equals_lax_model(params):
  models_ = [small(impl, downsample) for downsample in (False, True)
             for impl in ("im2col", "lax")]
  shapes = lambda tree: jax.tree.map(lambda leaf: leaf.shape, tree)  # noqa
  for model in models_:
    assert shapes(jax.eval_shape(model.init,
                                 jax.random.key(0))) == shapes(params)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  outputs = jax.jit(lambda p, b: [model.apply(p, b, None, False)
                                  for model in models_])(params, {"x": x})
  for im2col, lax_output in (outputs[:2], outputs[2:]):
    np.testing.assert_allclose(im2col, lax_output, atol=1e-4, rtol=1e-4)
  assert not np.allclose(outputs[0], outputs[2])  # downsampling matters


def test_stage_resolution_and_output_shape():
  for downsample, sizes in [(False, [6, 6, 6, 6]), (True, [6, 3, 2, 1])]:
    module = ResNet18(num_classes=100, initial_filters=8,
                      downsample=downsample)
    x = jnp.zeros((1, 24, 24, 3))
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    logits, state = jax.eval_shape(
        lambda v: module.apply(v, x, capture_intermediates=True,
                               mutable=["intermediates"]), variables)
    assert logits.shape == (1, 100)
    seen = [state["intermediates"][f"stage_{s}_block_1"]["__call__"][0]
            .shape[1] for s in range(4)]
    assert seen == sizes, downsample
  model = get_model("resnet18", input_shape=(24, 24, 3), num_classes=100)
  assert {"conv_impl", "norm_groups", "norm_affine",
          "downsample"} == set(model_kwargs("resnet18"))
  with pytest.raises(ValueError, match="norm_groups"):
    get_model("resnet18", input_shape=(24, 24, 3), num_classes=100,
              norm_groups=3)
  del model


def test_examples_are_independent_and_masked_ones_do_nothing(params):
  model = small()
  x = jax.random.normal(jax.random.key(2), (3, 16, 16, 3))
  batch = {"x": x, "y": jnp.array([1, 2, 3])}
  other = {"x": x.at[2].set(-5.0), "y": jnp.array([1, 2, 7])}
  mask = jnp.array([1.0, 1.0, 0.0])
  run = jax.jit(lambda b: (model.apply(params, b, None, False),
                           batch_loss(model, params, b, mask, None)))
  (logits, loss), (other_logits, other_loss) = run(batch), run(other)
  # Group norm has no batch statistics: example 0's logits ignore the rest,
  # and the masked third example changes nothing.
  np.testing.assert_allclose(logits[:2], other_logits[:2], atol=1e-5)
  assert not np.allclose(logits[2], other_logits[2])
  np.testing.assert_allclose(loss, other_loss, rtol=1e-5)


def test_trains_and_vmaps_over_clients(params):
  model = small()
  x = jax.random.normal(jax.random.key(3), (2, 4, 16, 16, 3))  # 2 clients
  batches = {"x": x, "y": jnp.array([[0, 1, 2, 3], [4, 5, 6, 7]])}
  masks = jnp.ones((2, 4))

  def client_loss(p, b, m):
    return batch_loss(model, p, b, m, None)

  # Under jit and vmap over a client axis: each client's own parameters.
  stacked = jax.tree.map(lambda leaf: jnp.stack([leaf, 1.1 * leaf]), params)
  losses = jax.jit(jax.vmap(client_loss))(stacked, batches, masks)
  assert not np.isclose(losses[0], losses[1])

  # A few SGD steps on client 0's batch bring its loss well down; its
  # first loss is the vmapped one.
  @jax.jit
  def sgd_step(p, b, m):
    loss, grads = jax.value_and_grad(client_loss)(p, b, m)
    return jax.tree.map(lambda w, g: w - 0.2 * g, p, grads), loss

  first = jax.tree.map(lambda a: a[0], (batches, masks))
  trace, current = [], params
  for _ in range(10):
    current, loss = sgd_step(current, *first)
    trace.append(float(loss))
  np.testing.assert_allclose(trace[0], losses[0], rtol=1e-5)
  assert trace[-1] < 0.7 * trace[0], trace
