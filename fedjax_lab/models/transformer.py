"""A small decoder-only transformer language model for next-word prediction.

Architecture (pre-LayerNorm, GPT-2 style)::

  token embedding [V, d] + learned position embedding [T, d] -> dropout
  -> num_layers x [ x + Dropout(CausalSelfAttention(LayerNorm(x)))
                    x + Dropout(MLP(LayerNorm(x))) ]
  -> LayerNorm -> logits [B, T, V]

with ``MLP = Dense(mlp_dim) -> ReLU -> Dense(d)`` and multi-head attention of
``num_heads`` heads (fused query/key/value projection ``[d, 3d]`` with bias,
output projection ``[d, d]`` with bias). With ``tie_embeddings`` the logits
are ``h @ embedding^T`` (no output bias), else a ``Dense(V)`` with bias.
The context length is ``input_shape[0]``.

Defaults follow the Stack Overflow transformer of Apple's pfl-research
benchmarks (``benchmarks/lm/configs/baseline.yaml`` in
https://github.com/apple/pfl-research: ``embedding_size: 96``,
``hidden_size: 96``, ``num_heads: 8``, ``feedforward_size: 1536``,
``num_transformer_layer: 3``, ``dropout_rate: 0.1``; shared input/output
embeddings; vocabulary 10,000 words + 4 special ids, sequences of 20), itself
the model of Wang et al. 2021 "A Field Guide to Federated Optimization".
Differences from that PyTorch model: pre-LayerNorm blocks with a final
LayerNorm (it uses post-LayerNorm ``nn.TransformerEncoderLayer``), a learned
position embedding (it adds fixed sinusoids), GPT-2's initialisation
(embeddings normal with std 0.02, not scaled by ``sqrt(d)``) and no dropout
on the attention weights. With the defaults the model has 1,965,024
parameters (:func:`transformer_lm_num_params`); that model has 1,962,912
(no position table, no final LayerNorm; the blocks are the same size).

Attention is two batched matmuls over an explicit ``[T, T]`` causal mask
(``jnp.where``, so a future token's weight is exactly 0). At ``T = 20`` and
``d = 96`` it costs far less than the MLP and the ``[d, V]`` output
projection. The model has no convolution, so XLA:CPU's slow convolution
paths (inside ``lax.scan``, under ``jax.vmap``) do not arise; its dense
layers run on 2-D ``[B * T, d]`` rows (see :class:`TransformerLM`).

Loss and metrics: :mod:`fedjax_lab.models.sequence` (token cross-entropy over
non-pad targets; ``accuracy`` excludes pad, OOV, BOS and EOS targets).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lab.models import sequence
from fedjax_lab.models.base import Model, from_flax

_EMBED_INIT = nn.initializers.normal(stddev=0.02)
_LAYER_NORM_EPSILON = 1e-5


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention where position ``t`` sees positions ``<= t``.

  ``h [B * T, d] -> [B * T, d]`` (sequences flattened, see
  :class:`TransformerLM`); ``d`` must be a multiple of ``num_heads``.
  """

  num_heads: int
  length: int

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    rows, width = h.shape
    head_dim = width // self.num_heads
    qkv = nn.Dense(3 * width, name="qkv")(h)
    qkv = qkv.reshape(rows // self.length, self.length, 3, self.num_heads,
                      head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, key) / math.sqrt(head_dim)
    causal = jnp.tril(jnp.ones((self.length, self.length), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
    weights = jax.nn.softmax(scores, axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return nn.Dense(width, name="out")(mixed.reshape(rows, width))


class DecoderBlock(nn.Module):
  """Pre-LayerNorm block: causal attention and a ReLU MLP, each residual.

  ``h [B * T, d] -> [B * T, d]`` for sequences of ``length`` ``T``.
  """

  num_heads: int
  mlp_dim: int
  length: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, h: jax.Array, train: bool = False) -> jax.Array:
    width = h.shape[-1]
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    y = nn.LayerNorm(epsilon=_LAYER_NORM_EPSILON, name="attention_norm")(h)
    y = CausalSelfAttention(self.num_heads, self.length, name="attention")(y)
    h = h + dropout(y)
    y = nn.LayerNorm(epsilon=_LAYER_NORM_EPSILON, name="mlp_norm")(h)
    y = nn.relu(nn.Dense(self.mlp_dim, name="mlp_in")(y))
    return h + dropout(nn.Dense(width, name="mlp_out")(y))


class TransformerLM(nn.Module):
  """Decoder-only transformer: ``x int [B, T] -> logits [B, T, vocab]``.

  ``T`` may be at most ``context_length`` (the position table's size).
  """

  vocab_size: int = sequence.STACKOVERFLOW_NUM_IDS
  context_length: int = 20
  embed_dim: int = 96
  num_heads: int = 8
  mlp_dim: int = 1536
  num_layers: int = 3
  dropout_rate: float = 0.1
  tie_embeddings: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    length = x.shape[-1]
    if length > self.context_length:
      raise ValueError(f"sequence length {length} exceeds the context length "
                       f"{self.context_length}")
    embed = nn.Embed(self.vocab_size, self.embed_dim,
                     embedding_init=_EMBED_INIT, name="token_embed")
    positions = self.param("position_embed", _EMBED_INIT,
                           (self.context_length, self.embed_dim))
    h = embed(x.astype(jnp.int32)) + positions[:length]
    h = nn.Dropout(self.dropout_rate, deterministic=not train)(h)
    # Every dense layer sees 2-D [B * T, d] rows: on XLA:CPU the weight
    # gradient of a matmul contracting over both B and T was measured
    # ~1.6x slower than the same matmul over flattened rows.
    batch_shape = h.shape[:-1]
    h = h.reshape(-1, self.embed_dim)
    for layer_index in range(self.num_layers):
      h = DecoderBlock(self.num_heads, self.mlp_dim, length,
                       self.dropout_rate,
                       name=f"block_{layer_index}")(h, train=train)
    h = nn.LayerNorm(epsilon=_LAYER_NORM_EPSILON, name="final_norm")(h)
    if self.tie_embeddings:
      logits = embed.attend(h)
    else:
      logits = nn.Dense(self.vocab_size, name="output")(h)
    return logits.reshape(*batch_shape, self.vocab_size)


def transformer_lm_num_params(vocab_size: int = sequence.STACKOVERFLOW_NUM_IDS,
                              context_length: int = 20, embed_dim: int = 96,
                              mlp_dim: int = 1536, num_layers: int = 3,
                              tie_embeddings: bool = True) -> int:
  """Analytic parameter count of :class:`TransformerLM` (heads add none).

  Per block: attention ``4 d^2 + 4 d`` (q, k, v and output projections with
  biases), MLP ``2 d m + m + d``, two LayerNorms ``4 d``.
  """
  d, m = embed_dim, mlp_dim
  block = (4 * d * d + 4 * d) + (2 * d * m + m + d) + 4 * d
  total = vocab_size * d + context_length * d + num_layers * block + 2 * d
  if not tie_embeddings:
    total += d * vocab_size + vocab_size
  return total


def transformer_lm_model(input_shape: tuple[int, ...] = (20,),
                         num_classes: int = sequence.STACKOVERFLOW_NUM_IDS,
                         embed_dim: int = 96, num_heads: int = 8,
                         mlp_dim: int = 1536, num_layers: int = 3,
                         dropout_rate: float = 0.1,
                         tie_embeddings: bool = True, pad_id: int = 0,
                         oov_id: int | None = None, bos_id: int | None = None,
                         eos_id: int | None = None) -> Model:
  """The transformer language model as a :class:`Model`.

  Args:
    input_shape: ``(T,)``, the context length (sequence length of ``x``).
    num_classes: number of token ids (inputs and outputs share them);
      10,004 for Stack Overflow (10,000 words + pad, OOV, BOS, EOS).
    embed_dim: model width ``d`` (embedding and hidden size).
    num_heads: attention heads; must divide ``embed_dim``.
    mlp_dim: hidden units of each block's MLP.
    num_layers: decoder blocks.
    dropout_rate: dropout after the embeddings and on every residual branch
      (active only when ``apply`` gets ``train=True`` and an ``rng``).
    tie_embeddings: output logits ``h @ embedding^T`` (no separate output
      layer) instead of a ``Dense(num_classes)``.
    pad_id, oov_id, bos_id, eos_id: special token ids; ``None`` takes TFF's
      Stack Overflow layout ``num_classes - 3``, ``- 2``, ``- 1``.

  ``batch['x']`` and ``batch['y']`` are int ``[B, T]`` (``y`` is ``x``
  shifted by one); logits are ``[B, T, num_classes]``.
  """
  oov_id, bos_id, eos_id = sequence.default_special_ids(num_classes, oov_id,
                                                       bos_id, eos_id)
  sequence.check_sequence_args(
      input_shape, num_classes, (pad_id, oov_id, bos_id, eos_id),
      {"embed_dim": embed_dim, "num_heads": num_heads, "mlp_dim": mlp_dim,
       "num_layers": num_layers})
  if embed_dim % num_heads:
    raise ValueError(f"num_heads={num_heads} must divide embed_dim="
                     f"{embed_dim}")
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
  module = TransformerLM(vocab_size=num_classes,
                         context_length=int(input_shape[0]),
                         embed_dim=embed_dim, num_heads=num_heads,
                         mlp_dim=mlp_dim, num_layers=num_layers,
                         dropout_rate=dropout_rate,
                         tie_embeddings=bool(tie_embeddings))
  loss, metrics = sequence.next_token_functions(pad_id, oov_id, bos_id, eos_id)
  example_x = jnp.zeros((1, *input_shape), jnp.int32)
  return from_flax(module, example_x, example_loss=loss,
                   example_metrics=metrics, name="transformer_lm")

