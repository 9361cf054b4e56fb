"""Helpers shared by the model tests: parameter counts, tree comparison,
random image and character batches."""

from __future__ import annotations

import jax
import numpy as np


def count_params(params) -> int:
  """How many numbers a parameter tree (or its shapes) holds."""
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def assert_trees_close(tree_a, tree_b, atol=1e-5, rtol=1e-5):
  """Same structure, leaves equal within the tolerances."""
  assert jax.tree.structure(tree_a) == jax.tree.structure(tree_b)
  for leaf_a, leaf_b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
    np.testing.assert_allclose(leaf_a, leaf_b, atol=atol, rtol=rtol)


def image_batch(batch_size: int, num_classes: int = 62, seed: int = 0,
                leading: tuple[int, ...] = ()):
  """Random 28x28x1 images and labels (``leading`` axes first)."""
  key_x, key_y = jax.random.split(jax.random.key(seed))
  return {
      "x": jax.random.uniform(key_x, (*leading, batch_size, 28, 28, 1)),
      "y": jax.random.randint(key_y, (*leading, batch_size), 0, num_classes),
  }


def char_batch(batch_size: int, seq_len: int = 80, seed: int = 0):
  """Random next-character sequences (inputs and shifted labels)."""
  tokens = jax.random.randint(jax.random.key(seed), (batch_size, seq_len + 1),
                              1, 90)
  return {"x": tokens[:, :-1], "y": tokens[:, 1:]}
