"""The pure model interface the engine sees.

The engine never touches Flax directly: it sees a :class:`Model`, a frozen
bundle of pure functions over pytrees. Every loss and metric is reported per
example as a ``(value_sum, weight)`` pair, so that

* masking is uniform: a padded example has mask 0 and contributes nothing;
* sequence models fit the same mould: ``value_sum`` sums over the valid tokens
  of the example and ``weight`` counts them (classification: ``weight = 1``);
* any batch statistic is ``sum(value_sum * mask) / sum(weight * mask)``.

A user's own Flax module plugs in with :func:`from_flax`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

Params = Any
Batch = Mapping[str, jax.Array]
# (logits, batch) -> (value_sum [B], weight [B])
ExampleFn = Callable[[jax.Array, Batch], tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Model:
  """Pure functions describing a model to the engine.

  Attributes:
    init: ``rng -> params``.
    apply: ``(params, batch, rng, train) -> logits``; ``batch`` holds at least
      ``x [B, ...]``; ``rng`` may be ``None`` when ``train`` is False.
    example_loss: ``(logits, batch) -> (loss_sum [B], weight [B])``.
    example_metrics: name -> ``(logits, batch) -> (value_sum [B], weight [B])``
      reported by evaluation (``loss`` is always added).
    name: for logs.
  """

  init: Callable[[jax.Array], Params]
  apply: Callable[[Params, Batch, jax.Array | None, bool], jax.Array]
  example_loss: ExampleFn
  example_metrics: Mapping[str, ExampleFn]
  name: str = "model"


def masked_mean(value_sum: jax.Array, weight: jax.Array,
                mask: jax.Array) -> jax.Array:
  """``sum(value_sum * mask) / max(sum(weight * mask), 1e-12)``; 0 if all masked."""
  mask = mask.astype(value_sum.dtype)
  total_weight = jnp.sum(weight * mask)
  return jnp.sum(value_sum * mask) / jnp.maximum(total_weight, 1e-12)


def batch_loss(model: Model, params: Params, batch: Batch, mask: jax.Array,
               rng: jax.Array | None) -> jax.Array:
  """Masked mean training loss of one batch (a scalar; 0 if all masked)."""
  logits = model.apply(params, batch, rng, True)
  loss_sum, weight = model.example_loss(logits, batch)
  return masked_mean(loss_sum, weight, mask)


def eval_sums(model: Model, params: Params, batch: Batch,
              mask: jax.Array) -> dict[str, tuple[jax.Array, jax.Array]]:
  """Per metric ``(sum of values, sum of weights)`` over the unmasked examples.

  Summing these pairs over batches and dividing at the end gives exact
  dataset-level metrics, whatever the padding.
  """
  logits = model.apply(params, batch, None, False)
  mask = mask.astype(jnp.float32)
  fns = {"loss": model.example_loss, **model.example_metrics}
  out = {}
  for name, fn in fns.items():
    value_sum, weight = fn(logits, batch)
    out[name] = (jnp.sum(value_sum * mask), jnp.sum(weight * mask))
  return out


# ---- standard per-example functions -------------------------------------


def softmax_cross_entropy(logits: jax.Array, batch: Batch):
  """Classification cross-entropy; ``batch['y']`` int labels ``[B]``."""
  labels = batch["y"]
  log_probs = jax.nn.log_softmax(logits)
  loss = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  return loss, jnp.ones_like(loss)


def accuracy(logits: jax.Array, batch: Batch):
  """Top-1 accuracy per example (1.0 or 0.0)."""
  correct = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
  return correct, jnp.ones_like(correct)


def sequence_cross_entropy(ignore_ids: tuple[int, ...] = (0,)) -> ExampleFn:
  """Per-sequence summed token cross-entropy over tokens not in ``ignore_ids``.

  ``logits [B, T, V]``, ``batch['y'] [B, T]``; returns ``(sum over valid
  tokens, number of valid tokens)`` per sequence.
  """

  def fn(logits, batch):
    labels = batch["y"]
    valid = _valid_tokens(labels, ignore_ids)
    log_probs = jax.nn.log_softmax(logits)
    token_loss = -jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
    return jnp.sum(token_loss * valid, -1), jnp.sum(valid, -1)

  return fn


def sequence_accuracy(ignore_ids: tuple[int, ...] = (0,)) -> ExampleFn:
  """Per-sequence count of correct next tokens among tokens not ignored."""

  def fn(logits, batch):
    labels = batch["y"]
    valid = _valid_tokens(labels, ignore_ids)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(correct * valid, -1), jnp.sum(valid, -1)

  return fn


def _valid_tokens(labels: jax.Array, ignore_ids: tuple[int, ...]) -> jax.Array:
  valid = jnp.ones(labels.shape, jnp.float32)
  for token in ignore_ids:
    valid = valid * (labels != token)
  return valid


def from_flax(module: nn.Module, example_x: jax.Array,
              example_loss: ExampleFn = softmax_cross_entropy,
              example_metrics: Mapping[str, ExampleFn] | None = None,
              name: str | None = None) -> Model:
  """Wraps a Flax module ``module(x, train=...) -> logits`` as a :class:`Model`.

  Args:
    module: any ``flax.linen`` module taking ``x`` and a ``train`` keyword.
    example_x: one example batch ``[B, ...]`` used to shape the parameters.
    example_loss: per-example loss (default: softmax cross-entropy on ``y``).
    example_metrics: extra metrics (default: accuracy).
    name: display name (default: the module class name).
  """
  if example_metrics is None:
    example_metrics = {"accuracy": accuracy}

  def init(rng):
    return module.init({"params": rng, "dropout": rng}, example_x,
                       train=False)["params"]

  def apply(params, batch, rng, train):
    # Without an rng there is nothing to drive dropout: run deterministically.
    rngs = {"dropout": rng} if rng is not None else None
    return module.apply({"params": params}, batch["x"],
                        train=train and rng is not None, rngs=rngs)

  return Model(init=init, apply=apply, example_loss=example_loss,
               example_metrics=dict(example_metrics),
               name=name or type(module).__name__)
