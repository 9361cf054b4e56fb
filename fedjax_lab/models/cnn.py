"""The FedAvg EMNIST CNN, with a CPU-friendly im2col convolution.

Architecture (McMahan et al. 2017 "Communication-Efficient Learning of Deep
Networks from Decentralized Data", in the dropout variant used by Reddi et al.
2021 "Adaptive Federated Optimization" and TFF's EMNIST baseline)::

  Conv 3x3x32 (valid, relu) -> Conv 3x3x64 (valid, relu) -> MaxPool 2x2
  -> Dropout 0.25 -> flatten -> Dense 128 (relu) -> Dropout 0.5
  -> Dense num_classes

For ``28x28x1`` inputs it has 1,206,590 parameters with 62 classes and
1,199,882 with 10.

``conv_impl`` picks how convolutions and pooling are computed; parameters are
identical (``conv_k/kernel [3, 3, Cin, Cout]``, ``conv_k/bias [Cout]``) so they
are interchangeable between implementations:

* ``"lax"``: ``flax.linen.Conv`` (``lax.conv_general_dilated``) and
  ``nn.max_pool`` (``lax.reduce_window``); the reference.
* ``"im2col"``: :class:`Im2colConv` (shifted slices concatenated on the channel
  axis, then one matmul) and a reshape-based max pool. On XLA:CPU this is much
  faster, above all under ``jax.vmap`` over clients, where ``lax.conv`` becomes
  a slow grouped convolution.
* ``"auto"``: ``"im2col"`` on CPU and GPU (measured faster on both for this
  model; see experiments/results/), else ``"lax"``; resolved once, when the
  model is built.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models.base import Model, from_flax

CONV_IMPLS = ("auto", "lax", "im2col")


def resolve_conv_impl(conv_impl: str) -> str:
  """Maps ``"auto"`` to ``"im2col"`` on CPU and GPU, ``"lax"`` elsewhere.

  Measured (experiments/results/): for the W1 round, im2col under vmap is
  ~20-30x faster than lax.conv on XLA:CPU and ~2x faster on an H100.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(
        f"conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}")
  if conv_impl == "auto":
    return "im2col" if jax.default_backend() in ("cpu", "gpu") else "lax"
  return conv_impl


def im2col_patches(x: jax.Array, kernel_size: tuple[int, int]) -> jax.Array:
  """Valid, stride-1 patches ``[B, H, W, C] -> [B, H-kh+1, W-kw+1, kh*kw*C]``.

  The last axis is ordered ``(row offset, column offset, channel)``, matching
  ``kernel.reshape(kh * kw * C, Cout)`` for an HWIO kernel.
  """
  kernel_h, kernel_w = kernel_size
  out_h = x.shape[-3] - kernel_h + 1
  out_w = x.shape[-2] - kernel_w + 1
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f"input {x.shape} smaller than kernel {kernel_size}")
  shifted = [x[..., row:row + out_h, col:col + out_w, :]
             for row in range(kernel_h) for col in range(kernel_w)]
  return jnp.concatenate(shifted, axis=-1)


class Im2colConv(nn.Module):
  """Stride-1 2-D convolution as im2col + one matmul, NHWC in and out.

  Same parameters as ``nn.Conv(features, kernel_size)``: ``kernel
  [kh, kw, Cin, features]`` (lecun-normal) and ``bias [features]`` (zeros).
  ``padding`` is ``"VALID"`` or ``"SAME"`` (zero padding, as ``nn.Conv``).
  """

  features: int
  kernel_size: tuple[int, int] = (3, 3)
  padding: str = "VALID"
  use_bias: bool = True
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_h, kernel_w = self.kernel_size
    in_channels = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (kernel_h, kernel_w, in_channels, self.features))
    if self.padding == "SAME":
      # nn.Conv / lax "SAME" for stride 1: the extra pixel goes after.
      pad_h, pad_w = kernel_h - 1, kernel_w - 1
      x = jnp.pad(x, ((0, 0),) * (x.ndim - 3) + (
          (pad_h // 2, pad_h - pad_h // 2),
          (pad_w // 2, pad_w - pad_w // 2), (0, 0)))
    elif self.padding != "VALID":
      raise ValueError(
          f"padding must be 'VALID' or 'SAME', got {self.padding!r}")
    patches = im2col_patches(x, (kernel_h, kernel_w))
    flat_kernel = kernel.reshape(kernel_h * kernel_w * in_channels,
                                 self.features)
    # One explicit 2-D matmul: on XLA:CPU ~2-3x faster than contracting the
    # last axis of the 4-D patches directly.
    patch_rows = patches.reshape(-1, patches.shape[-1])
    y = (patch_rows @ flat_kernel).reshape(*patches.shape[:-1], self.features)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,))
    return y


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 stride-2 valid max pool by reshape: ``[B, H, W, C] -> [B, H//2, W//2, C]``.

  Same values as ``nn.max_pool(x, (2, 2), (2, 2))``; ties split the gradient
  evenly instead of picking one input (equal after a ReLU in practice).
  """
  batch, height, width, channels = x.shape
  x = x[:, :height - height % 2, :width - width % 2, :]
  x = x.reshape(batch, height // 2, 2, width // 2, 2, channels)
  return jnp.max(x, axis=(2, 4))


class EmnistCnn(nn.Module):
  """The FedAvg / Reddi et al. 2021 EMNIST CNN: ``x [B, H, W(, C)] -> logits``.

  ``conv_impl`` must already be resolved (``"lax"`` or ``"im2col"``).
  """

  num_classes: int = 62
  conv_impl: str = "lax"
  conv_features: tuple[int, int] = (32, 64)
  dense_features: int = 128
  dropout_after_pool: float = 0.25
  dropout_after_dense: float = 0.5

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    if self.conv_impl not in ("lax", "im2col"):
      raise ValueError(f"EmnistCnn needs a resolved conv_impl ('lax' or "
                       f"'im2col'), got {self.conv_impl!r}")
    x = x.astype(jnp.float32)
    if x.ndim == 3:  # [B, H, W] grayscale -> [B, H, W, 1]
      x = x[..., None]
    for layer_index, features in enumerate(self.conv_features):
      name = f"conv_{layer_index}"
      if self.conv_impl == "lax":
        conv = nn.Conv(features, (3, 3), padding="VALID", name=name)
      else:
        conv = Im2colConv(features, (3, 3), padding="VALID", name=name)
      x = nn.relu(conv(x))
    if self.conv_impl == "lax":
      x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    else:
      x = max_pool_2x2(x)
    x = nn.Dropout(self.dropout_after_pool, deterministic=not train)(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.dense_features, name="dense_0")(x))
    x = nn.Dropout(self.dropout_after_dense, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="dense_1")(x)


def deterministic_without_rng(model: Model) -> Model:
  """Wraps ``model`` so that ``apply`` is deterministic whenever ``rng`` is None.

  Needed for modules with dropout: ``base.batch_loss`` calls
  ``apply(..., rng, train=True)`` and ``rng`` may be ``None``.
  """
  inner_apply = model.apply

  def apply(params, batch, rng, train):
    return inner_apply(params, batch, rng, bool(train) and rng is not None)

  return Model(init=model.init, apply=apply, example_loss=model.example_loss,
               example_metrics=model.example_metrics, name=model.name)


def cnn_model(input_shape: tuple[int, ...] = (28, 28, 1),
              num_classes: int = 62, conv_impl: str = "auto",
              dropout_after_pool: float = 0.25,
              dropout_after_dense: float = 0.5) -> Model:
  """The EMNIST CNN as a :class:`Model` (softmax cross-entropy, accuracy).

  Args:
    input_shape: one example, ``(H, W)`` or ``(H, W, C)``.
    num_classes: 62 for EMNIST-62, 10 for digits.
    conv_impl: ``"auto"``, ``"lax"`` or ``"im2col"`` (see module docstring).
    dropout_after_pool: dropout rate after the max pool.
    dropout_after_dense: dropout rate after the 128-unit dense layer.

  Dropout is active only when ``apply`` gets ``train=True`` and an ``rng``.
  """
  if len(input_shape) not in (2, 3):
    raise ValueError(f"input_shape must be (H, W) or (H, W, C), got "
                     f"{input_shape!r}")
  if num_classes <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes!r}")
  for rate in (dropout_after_pool, dropout_after_dense):
    if not 0.0 <= rate < 1.0:
      raise ValueError(f"dropout rates must be in [0, 1), got {rate!r}")
  module = EmnistCnn(num_classes=num_classes,
                     conv_impl=resolve_conv_impl(conv_impl),
                     dropout_after_pool=dropout_after_pool,
                     dropout_after_dense=dropout_after_dense)
  example_x = jnp.zeros((1, *input_shape), jnp.float32)
  return deterministic_without_rng(from_flax(module, example_x, name="cnn"))
