"""Single-file states: pytrees of arrays saved to and loaded from ``.npz``.

A state file (e.g. a run's ``final_state.npz``) is one ``.npz`` holding the
leaves in tree order; loading needs a template with the same structure (e.g.
a freshly initialised state). Writes go to a temporary file that is synced
and renamed into place, so an interrupted or failed write (a crash, a full
disk) never leaves a truncated file where a good one was. The run's resumable
checkpoints are orbax directories instead
(:mod:`fedjax_lab.training.run_checkpoints`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.training import metrics_io

PyTree = Any


def is_prng_key(leaf: Any) -> bool:
  """Whether ``leaf`` is a typed JAX PRNG key array (or the shape of one)."""
  return (isinstance(leaf, (jax.Array, jax.ShapeDtypeStruct))
          and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key))


def save_pytree(path: str, tree: PyTree) -> str:
  """Writes ``tree``'s leaves to ``path`` (``.npz``) atomically; returns path.

  On failure (e.g. ``OSError`` ENOSPC) the previous file at ``path``, if any,
  is left as it was and the temporary file is removed.
  """
  leaves = jax.tree.leaves(jax.device_get(tree))
  arrays = {f"leaf_{i:05d}": np.asarray(jax.random.key_data(leaf)
                                        if is_prng_key(leaf) else leaf)
            for i, leaf in enumerate(leaves)}
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  with metrics_io.atomic_write(path, "wb") as f:
    np.savez(f, **arrays)
  return path


def load_pytree(path: str, like: PyTree) -> PyTree:
  """Reads a file written by :func:`save_pytree` into ``like``'s structure.

  ``like`` may hold arrays or ``jax.ShapeDtypeStruct`` s (``jax.eval_shape``
  of the state: nothing is computed to get the template).

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
      if is_prng_key(template):
        restored.append(jax.random.wrap_key_data(
            value, impl=jax.random.key_impl(template)))
        continue
      if np.shape(value) != np.shape(template):
        raise ValueError(f"{path}: array {i} has shape {value.shape}, "
                         f"expected {np.shape(template)}.")
      dtype = (template.dtype if isinstance(template, jax.ShapeDtypeStruct)
               else jnp.asarray(template).dtype)
      restored.append(jnp.asarray(value, dtype=dtype))
  return jax.tree.unflatten(treedef, restored)
