"""Low-level pytree arithmetic shared by algorithms and the privacy layer.

L2 clipping of a whole update pytree (one norm over every leaf), its size and
norm, and float32 zeros shaped like a tree. Nothing here knows about
federated rounds; :mod:`fedjax_lab.privacy.clipping` re-exports the clipping
helpers, and compression (an algorithm wrapper) uses them directly.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def num_parameters(tree: PyTree) -> int:
  """``d``: the total number of scalars in all leaves of ``tree``."""
  return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm of all leaves of ``tree`` taken together (float32 scalar)."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros([], jnp.float32)
  return jnp.sqrt(sum(jnp.sum(jnp.square(leaf.astype(jnp.float32)))
                      for leaf in leaves))


def clip_to_norm(tree: PyTree, clip_norm: jax.Array | float
                 ) -> tuple[PyTree, jax.Array]:
  """Scales ``tree`` down so its global L2 norm is at most ``clip_norm``.

  ``tree * min(1, clip_norm / ||tree||)``: updates already inside the ball
  are unchanged, longer ones keep their direction. An infinite ``clip_norm``
  is the identity. A tree with a non-finite norm (NaN/inf anywhere, e.g. a
  client whose local training diverged) becomes all zeros: NaN would carry
  through the noised sum and break the bound ``||clipped|| <= clip_norm``
  the DP guarantee rests on. Returns ``(clipped_tree,
  norm_before_clipping)``.
  """
  norm = global_norm(tree)
  finite = jnp.isfinite(norm)
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))
  clipped = jax.tree.map(
      lambda leaf: jnp.where(finite, leaf * scale, 0).astype(leaf.dtype),
      tree)
  return clipped, norm


def zeros_like_f32(tree: PyTree) -> PyTree:
  """float32 zeros shaped like every leaf of ``tree``."""
  return jax.tree.map(lambda a: jnp.zeros(jnp.shape(a), jnp.float32), tree)
