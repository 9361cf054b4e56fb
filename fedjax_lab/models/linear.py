"""Linear and fully-connected models on flattened inputs.

* :class:`LogisticRegression`: multinomial logistic regression, a single
  ``Dense`` layer on the flattened input (the convex baseline used throughout
  the federated-optimization literature, e.g. Li et al. 2020 "Federated
  Optimization in Heterogeneous Networks" (FedProx)).
* :class:`MLP`: ReLU multilayer perceptron; the default hidden sizes
  ``(200, 200)`` are the "2NN" of McMahan et al. 2017 "Communication-Efficient
  Learning of Deep Networks from Decentralized Data" (FedAvg).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models.base import Model, from_flax


def flatten_examples(x: jax.Array) -> jax.Array:
  """``[B, ...] -> [B, prod(...)]`` as float32."""
  return jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)


class LogisticRegression(nn.Module):
  """``x [B, ...] -> logits [B, num_classes]`` = ``flatten(x) @ W + b``."""

  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no stochastic layers
    return nn.Dense(self.num_classes, name="dense")(flatten_examples(x))


class MLP(nn.Module):
  """``x [B, ...] -> logits [B, num_classes]`` through ReLU hidden layers."""

  hidden_sizes: Sequence[int]
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no stochastic layers
    hidden = flatten_examples(x)
    for layer_index, width in enumerate(self.hidden_sizes):
      hidden = nn.relu(nn.Dense(width, name=f"hidden_{layer_index}")(hidden))
    return nn.Dense(self.num_classes, name="output")(hidden)


def logistic_model(input_shape: tuple[int, ...], num_classes: int) -> Model:
  """Multinomial logistic regression as a :class:`Model`.

  Args:
    input_shape: shape of one example ``x`` (without the batch axis).
    num_classes: number of output classes.
  """
  _check_positive(num_classes, "num_classes")
  example_x = jnp.zeros((1, *input_shape), jnp.float32)
  return from_flax(LogisticRegression(num_classes=num_classes), example_x,
                   name="logistic")


def mlp_model(input_shape: tuple[int, ...], num_classes: int,
              hidden_sizes: Sequence[int] = (200, 200)) -> Model:
  """ReLU MLP as a :class:`Model` (FedAvg "2NN" by default).

  Args:
    input_shape: shape of one example ``x`` (without the batch axis).
    num_classes: number of output classes.
    hidden_sizes: width of each hidden layer, input to output.
  """
  _check_positive(num_classes, "num_classes")
  hidden_sizes = tuple(int(width) for width in hidden_sizes)
  for width in hidden_sizes:
    _check_positive(width, "each hidden size")
  example_x = jnp.zeros((1, *input_shape), jnp.float32)
  module = MLP(hidden_sizes=hidden_sizes, num_classes=num_classes)
  return from_flax(module, example_x, name="mlp")


def _check_positive(value: int, what: str) -> None:
  if int(value) <= 0:
    raise ValueError(f"{what} must be a positive integer, got {value!r}")
