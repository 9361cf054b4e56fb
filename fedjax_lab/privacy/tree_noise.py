"""Tree-aggregation noise: the binary-tree mechanism's node draws and sums.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep)
Learning without Sampling or Shuffling", ICML 2021 (arXiv:2103.00039).

The noise ``N_t`` on the prefix sum ``S_t = g_1 + ... + g_t`` is the sum of
the nodes of ``t``'s binary decomposition (one node per set bit of ``t``);
the noise of node ``(level, index)`` of a tree is a pure function of the
tree's key and the node id, so a node shared by several prefixes is the
*same* draw in each of them and nothing about past draws has to be stored.
:func:`prefix_noise_increment` draws ``N_t - N_{t-1}``, the noise on the
gradient DP-FTRL steps on. :mod:`fedjax_lab.privacy.tree` builds the
aggregator and the server optimizer on these.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.checks import check_int

PyTree = Any


def _check_float(name: str, value: float, minimum: float,
                 maximum: float = math.inf, *, open_min: bool = False,
                 open_max: bool = False) -> float | jax.Array:
  """Returns ``value`` as float after checking its type and range.

  A traced ``value`` (a sweep member's hyperparameter under ``vmap``/``jit``)
  is returned unchanged and unchecked: it was checked on the members'
  concrete values.
  """
  if isinstance(value, jax.core.Tracer):
    return value
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.integer, np.floating)):
    raise TypeError(f"{name} must be a number, got {value!r}.")
  value = float(value)
  low_ok = value > minimum if open_min else value >= minimum
  high_ok = value < maximum if open_max else value <= maximum
  if not (low_ok and high_ok and math.isfinite(value)):  # Also rejects NaN.
    low = "(" if open_min else "["
    high = ")" if open_max else "]"
    raise ValueError(f"{name} must be finite and in {low}{minimum}, "
                     f"{maximum}{high}, got {value!r}.")
  return value


def tree_depth(max_steps: int) -> int:
  """Number of tree levels needed for steps ``1..max_steps``.

  This is the bit length of ``max_steps``: step ``t <= max_steps`` only has
  set bits below it, so :func:`prefix_noise` needs that many node draws.

  Args:
    max_steps: the largest (1-based) step of a tree, ``>= 1``.

  Returns:
    ``max_steps.bit_length()`` (1 for one step, 3 for 4..7 steps, ...).
  """
  return check_int("max_steps", max_steps, 1).bit_length()


def tree_noise_key(noise_key: jax.Array, tree_index: jax.Array | int
                   ) -> jax.Array:
  """The key of tree ``tree_index`` of a :func:`dp_ftrl` run.

  ``fold_in(noise_key, tree_index)``: every restarted tree gets fresh,
  independent node noise. ``noise_key`` must be a secret PRNG key (never one
  derived from a published seed, or the noise can be regenerated and
  subtracted). Works with a traced ``tree_index``.
  """
  return jax.random.fold_in(noise_key, jnp.asarray(tree_index, jnp.int32))


def _shape_and_dtype(leaf: Any) -> tuple[tuple[int, ...], Any]:
  """Shape and floating dtype of a template leaf (array or ShapeDtypeStruct)."""
  if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
    shape, dtype = tuple(leaf.shape), leaf.dtype
  else:
    arr = jnp.asarray(leaf)
    shape, dtype = arr.shape, arr.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(f"prefix noise needs floating-point leaves, got {dtype}.")
  return shape, dtype


def prefix_noise(tree_key: jax.Array, step: jax.Array | int,
                 template_pytree: PyTree, noise_std: jax.Array | float,
                 num_levels: int) -> PyTree:
  """Tree-aggregation noise on the prefix sum ``S_step`` of one tree.

  For each set bit ``level`` of ``step`` (1-based), node ``(level,
  step >> level)`` contributes ``noise_std * normal(k)`` with
  ``k = fold_in(fold_in(tree_key, level), step >> level)`` (folded once more
  with the leaf's index for each leaf of the pytree). The result is the sum of
  those nodes, so its per-coordinate standard deviation is
  ``noise_std * sqrt(popcount(step))`` (see :func:`prefix_noise_std`), and two
  prefixes that share a node share that node's draw exactly. Step 0 gets no
  noise (the empty prefix).

  Exactly ``num_levels`` nodes are drawn per call and masked with
  ``jnp.where`` on the traced bits, so this is jit-friendly. Bits of ``step``
  at or above ``num_levels`` are ignored: pass
  ``num_levels >= tree_depth(max_step)``.

  Args:
    tree_key: the tree's PRNG key (e.g. :func:`tree_noise_key`).
    step: 1-based step within the tree, an int32 scalar (may be traced).
    template_pytree: pytree of floating arrays (or ``ShapeDtypeStruct``) whose
      shapes and dtypes the noise takes.
    noise_std: standard deviation of each node's noise (may be traced).
    num_levels: static number of tree levels, :func:`tree_depth` of the
      tree's largest step.

  Returns:
    A pytree like ``template_pytree`` holding the noise.
  """
  num_levels = check_int("num_levels", num_levels, 0)
  step = jnp.asarray(step, jnp.int32)
  leaves, treedef = jax.tree.flatten(template_pytree)
  specs = [_shape_and_dtype(leaf) for leaf in leaves]
  noise = [jnp.zeros(shape, dtype) for shape, dtype in specs]
  for level in range(num_levels):
    node_index = jnp.right_shift(step, level)
    bit_set = jnp.bitwise_and(node_index, 1) == 1
    for i, node in enumerate(_node(tree_key, level, node_index, specs,
                                   noise_std)):
      noise[i] = noise[i] + jnp.where(bit_set, node, jnp.zeros_like(node))
  return jax.tree.unflatten(treedef, noise)


def _node(tree_key, level, node_index, specs, noise_std) -> list[jax.Array]:
  """Node ``(level, node_index)``'s noise, one draw per leaf of ``specs``:
  ``noise_std * normal(fold_in(fold_in(fold_in(tree_key, level),
  node_index), leaf))``."""
  node_key = jax.random.fold_in(jax.random.fold_in(tree_key, level),
                                node_index)
  return [(noise_std * jax.random.normal(jax.random.fold_in(node_key, i),
                                         shape, dtype)).astype(dtype)
          for i, (shape, dtype) in enumerate(specs)]


# Levels at or above this hold no set bit of a non-negative int32 step.
_INT32_LEVELS = 31


def prefix_noise_increment(tree_key: jax.Array, step: jax.Array | int,
                           template_pytree: PyTree,
                           noise_std: jax.Array | float,
                           num_levels: int) -> PyTree:
  """Noise ``N_step - N_{step-1}`` on DP-FTRL's noisy gradient ``ĝ_step``.

  Kairouz et al. 2021: the gradient DP-FTRL steps on within a tree is
  ``ĝ_t = Ŝ_t - Ŝ_{t-1} = g_t + (N_t - N_{t-1})`` with ``N_t`` the
  :func:`prefix_noise` of step ``t``. With ``k`` the lowest set bit of ``t``,
  ``t`` and ``t - 1`` share every node above level ``k`` (those cancel), ``t``
  adds node ``(k, t >> k)`` and ``t - 1`` has the nodes ``(l, (t - 1) >> l)``
  for every ``l < k`` (its bits below ``k`` are all set). So this draws one
  node per level, as one :func:`prefix_noise` call does, with the same keys,
  and returns ``prefix_noise(t) - prefix_noise(t - 1)`` up to float rounding
  (bits at or above ``num_levels`` are ignored in both). Per coordinate the
  variance is ``noise_std**2 * (k + 1)`` for ``t < 2**num_levels``:
  ``noise_std**2`` at odd steps, ``3 noise_std**2`` at step 4. Step 1 gives
  ``prefix_noise(1)``; step 0 gives zeros. Jit-friendly with a traced ``step`` and ``noise_std``.

  Args:
    tree_key: the tree's PRNG key (secret).
    step: 1-based step within the tree, a non-negative int32 scalar (may be
      traced).
    template_pytree: pytree of floating arrays (or ``ShapeDtypeStruct``) whose
      shapes and dtypes the noise takes.
    noise_std: standard deviation of each node's noise (may be traced).
    num_levels: static number of tree levels, :func:`tree_depth` of the
      tree's largest step.

  Returns:
    A pytree like ``template_pytree`` holding the noise increment.
  """
  num_levels = check_int("num_levels", num_levels, 0)
  step = jnp.asarray(step, jnp.int32)
  leaves, treedef = jax.tree.flatten(template_pytree)
  specs = [_shape_and_dtype(leaf) for leaf in leaves]
  noise = [jnp.zeros(shape, dtype) for shape, dtype in specs]
  lowest_bit = jnp.bitwise_and(step, -step)  # 2**k; 0 for step 0.
  for level in range(min(num_levels, _INT32_LEVELS)):
    added = lowest_bit == (1 << level)  # node (k, t >> k) of S_t
    removed = lowest_bit > (1 << level)  # node (l, (t-1) >> l) of S_{t-1}
    node_index = jnp.where(added, jnp.right_shift(step, level),
                           jnp.right_shift(step - 1, level))
    for i, node in enumerate(_node(tree_key, level, node_index, specs,
                                   noise_std)):
      noise[i] = noise[i] + jnp.where(
          added, node, jnp.where(removed, -node, jnp.zeros_like(node)))
  return jax.tree.unflatten(treedef, noise)


def prefix_noise_std(step: int, noise_std: float) -> float:
  """Per-coordinate std of the noise on the released prefix sum ``Ŝ_step``.

  ``noise_std * sqrt(popcount(step))``: ``Ŝ_step`` carries one node per set
  bit of the 1-based ``step``, each with std ``noise_std``. Useful as a
  metric (for :func:`dp_ftrl`, the parameters' deviation from the noiseless
  run within a tree, with momentum 0, is ``learning_rate`` times this).
  Step 0 (nothing released yet) gives 0.

  Args:
    step: 1-based step within the tree (``>= 0``), e.g.
      ``int(state.step_in_tree)`` of a :class:`DPFTRLState`.
    noise_std: per-node noise standard deviation.
  """
  step = check_int("step", step, 0)
  return float(noise_std) * math.sqrt(bin(step).count("1"))
