"""ResNet-18 with group normalization, as in Reddi et al. 2021 on CIFAR-100.

Reddi et al. 2021 "Adaptive Federated Optimization" train a ResNet-18 whose
batch normalization is replaced by group normalization (following Hsieh et
al. 2020 "The Non-IID Data Quagmire of Decentralized Machine Learning") on
24x24 crops of CIFAR-100. Their model is ``create_resnet18`` of
https://github.com/google-research/federated ``utils/models/resnet_models.py``
(also TFF's ``simulation/baselines/cifar100/resnet_models.py``), a
pre-activation ("v2") ResNet::

  Conv 7x7/2, 64 (no bias) -> GN -> ReLU -> MaxPool 3x3/2 (same padding)
  -> 4 stages x 2 BasicBlocks, 64 / 128 / 256 / 512 filters
  -> GN -> ReLU -> global average pool -> Dense num_classes

A BasicBlock is ``GN -> ReLU -> Conv 3x3 -> GN -> ReLU -> Conv 3x3`` added
to a shortcut: the block's input itself, or ``Conv 1x1 -> GN`` of it when the
number of channels changes (the first block of stages 2-4). The very first
block skips its leading ``GN -> ReLU`` (the stem just applied one). Convs
have no bias. Every group norm has 2 groups and epsilon 1e-3: the defaults of
the GroupNormalization layers both versions use (TensorFlow Addons' then, with
a per-channel scale and offset; TFF's own ``simulation/models/group_norm.py``
now, without them).

That code passes stride 1 to every stage, so after the stem (stride 2) and
the max pool (stride 2) all four stages run at 1/4 of the input resolution
(6x6 for 24x24 crops). ``downsample=True`` instead halves the resolution at
the start of stages 2-4 (stride 2 in the first conv and the shortcut), the
torchvision / He et al. layout; it changes no parameter.

Parameters: every conv and norm sees the same channels as torchvision's
ResNet-18 (its batch norms and these group norms have the same total width),
so with affine group norms, 3 input channels and 1,000 classes the count is
torchvision's published 11,689,512, and with 100 classes 11,227,812
(:func:`resnet18_num_params`). ``norm_affine=False`` drops the per-channel
scales and offsets, as TFF's current layer does (9,600 fewer: 11,218,212
with 100 classes).

``conv_impl`` as in :mod:`fedjax_lab.models.cnn`: ``"im2col"`` computes every
convolution as shifted strided slices + one 2-D matmul and the max pool as a
maximum of strided slices (fast on XLA:CPU, including under ``jax.vmap``
over clients, where ``lax.conv`` becomes a slow grouped convolution);
``"lax"`` uses ``lax.conv_general_dilated`` and ``nn.max_pool``; ``"auto"``
picks im2col on CPU and GPU. Both share the same parameters.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models.base import Model, from_flax
from fedjax_lab.models.cnn import resolve_conv_impl

STAGE_SIZES = (2, 2, 2, 2)
_NORM_EPSILON = 1e-3


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """``(before, after)`` zero padding of TensorFlow / lax ``"SAME"``: the
  output has ``ceil(size / stride)`` positions, any odd pixel goes after."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def _strided_windows(x: jax.Array, kernel: tuple[int, int],
                     strides: tuple[int, int], out_hw: tuple[int, int]
                     ) -> list[jax.Array]:
  """The ``kh * kw`` shifted, strided views ``[..., out_h, out_w, C]`` of an
  already padded ``x [..., H, W, C]``, ordered (row offset, column offset)."""
  (kernel_h, kernel_w), (stride_h, stride_w), (out_h, out_w) = (
      kernel, strides, out_hw)
  return [x[..., row:row + (out_h - 1) * stride_h + 1:stride_h,
            col:col + (out_w - 1) * stride_w + 1:stride_w, :]
          for row in range(kernel_h) for col in range(kernel_w)]


def _pad_hw(x: jax.Array, pads: Sequence[tuple[int, int]],
            value: float = 0.0) -> jax.Array:
  widths = ((0, 0),) * (x.ndim - 3) + tuple(pads) + ((0, 0),)
  return jnp.pad(x, widths, constant_values=value)


def conv2d_im2col(x: jax.Array, kernel: jax.Array, strides: tuple[int, int],
                  padding: str) -> jax.Array:
  """2-D convolution ``[B, H, W, Cin] -> [B, H', W', Cout]`` as im2col + one
  2-D matmul; the same values as ``lax.conv_general_dilated`` with an HWIO
  ``kernel``, ``strides`` and ``"SAME"`` / ``"VALID"`` padding."""
  kernel_h, kernel_w, in_channels, features = kernel.shape
  height, width = x.shape[-3], x.shape[-2]
  if padding == "SAME":
    pads = [same_padding(height, kernel_h, strides[0]),
            same_padding(width, kernel_w, strides[1])]
    x = _pad_hw(x, pads)
  elif padding != "VALID":
    raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
  out_h = (x.shape[-3] - kernel_h) // strides[0] + 1
  out_w = (x.shape[-2] - kernel_w) // strides[1] + 1
  if out_h <= 0 or out_w <= 0:
    raise ValueError(f"input {x.shape} smaller than kernel {kernel.shape[:2]}")
  windows = _strided_windows(x, (kernel_h, kernel_w), strides, (out_h, out_w))
  patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, -1)
  rows = patches.reshape(-1, kernel_h * kernel_w * in_channels)
  flat_kernel = kernel.reshape(kernel_h * kernel_w * in_channels, features)
  return (rows @ flat_kernel).reshape(*patches.shape[:-1], features)


def max_pool_same(x: jax.Array, window: tuple[int, int],
                  strides: tuple[int, int]) -> jax.Array:
  """``nn.max_pool(x, window, strides, padding="SAME")`` as the maximum of
  ``kh * kw`` strided slices of ``x`` padded with ``-inf``."""
  height, width = x.shape[-3], x.shape[-2]
  pads = [same_padding(height, window[0], strides[0]),
          same_padding(width, window[1], strides[1])]
  out_hw = (-(-height // strides[0]), -(-width // strides[1]))
  padded = _pad_hw(x, pads, -jnp.inf)
  windows = _strided_windows(padded, window, strides, out_hw)
  out = windows[0]
  for view in windows[1:]:
    out = jnp.maximum(out, view)
  return out


class Conv(nn.Module):
  """Bias-free 2-D convolution, NHWC, kernel ``[kh, kw, Cin, features]``
  (He-normal, as the reference); ``impl`` ``"lax"`` or ``"im2col"``."""

  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  padding: str = "SAME"
  impl: str = "im2col"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
        "kernel", nn.initializers.he_normal(),
        (*self.kernel_size, x.shape[-1], self.features))
    if self.impl == "lax":
      return jax.lax.conv_general_dilated(
          x, kernel, self.strides, self.padding,
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return conv2d_im2col(x, kernel, self.strides, self.padding)


class BasicBlock(nn.Module):
  """Pre-activation basic block (see the module docstring)."""

  features: int
  strides: tuple[int, int] = (1, 1)
  normalize_first: bool = True
  norm_groups: int = 2
  norm_affine: bool = True
  impl: str = "im2col"

  def _norm(self, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=self.norm_groups, epsilon=_NORM_EPSILON,
                        use_bias=self.norm_affine, use_scale=self.norm_affine,
                        name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.relu(self._norm("norm_0")(x)) if self.normalize_first else x
    y = Conv(self.features, (3, 3), self.strides, impl=self.impl,
             name="conv_0")(y)
    y = nn.relu(self._norm("norm_1")(y))
    y = Conv(self.features, (3, 3), impl=self.impl, name="conv_1")(y)
    shortcut = x
    if self.strides != (1, 1) or x.shape[-1] != self.features:
      shortcut = Conv(self.features, (1, 1), self.strides, padding="VALID",
                      impl=self.impl, name="shortcut_conv")(x)
      shortcut = self._norm("shortcut_norm")(shortcut)
    return shortcut + y


class ResNet18(nn.Module):
  """Group-norm ResNet-18: ``x [B, H, W, C] -> logits [B, num_classes]``.

  ``conv_impl`` must already be resolved (``"lax"`` or ``"im2col"``).
  """

  num_classes: int = 100
  stage_sizes: tuple[int, ...] = STAGE_SIZES
  initial_filters: int = 64
  norm_groups: int = 2
  norm_affine: bool = True
  downsample: bool = False
  conv_impl: str = "im2col"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no stochastic layers; group norm has no batch statistics
    if self.conv_impl not in ("lax", "im2col"):
      raise ValueError(f"ResNet18 needs a resolved conv_impl ('lax' or "
                       f"'im2col'), got {self.conv_impl!r}")
    norm = lambda name: nn.GroupNorm(  # noqa: E731
        num_groups=self.norm_groups, epsilon=_NORM_EPSILON,
        use_bias=self.norm_affine, use_scale=self.norm_affine, name=name)
    x = x.astype(jnp.float32)
    x = Conv(self.initial_filters, (7, 7), (2, 2), impl=self.conv_impl,
             name="stem_conv")(x)
    x = nn.relu(norm("stem_norm")(x))
    if self.conv_impl == "lax":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    else:
      x = max_pool_same(x, (3, 3), (2, 2))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        stride = 2 if self.downsample and stage > 0 and block == 0 else 1
        x = BasicBlock(self.initial_filters * 2**stage, (stride, stride),
                       normalize_first=stage > 0 or block > 0,
                       norm_groups=self.norm_groups,
                       norm_affine=self.norm_affine, impl=self.conv_impl,
                       name=f"stage_{stage}_block_{block}")(x)
    x = nn.relu(norm("final_norm")(x))
    x = jnp.mean(x, axis=(-3, -2))
    return nn.Dense(self.num_classes,
                    kernel_init=nn.initializers.normal(stddev=0.01),
                    name="output")(x)


def resnet18_num_params(num_classes: int = 100, in_channels: int = 3,
                        initial_filters: int = 64,
                        stage_sizes: Sequence[int] = STAGE_SIZES,
                        norm_affine: bool = True) -> int:
  """Analytic parameter count of :class:`ResNet18`."""
  norm = (lambda channels: 2 * channels) if norm_affine else (lambda c: 0)
  total = 7 * 7 * in_channels * initial_filters + norm(initial_filters)
  channels = initial_filters
  for stage, num_blocks in enumerate(stage_sizes):
    features = initial_filters * 2**stage
    for block in range(num_blocks):
      if stage > 0 or block > 0:
        total += norm(channels)  # the block's leading norm
      total += 9 * channels * features + norm(features) + 9 * features**2
      if channels != features:
        total += channels * features + norm(features)
      channels = features
  return total + norm(channels) + channels * num_classes + num_classes


def resnet18_model(input_shape: tuple[int, ...] = (24, 24, 3),
                   num_classes: int = 100, conv_impl: str = "auto",
                   norm_groups: int = 2, norm_affine: bool = True,
                   downsample: bool = False) -> Model:
  """The group-norm ResNet-18 as a :class:`Model` (softmax cross-entropy,
  accuracy).

  Args:
    input_shape: one image ``(H, W, C)``; Reddi et al. use 24x24x3 crops.
    num_classes: 100 for CIFAR-100.
    conv_impl: ``"auto"``, ``"lax"`` or ``"im2col"`` (module docstring).
    norm_groups: groups of every group norm (2 in the reference); must
      divide 64.
    norm_affine: per-channel scale and offset in the group norms.
    downsample: halve the resolution at stages 2-4 (torchvision layout)
      instead of the reference's stride-1 stages.
  """
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {input_shape!r}")
  if num_classes <= 0:
    raise ValueError(f"num_classes must be positive, got {num_classes!r}")
  if norm_groups <= 0 or 64 % norm_groups:
    raise ValueError(f"norm_groups must be a positive divisor of 64, got "
                     f"{norm_groups!r}")
  module = ResNet18(num_classes=num_classes, norm_groups=norm_groups,
                    norm_affine=bool(norm_affine), downsample=bool(downsample),
                    conv_impl=resolve_conv_impl(conv_impl))
  example_x = jnp.zeros((1, *input_shape), jnp.float32)
  return from_flax(module, example_x, name="resnet18")
