"""The Shakespeare next-character LSTM.

Architecture (McMahan et al. 2017 "Communication-Efficient Learning of Deep
Networks from Decentralized Data"; as used by Reddi et al. 2021 "Adaptive
Federated Optimization", TFF and FedJAX)::

  Embedding(vocab 90, 8) -> LSTM 256 -> LSTM 256 -> Dense vocab

over ``x int32 [B, T]`` (``T = 80``), giving logits ``[B, T, vocab]``.

Token ids follow FedJAX's Shakespeare vocabulary: pad 0, characters 1..86,
OOV 87, BOS 88, EOS 89 (defaults below; the data source owns the real
constants).

Metrics (all per sequence ``(value_sum, weight)``):

* ``accuracy``: next-token accuracy ignoring pad;
* ``accuracy_no_eos``: ignoring pad and EOS (as reported by Reddi et al.);
* ``accuracy_in_vocab``: ignoring pad, OOV, BOS and EOS (FedJAX's
  "in-vocab" accuracy).

The loss is token cross-entropy ignoring pad only.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models.base import (Model, from_flax, sequence_accuracy,
                                    sequence_cross_entropy)


class CharLSTM(nn.Module):
  """Stacked-LSTM character model: ``x int [B, T] -> logits [B, T, vocab]``."""

  vocab_size: int = 90
  embed_dim: int = 8
  hidden_size: int = 256
  num_layers: int = 2

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no stochastic layers
    hidden = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(
        x.astype(jnp.int32))
    for layer_index in range(self.num_layers):
      cell = nn.OptimizedLSTMCell(self.hidden_size, name=f"lstm_{layer_index}")
      hidden = nn.RNN(cell, name=f"rnn_{layer_index}")(hidden)
    return nn.Dense(self.vocab_size, name="output")(hidden)


def char_lstm_num_params(vocab_size: int = 90, embed_dim: int = 8,
                         hidden_size: int = 256, num_layers: int = 2) -> int:
  """Analytic parameter count of :class:`CharLSTM`.

  Each LSTM layer has 4 gates with an input kernel, a recurrent kernel and
  one bias: ``4 * hidden * (input + hidden + 1)``.
  """
  total = vocab_size * embed_dim
  layer_input = embed_dim
  for _ in range(num_layers):
    total += 4 * hidden_size * (layer_input + hidden_size + 1)
    layer_input = hidden_size
  return total + hidden_size * vocab_size + vocab_size


def char_lstm_model(input_shape: tuple[int, ...] = (80,),
                    num_classes: int = 90, embed_dim: int = 8,
                    hidden_size: int = 256, num_layers: int = 2,
                    pad_id: int = 0, oov_id: int = 87, bos_id: int = 88,
                    eos_id: int = 89) -> Model:
  """The Shakespeare character LSTM as a :class:`Model`.

  Args:
    input_shape: ``(T,)``, the sequence length of one example.
    num_classes: vocabulary size (inputs and outputs share it).
    embed_dim: character embedding width.
    hidden_size: units per LSTM layer.
    num_layers: number of stacked LSTM layers.
    pad_id, oov_id, bos_id, eos_id: special token ids.

  ``batch['x']`` and ``batch['y']`` are int ``[B, T]`` (``y`` is ``x``
  shifted by one).
  """
  if len(input_shape) != 1:
    raise ValueError(f"input_shape must be (sequence_length,), got "
                     f"{input_shape!r}")
  for value, what in ((num_classes, "num_classes"), (embed_dim, "embed_dim"),
                      (hidden_size, "hidden_size"), (num_layers, "num_layers")):
    if int(value) <= 0:
      raise ValueError(f"{what} must be a positive integer, got {value!r}")
  for token in (pad_id, oov_id, bos_id, eos_id):
    if not 0 <= token < num_classes:
      raise ValueError(f"special token id {token} outside vocabulary of "
                       f"size {num_classes}")
  module = CharLSTM(vocab_size=num_classes, embed_dim=embed_dim,
                    hidden_size=hidden_size, num_layers=num_layers)
  example_x = jnp.zeros((1, *input_shape), jnp.int32)
  metrics = {
      "accuracy": sequence_accuracy(ignore_ids=(pad_id,)),
      "accuracy_no_eos": sequence_accuracy(ignore_ids=(pad_id, eos_id)),
      "accuracy_in_vocab": sequence_accuracy(
          ignore_ids=(pad_id, oov_id, bos_id, eos_id)),
  }
  return from_flax(module, example_x,
                   example_loss=sequence_cross_entropy(ignore_ids=(pad_id,)),
                   example_metrics=metrics, name="char_lstm")
