"""The Stack Overflow next-word LSTM of Reddi et al. 2021.

Architecture ("Adaptive Federated Optimization", ICLR 2021, Stack Overflow
next-word prediction; ``create_recurrent_model`` of
https://github.com/google-research/federated ``utils/models/
stackoverflow_models.py``, also TFF's ``simulation.baselines.stackoverflow``)::

  Embedding(10,004, 96) -> LSTM 670 -> Dense 96 -> Dense 10,004

over ``x int32 [B, T]`` (``T = 20``), giving logits ``[B, T, 10,004]``. The
10,004 ids are the 10,000 most frequent words plus pad (0), one OOV bucket
(10,001), BOS (10,002) and EOS (10,003).

Parameters with the defaults: embedding ``10,004 * 96 = 960,384``; LSTM
``4 * 670 * (96 + 670 + 1) = 2,055,560`` (input kernel, recurrent kernel and
one bias per gate); projection ``670 * 96 + 96 = 64,416``; output
``96 * 10,004 + 10,004 = 970,388``; in all 4,050,748, the count quoted for
this model (:func:`word_lstm_num_params`).

``num_layers > 1`` stacks (LSTM, projection) pairs, and ``tie_embeddings``
replaces the output layer by ``h @ embedding^T`` (TFF's
``shared_embedding``). Initialisers follow TFF: embedding uniform in
``[-0.05, 0.05]``, LSTM input kernels He-normal, recurrent kernels
orthogonal, dense kernels Glorot-normal.

TFF masks padded *inputs* (``mask_zero``) so the LSTM skips them; this model
runs over them instead. Padding only ever follows a sequence's last token, so
the outputs at real positions are the same, and padded targets are excluded
from the loss and metrics (:mod:`fedjax_lab.models.sequence`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models import sequence
from fedjax_lab.models.base import Model, from_flax


def _uniform_init(limit: float):
  """Initializer uniform in ``[-limit, limit]`` (Keras ``RandomUniform``)."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


class WordLSTM(nn.Module):
  """Word-level LSTM language model: ``x int [B, T] -> logits [B, T, V]``."""

  vocab_size: int = sequence.STACKOVERFLOW_NUM_IDS
  embed_dim: int = 96
  hidden_size: int = 670
  num_layers: int = 1
  tie_embeddings: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # no stochastic layers
    embed = nn.Embed(self.vocab_size, self.embed_dim,
                     embedding_init=_uniform_init(0.05), name="embed")
    h = embed(x.astype(jnp.int32))
    dense_init = nn.initializers.glorot_normal()
    for layer_index in range(self.num_layers):
      cell = nn.OptimizedLSTMCell(
          self.hidden_size, kernel_init=nn.initializers.he_normal(),
          recurrent_kernel_init=nn.initializers.orthogonal(),
          name=f"lstm_{layer_index}")
      h = nn.RNN(cell, name=f"rnn_{layer_index}")(h)
      # Dense layers over 2-D [B * T, features] rows (their weight gradient
      # is then one plain matmul, faster on XLA:CPU than contracting B and
      # T together).
      rows = nn.Dense(self.embed_dim, kernel_init=dense_init,
                      name=f"projection_{layer_index}")(
                          h.reshape(-1, self.hidden_size))
      h = rows.reshape(*h.shape[:-1], self.embed_dim)
    rows = h.reshape(-1, self.embed_dim)
    if self.tie_embeddings:
      logits = embed.attend(rows)
    else:
      logits = nn.Dense(self.vocab_size, kernel_init=dense_init,
                        name="output")(rows)
    return logits.reshape(*h.shape[:-1], self.vocab_size)


def word_lstm_num_params(vocab_size: int = sequence.STACKOVERFLOW_NUM_IDS,
                         embed_dim: int = 96, hidden_size: int = 670,
                         num_layers: int = 1,
                         tie_embeddings: bool = False) -> int:
  """Analytic parameter count of :class:`WordLSTM`.

  Each layer: an LSTM ``4 h (e + h + 1)`` then a projection ``h e + e``.
  """
  e, h = embed_dim, hidden_size
  total = vocab_size * e + num_layers * (4 * h * (e + h + 1) + h * e + e)
  if not tie_embeddings:
    total += e * vocab_size + vocab_size
  return total


def word_lstm_model(input_shape: tuple[int, ...] = (20,),
                    num_classes: int = sequence.STACKOVERFLOW_NUM_IDS,
                    embed_dim: int = 96, hidden_size: int = 670,
                    num_layers: int = 1, tie_embeddings: bool = False,
                    pad_id: int = 0, oov_id: int | None = None,
                    bos_id: int | None = None,
                    eos_id: int | None = None) -> Model:
  """The Stack Overflow word LSTM as a :class:`Model`.

  Args:
    input_shape: ``(T,)``, the sequence length of one example (20 in Reddi
      et al.).
    num_classes: number of token ids (inputs and outputs share them).
    embed_dim: word embedding width (also the projection's width).
    hidden_size: LSTM units.
    num_layers: stacked (LSTM, projection) pairs.
    tie_embeddings: logits ``h @ embedding^T`` instead of a final dense layer.
    pad_id, oov_id, bos_id, eos_id: special token ids; ``None`` takes TFF's
      layout ``num_classes - 3``, ``- 2``, ``- 1``.

  ``batch['x']`` and ``batch['y']`` are int ``[B, T]`` (``y`` is ``x``
  shifted by one).
  """
  oov_id, bos_id, eos_id = sequence.default_special_ids(num_classes, oov_id,
                                                        bos_id, eos_id)
  sequence.check_sequence_args(
      input_shape, num_classes, (pad_id, oov_id, bos_id, eos_id),
      {"embed_dim": embed_dim, "hidden_size": hidden_size,
       "num_layers": num_layers})
  module = WordLSTM(vocab_size=num_classes, embed_dim=embed_dim,
                    hidden_size=hidden_size, num_layers=num_layers,
                    tie_embeddings=bool(tie_embeddings))
  loss, metrics = sequence.next_token_functions(pad_id, oov_id, bos_id, eos_id)
  example_x = jnp.zeros((1, *input_shape), jnp.int32)
  return from_flax(module, example_x, example_loss=loss,
                   example_metrics=metrics, name="word_lstm")
