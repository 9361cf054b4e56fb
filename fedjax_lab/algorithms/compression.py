"""Compression of client updates: quantization, sparsification, error feedback.

A :class:`Compressor` is a pair of pure functions in optax style:
``init(delta_template) -> state`` gives one client's persistent compressor
state (``()`` if none) and ``compress(delta, state, rng) -> (decoded_delta,
state, bits)`` simulates encoding on the client and decoding on the server:
``decoded_delta`` is what the server reconstructs and ``bits`` (float32
scalar) the exact size of the encoded message. Compressors:

* :func:`identity`: the uncompressed float32 update, ``32 d`` bits.
* :func:`stochastic_quantization`: unbiased stochastic uniform quantization
  to ``2^b`` levels (Suresh et al., "Distributed Mean Estimation with Limited
  Communication", ICML 2017), optionally after their randomized Hadamard
  rotation (:mod:`fedjax_lab.algorithms.hadamard`).
* :func:`top_k`: keep the ``k`` largest-magnitude coordinates, by default with
  error feedback (Stich et al., "Sparsified SGD with Memory", NeurIPS 2018;
  Karimireddy et al., "Error Feedback Fixes SignSGD and other Gradient
  Compression Schemes", ICML 2019).
* :func:`with_error_feedback`: adds the residual memory to any compressor.

:func:`compress` makes a compressor a link of the aggregation chain
(:func:`fedjax_lab.algorithms.base.chain`), so it composes with any
algorithm: the compression is vectorised over the cohort with the rest of
the client computation, and the compressor state (e.g. the error-feedback
residual) is per-client aggregation state, so only the sampled clients' rows
of the host-side store change in a round.

Composition with differential privacy (``privacy.mechanisms.
build_aggregator`` builds the chain):

1. the algorithm computes the client's delta;
2. with central DP of fixed clip norm C, a ``clip(C)`` link
   (:func:`fedjax_lab.privacy.clipping.clip`) clips it first, so the
   compressor and its error feedback only ever see the clipped update;
3. the ``compress`` link encodes and decodes it (this may lengthen it
   slightly: stochastic rounding can move every coordinate outwards);
4. the DP link (``privacy.aggregators.gaussian_sum``, ``adaptive_clipping``,
   ``privacy.tree.tree_aggregator``) clips the decoded update again, which is
   what bounds each client's contribution, and adds the Gaussian noise to
   the sum on the server as before. The sensitivity and the noise are those
   of the uncompressed mechanism, so the privacy accounting is unchanged
   (compression is post-processing of the client's own data on the client).

With error feedback the compressed vector is ``clip(delta) + residual``,
which can be longer than the clip norm; what the DP link's clip then cuts
is not fed back. With ``adaptive_clipping`` (clip norm changing per round)
there is no fixed pre-clip.

Local DP (``privacy.aggregators.local_gaussian``) does not compose correctly:
its noise would be added after decoding, i.e. to a message the client never
sent, and a real client would have to transmit the noised full-precision
update (the bit count would be wrong) or compress after noising (a different
mechanism). The refusal table (``privacy.refusals``) refuses the pair.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import hadamard
from fedjax_lab.algorithms.tree_math import global_norm
from fedjax_lab.algorithms.tree_math import num_parameters

PyTree = base.PyTree
ROTATIONS = ("none", "hadamard")
# Bits of one transmitted float (values, minima, maxima): float32.
FLOAT_BITS = 32
# Folded into the client's key so the compressor's randomness is independent
# of the keys the inner algorithm splits off for local training.
_COMPRESSION_RNG_TAG = 0x51A7


class Compressor(NamedTuple):
  """An update compressor as pure functions (see the module docstring).

  Attributes:
    init: ``init(delta_template) -> state`` for one client; the template is
      any pytree of arrays (or ``jax.ShapeDtypeStruct``) shaped like the delta.
    compress: ``compress(delta, state, rng) -> (decoded_delta, state, bits)``;
      ``bits`` is exact as a float32 up to 2^24 (relative error < 6e-8
      beyond).
    name: short label used in algorithm names (``"q8"``, ``"topk0.01-ef"``).
  """

  init: Callable[[PyTree], PyTree]
  compress: Callable[[PyTree, PyTree, jax.Array],
                     tuple[PyTree, PyTree, jax.Array]]
  name: str = "compressor"


def _stateless(template: PyTree) -> tuple[()]:
  del template
  return ()


def index_bits(size: int) -> int:
  """``ceil(log2 size)``: bits to address one of ``size`` coordinates."""
  return max(int(size) - 1, 0).bit_length()


def identity() -> Compressor:
  """No compression: the float32 update as is, ``32 d`` bits (``d`` scalars)."""

  def compress(delta, state, rng):
    del rng
    bits = FLOAT_BITS * num_parameters(delta)
    return delta, state, jnp.asarray(bits, jnp.float32)

  return Compressor(init=_stateless, compress=compress, name="fp32")


def quantize_vector(vector: jax.Array, num_bits: int,
                    rng: jax.Array) -> jax.Array:
  """Unbiased stochastic uniform quantization of ``vector``, decoded.

  Suresh et al. 2017 (ICML), Sec. 3: with ``lo = min(vector)``, ``hi =
  max(vector)`` and ``s = (hi - lo) / (2^b - 1)``, each coordinate ``x`` is
  sent as the level index ``floor(t) + Bernoulli(t - floor(t))``,
  ``t = (x - lo) / s``, and decoded as ``lo + index * s``. The decoded value is
  one of the two grid points around ``x`` with ``E[decoded] = x`` and variance
  ``(x - g_low)(g_high - x) <= s^2 / 4``. A constant vector is sent exactly.

  Args:
    vector: ``[d]`` float32 array (``d >= 1``).
    num_bits: ``b``, bits per coordinate (``2^b`` levels).
    rng: key for the stochastic rounding.

  Returns:
    ``[d]`` decoded vector (what the server reconstructs).
  """
  return _quantize(vector, num_bits, jax.random.uniform(rng, vector.shape))


def _quantize(vector, num_bits, uniforms):
  """:func:`quantize_vector` given its ``[d]`` uniform draws in ``[0, 1)``."""
  num_steps = jnp.asarray(2.0**num_bits - 1.0, jnp.float32)
  low, high = jnp.min(vector), jnp.max(vector)
  step = (high - low) / num_steps
  position = (vector - low) / jnp.where(step > 0, step, 1.0)
  lower = jnp.floor(position)
  round_up = (uniforms < position - lower).astype(jnp.float32)
  level = jnp.clip(lower + round_up, 0.0, num_steps)
  return low + level * step


def _split_vectors(tree: PyTree, per_leaf: bool):
  """The vectors a quantizer encodes separately, and how to rebuild the tree."""
  if per_leaf:
    leaves, treedef = jax.tree.flatten(tree)
    vectors = [jnp.ravel(leaf).astype(jnp.float32) for leaf in leaves]

    def rebuild(decoded):
      return treedef.unflatten([d.reshape(leaf.shape).astype(leaf.dtype)
                                for d, leaf in zip(decoded, leaves)])
    return vectors, rebuild
  flat, unravel = ravel_pytree(tree)
  return [flat.astype(jnp.float32)], lambda decoded: unravel(
      decoded[0].astype(flat.dtype))


def stochastic_quantization(num_bits: int, rotation: str = "none",
                            per_leaf: bool = True) -> Compressor:
  """Stochastic uniform ``b``-bit quantization (Suresh et al., ICML 2017).

  Every leaf (``per_leaf=True``) or the whole flattened update is one vector
  ``v`` of ``d_v`` scalars, quantized by :func:`quantize_vector`. With
  ``rotation="hadamard"`` the client first applies the randomized Hadamard
  rotation (:func:`hadamard.rotate`; ``v`` zero-padded to ``n_v``, the next
  power of two), quantizes the ``n_v`` rotated coordinates and the server
  inverts the rotation; the rotation seed is derived from the client's key,
  which the server shares, so it is not transmitted. Both variants are
  unbiased: ``E[decoded] = delta``.

  Bits on the wire, summed over the vectors:
  ``m_v * b + 2 * 32`` with ``m_v = d_v`` (no rotation) or ``n_v``
  (Hadamard): ``b`` bits per transmitted coordinate plus the vector's float32
  minimum and maximum.

  Args:
    num_bits: ``b`` in ``[1, 32]``; 32 is lossless up to float32 rounding.
    rotation: ``"none"`` or ``"hadamard"``.
    per_leaf: one scale (min/max) and rotation per leaf, or one for all.

  Raises:
    ValueError: ``num_bits`` outside ``[1, 32]`` or an unknown ``rotation``.
  """
  if not 1 <= num_bits <= 32 or int(num_bits) != num_bits:
    raise ValueError(f"num_bits must be an integer in [1, 32], got "
                     f"{num_bits}.")
  if rotation not in ROTATIONS:
    raise ValueError(f"rotation must be one of {ROTATIONS}, got "
                     f"{rotation!r}.")
  num_bits = int(num_bits)
  rotate = rotation == "hadamard"

  def compress(delta, state, rng):
    vectors, rebuild = _split_vectors(delta, per_leaf)
    sizes = [vector.shape[0] for vector in vectors]
    sent_sizes = [hadamard.next_power_of_two(size) if rotate and size else
                  size for size in sizes]
    offsets = np.cumsum([0] + sent_sizes)
    # One draw for all vectors (fewer random-number kernels to compile).
    rotation_key, rounding_key = jax.random.split(rng)
    uniforms = jax.random.uniform(rounding_key, (int(offsets[-1]),))
    if rotate:
      signs = hadamard.random_signs(rotation_key, int(offsets[-1]))
    decoded = []
    for vector, size, start, stop in zip(vectors, sizes, offsets[:-1],
                                         offsets[1:]):
      if size == 0:
        decoded.append(vector)
      elif rotate:
        rotated = hadamard.rotate(vector, signs[start:stop])
        decoded.append(hadamard.unrotate(
            _quantize(rotated, num_bits, uniforms[start:stop]),
            signs[start:stop], size))
      else:
        decoded.append(_quantize(vector, num_bits, uniforms[start:stop]))
    bits = sum(sent * num_bits + 2 * FLOAT_BITS for sent in sent_sizes if sent)
    return rebuild(decoded), state, jnp.asarray(bits, jnp.float32)

  name = f"q{num_bits}" + ("-hadamard" if rotate else "") + (
      "" if per_leaf else "-flat")
  return Compressor(init=_stateless, compress=compress, name=name)


def with_error_feedback(compressor: Compressor) -> Compressor:
  """``compressor`` with error feedback (Stich et al. 2018; Karimireddy et al.
  2019).

  The client keeps the residual ``e`` (what earlier rounds did not send);
  each round it compresses ``v = delta + e``, sends ``C(v)`` and keeps
  ``e <- v - C(v)``. Over any number of rounds, ``sum of sent updates + final
  residual = sum of raw deltas``. The state is ``(residual, inner_state)``,
  the residual float32 zeros shaped like the delta at first; bits are the
  inner compressor's.
  """

  def init(template):
    residual = jax.tree.map(lambda t: jnp.zeros(t.shape, jnp.float32),
                            template)
    return (residual, compressor.init(template))

  def compress(delta, state, rng):
    residual, inner_state = state
    corrected = jax.tree.map(lambda d, e: d.astype(jnp.float32) + e, delta,
                             residual)
    decoded, inner_state, bits = compressor.compress(corrected, inner_state,
                                                     rng)
    residual = jax.tree.map(jnp.subtract, corrected, decoded)
    decoded = jax.tree.map(lambda s, d: s.astype(d.dtype), decoded, delta)
    return decoded, (residual, inner_state), bits

  return Compressor(init=init, compress=compress,
                    name=f"{compressor.name}-ef")


def top_k(fraction: float | None = None, k: int | None = None,
          error_feedback: bool = True) -> Compressor:
  """Top-k sparsification of the flattened update (Stich et al. 2018).

  Keeps the ``k`` coordinates of largest magnitude of the whole update
  (all leaves flattened together, ``d`` scalars) and zeroes the rest; ties
  are broken towards lower indices. Bits: ``k * (32 + ceil(log2 d))``, a
  float32 value and an index for every kept coordinate.

  Args:
    fraction: ``k = max(1, round(fraction * d))``, in ``(0, 1]``.
    k: a fixed number of coordinates (``min(k, d)`` are kept); give exactly
      one of ``fraction`` and ``k``.
    error_feedback: wrap in :func:`with_error_feedback` (the default, as in
      the papers: sparsification without memory is biased).

  Raises:
    ValueError: neither or both of ``fraction``/``k``, or out of range.
  """
  if (fraction is None) == (k is None):
    raise ValueError("top_k needs exactly one of fraction and k.")
  if fraction is not None and not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
  if k is not None and (k < 1 or int(k) != k):
    raise ValueError(f"k must be a positive integer, got {k}.")

  def compress(delta, state, rng):
    del rng
    flat, unravel = ravel_pytree(delta)
    size = flat.shape[0]
    if size == 0:
      return delta, state, jnp.zeros([], jnp.float32)
    kept = min(size, int(k) if k is not None else max(
        1, round(fraction * size)))
    _, indices = jax.lax.top_k(jnp.abs(flat), kept)
    sparse = jnp.zeros_like(flat).at[indices].set(flat[indices])
    bits = kept * (FLOAT_BITS + index_bits(size))
    return unravel(sparse), state, jnp.asarray(bits, jnp.float32)

  label = f"topk{fraction:g}" if k is None else f"top{int(k)}"
  sparsifier = Compressor(init=_stateless, compress=compress, name=label)
  return with_error_feedback(sparsifier) if error_feedback else sparsifier


def compress(compressor: Compressor) -> base.Transform:
  """A chain link whose clients upload ``compressor``-compressed deltas.

  Compression as a link of the aggregation chain (Konečný et al. 2016,
  "Federated Learning: Strategies for Improving Communication Efficiency";
  Suresh et al. 2017), so it composes with any algorithm and aggregator:
  ``chain(clip(C), compress(top_k(fraction=0.01)), gaussian_sum(...))``.
  Each client's delta is replaced by the decoded compressed delta; weights
  pass through; ``finalize`` passes the sum through.

  Per-client state: the compressor's (e.g. the error-feedback residual of
  Stich et al. 2018 / Karimireddy et al. 2019), kept by the engine next to
  the algorithm's per-client state; only the round's real clients' rows
  change. The compressor's key is ``fold_in(public_key, tag)`` of the
  client's training key (the server shares it, e.g. for the Hadamard signs),
  so a client's result does not depend on its position in the cohort.

  Per-client metrics (averaged over the round's real clients):
  ``bits_uploaded`` (bits of the message), ``compression_error_norm``
  (``||decoded - delta||``, ``delta`` as this link receives it) and
  ``compression_relative_error`` (that over ``||delta||``, 0 for a zero
  delta).
  """

  def client_transform(delta, weight, state, client_state, keys):
    del state
    rng = jax.random.fold_in(keys.public, _COMPRESSION_RNG_TAG)
    decoded, client_state, bits = compressor.compress(delta, client_state,
                                                      rng)
    error_norm = global_norm(jax.tree.map(jnp.subtract, decoded, delta))
    delta_norm = global_norm(delta)
    metrics = {
        "bits_uploaded": bits,
        "compression_error_norm": error_norm,
        "compression_relative_error": jnp.where(
            delta_norm > 0, error_norm / jnp.maximum(delta_norm, 1e-30), 0.0)}
    return decoded, weight, client_state, metrics

  def finalize(value, total_weight, num_clients, state, rng):
    del total_weight, num_clients, rng
    return value, state, {}

  return base.Transform(init=lambda: (), client_transform=client_transform,
                        finalize=finalize, client_init=compressor.init)
