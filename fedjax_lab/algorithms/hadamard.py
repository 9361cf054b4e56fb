"""The fast Walsh–Hadamard transform and the randomized Hadamard rotation.

Suresh, Yu, Kumar & McMahan, "Distributed Mean Estimation with Limited
Communication", ICML 2017, Sec. 4: before quantizing, a client rotates its
vector ``x`` (length ``d``, zero-padded to ``n = 2^m``) by
``R = H D / sqrt(n)``, with ``H`` the ``n x n`` Sylvester–Hadamard matrix and
``D`` a diagonal of independent random signs. ``R`` is orthogonal, so the
server inverts it with ``R^T = D H / sqrt(n)``; the rotated coordinates have a
range of about ``||x|| sqrt(log n / n)`` instead of up to ``2 ||x||``, which
shrinks the quantization error of spiky vectors. The signs come from a seed
the server shares with the client, so the rotation costs no bits.

:func:`fwht` computes ``H x`` in ``O(n log n)`` with ``log2 n`` butterfly
stages, each a reshape plus one add and one subtract over the whole vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def next_power_of_two(size: int) -> int:
  """The smallest power of two ``>= size`` (1 for ``size <= 1``)."""
  return 1 if size <= 1 else 1 << (int(size) - 1).bit_length()


def fwht(x: jax.Array) -> jax.Array:
  """Unnormalised fast Walsh–Hadamard transform along the last axis.

  Returns ``H_n x`` for ``x`` of shape ``[..., n]``, ``n`` a power of two,
  where ``H_n`` is Sylvester's Hadamard matrix (``H_1 = [1]``,
  ``H_2k = [[H_k, H_k], [H_k, -H_k]]``, the ordering of
  ``scipy.linalg.hadamard``). ``H_n H_n = n I``, so ``fwht(fwht(x)) = n x``.

  Stage ``h = 1, 2, 4, ...`` views the vector as blocks of ``2h`` and replaces
  each block's halves ``(a, b)`` by ``(a + b, a - b)``.

  Raises:
    ValueError: the last axis is not a power of two.
  """
  size = x.shape[-1]
  if size < 1 or size & (size - 1):
    raise ValueError(f"fwht needs a power-of-two length, got {size}.")
  batch_shape = x.shape[:-1]
  half = 1
  while half < size:
    blocks = x.reshape(batch_shape + (size // (2 * half), 2, half))
    first, second = blocks[..., 0, :], blocks[..., 1, :]
    x = jnp.stack([first + second, first - second], axis=-2)
    half *= 2
  return x.reshape(batch_shape + (size,))


def random_signs(rng: jax.Array, size: int,
                 dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """The diagonal of ``D``: ``size`` independent uniform ``+-1`` values."""
  return jax.random.rademacher(rng, (size,), dtype=dtype)


def rotate(vector: jax.Array, signs: jax.Array) -> jax.Array:
  """``H D pad(vector) / sqrt(n)``: the randomized Hadamard rotation.

  Args:
    vector: ``[d]`` float array.
    signs: ``[n]`` diagonal of ``D`` (``n = next_power_of_two(d)``), drawn
      with :func:`random_signs` from the seed client and server share; the
      same signs invert the rotation in :func:`unrotate`.

  Returns:
    ``[n]`` rotated vector; its L2 norm equals ``vector``'s.

  Raises:
    ValueError: ``signs`` does not have length ``next_power_of_two(d)``.
  """
  size = vector.shape[0]
  padded_size = next_power_of_two(size)
  if signs.shape != (padded_size,):
    raise ValueError(f"rotating {size} values needs {padded_size} signs, got "
                     f"shape {signs.shape}.")
  padded = jnp.pad(vector, (0, padded_size - size))
  scale = jnp.sqrt(jnp.asarray(padded_size, vector.dtype))
  return fwht(padded * signs.astype(vector.dtype)) / scale


def unrotate(rotated: jax.Array, signs: jax.Array, size: int) -> jax.Array:
  """Inverse of :func:`rotate`: ``(D H rotated / sqrt(n))[:size]``.

  Args:
    rotated: ``[n]`` vector in the rotated basis (``n`` a power of two).
    signs: the ``[n]`` signs :func:`rotate` used.
    size: ``d``, the length of the original vector.

  Returns:
    ``[size]`` vector; ``unrotate(rotate(x, s), s, len(x)) == x`` up to float
    rounding.
  """
  scale = jnp.sqrt(jnp.asarray(rotated.shape[0], rotated.dtype))
  return (fwht(rotated) / scale * signs.astype(rotated.dtype))[:size]
