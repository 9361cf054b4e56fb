"""Saving and restoring pytrees of arrays (model and server state) atomically.

A state file is one ``.npz`` holding the leaves in tree order; restoring needs
a template with the same structure (e.g. a freshly initialised state). Writes
go to a temporary file first and are renamed into place, so an interrupted
write never leaves a truncated file where a good one was.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any


def _is_key(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype,
                                                         jax.dtypes.prng_key)


def save_pytree(path: str, tree: PyTree) -> str:
  """Writes ``tree``'s leaves to ``path`` (``.npz``) atomically; returns path."""
  leaves = jax.tree.leaves(jax.device_get(tree))
  arrays = {f"leaf_{i:05d}": np.asarray(jax.random.key_data(leaf)
                                        if _is_key(leaf) else leaf)
            for i, leaf in enumerate(leaves)}
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  tmp_path = path + ".tmp"
  with open(tmp_path, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp_path, path)
  return path


def load_pytree(path: str, like: PyTree) -> PyTree:
  """Reads a file written by :func:`save_pytree` into ``like``'s structure.

  Raises:
    FileNotFoundError: no file at ``path``.
    ValueError: the file does not match ``like`` (leaf count or shapes).
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"no saved state at {path}.")
  leaves, treedef = jax.tree.flatten(like)
  with np.load(path) as data:
    if len(data.files) != len(leaves):
      raise ValueError(f"{path} holds {len(data.files)} arrays but the "
                       f"expected state has {len(leaves)}; it was written by "
                       "a different model or algorithm.")
    restored = []
    for i, template in enumerate(leaves):
      value = data[f"leaf_{i:05d}"]
      if _is_key(template):
        restored.append(jax.random.wrap_key_data(
            value, impl=jax.random.key_impl(template)))
        continue
      if np.shape(value) != np.shape(template):
        raise ValueError(f"{path}: array {i} has shape {value.shape}, "
                         f"expected {np.shape(template)}.")
      restored.append(jnp.asarray(value, dtype=jnp.asarray(template).dtype))
  return jax.tree.unflatten(treedef, restored)
