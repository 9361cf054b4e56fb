"""Tree-aggregation noise and the DP-FTRL server optimizer.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep)
Learning without Sampling or Shuffling", ICML 2021 (arXiv:2103.00039).

DP-FTRL never noises a round's pseudo-gradient g_t on its own. It releases
noisy *prefix sums* ``S_t = g_1 + ... + g_t`` through the binary-tree
mechanism: every node of a binary tree over the steps ``1..T`` of a tree holds
one Gaussian draw, and the noise on ``S_t`` is the sum of the nodes of ``t``'s
binary decomposition (one node per set bit of ``t``). A node covers a dyadic
block of steps, so each g_t lies under at most ``tree_depth(T)`` nodes, and a
client that takes part in one round of the tree changes at most that many node
values; each release ``Ŝ_t`` uses only ``popcount(t)`` of them.

Privacy accounting. ``noise_std`` below is the standard deviation of *each
node's* noise on the pseudo-gradient. With per-client L2 clip norm ``C`` and a
fixed denominator ``M`` (the expected cohort size), one client moves g_t by at
most ``C / M``, so the per-node noise multiplier is
``z = noise_std * M / C``. The accountant must account for the tree mechanism
with that per-node ``z`` — in ``dp_accounting`` terms
``SingleEpochTreeAggregationDpEvent(z, steps_per_tree)`` for one tree, composed
over the trees of the run (``SelfComposedDpEvent(..., num_trees)``, the last
tree possibly shorter) — and this is only valid if **each client contributes
to at most one round per tree** (e.g. the ``"shuffle"`` sampler of
:mod:`fedjax_lab.data.sampling`, with trees aligned to its epochs). Every value
computed here from the released ``Ŝ_t`` (differences, momentum, parameters) is
post-processing and costs nothing more.

Everything is stateless in the random sense: the noise of node
``(level, index)`` of a tree is a pure function of the tree's key and the node
id, so a node shared by several prefixes is the *same* draw in each of them,
and nothing about past draws has to be stored.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.checks import check_int

PyTree = Any


def _check_float(name: str, value: float, minimum: float,
                 maximum: float = math.inf, *, open_min: bool = False,
                 open_max: bool = False) -> float:
  """Returns ``value`` as float after checking its type and range."""
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


# Folded into the seed's key before the tree index (see tree_noise_key).
_TREE_NOISE_SALT = 0x7EE5


def tree_noise_key(seed: int, tree_index: jax.Array | int) -> jax.Array:
  """The key of tree ``tree_index`` of a :func:`dp_ftrl` run with ``seed``.

  ``fold_in(fold_in(key(seed), salt), tree_index)``: every restarted tree
  gets fresh, independent node noise, and the salt keeps it apart from other
  streams keyed by the same integer seed (the runner's model initialisation
  uses ``fold_in(key(seed), 0)``). Works with a traced ``tree_index``.
  """
  return jax.random.fold_in(
      jax.random.fold_in(jax.random.key(seed), _TREE_NOISE_SALT),
      jnp.asarray(tree_index, jnp.int32))


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
    node_key = jax.random.fold_in(jax.random.fold_in(tree_key, level),
                                  node_index)
    for i, (shape, dtype) in enumerate(specs):
      draw = jax.random.normal(jax.random.fold_in(node_key, i), shape, dtype)
      node = (noise_std * draw).astype(dtype)
      noise[i] = noise[i] + jnp.where(bit_set, node, jnp.zeros_like(node))
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


class DPFTRLState(NamedTuple):
  """State of :func:`dp_ftrl`; every field is an array (a pure pytree).

  Attributes:
    step_in_tree: int32 scalar, the 1-based step of the current tree whose
      sum was released last (0 before the first update). When it equals
      ``steps_per_tree`` the next update starts a new tree.
    tree_index: int32 scalar, index of the current tree (its noise key is
      ``tree_noise_key(seed, tree_index)``).
    exact_sum: exact (noiseless) prefix sum ``S_t`` of the current tree.
    prev_noisy_sum: last released noisy prefix sum ``Ŝ_t``.
    momentum_buffer: momentum ``v_t`` (kept across tree restarts).
  """

  step_in_tree: jax.Array
  tree_index: jax.Array
  exact_sum: PyTree
  prev_noisy_sum: PyTree
  momentum_buffer: PyTree


def _accumulator_dtype(dtype: Any) -> Any:
  """At least float32 for the sums, whatever the parameters' precision."""
  return jnp.promote_types(dtype, jnp.float32)


def dp_ftrl(learning_rate: float, noise_std: float, steps_per_tree: int,
            momentum: float = 0.0, seed: int = 0
            ) -> optax.GradientTransformation:
  """DP-FTRL (tree aggregation, with optional momentum) as a server optimizer.

  Kairouz et al. 2021 (ICML), "Practical and Private (Deep) Learning without
  Sampling or Shuffling": ``update(grads, state, params)`` takes the round's
  pseudo-gradient g_t — already clipped per client, summed and divided by the
  fixed denominator, but **not noised** (this optimizer adds all the noise).
  Within a tree it keeps the exact prefix sum ``S_t``, releases
  ``Ŝ_t = S_t + prefix_noise(t)``, forms the noisy gradient
  ``ĝ_t = Ŝ_t - Ŝ_{t-1}``, the momentum ``v_t = momentum * v_{t-1} + ĝ_t``, and
  returns ``updates = -learning_rate * v_t``. With ``momentum=0`` this is the
  FTRL form ``params_t = params_at_tree_start - learning_rate * Ŝ_t``; with
  momentum it is DP-FTRLM (as in the paper and TFF). With ``noise_std=0`` it
  is exactly ``optax.sgd(learning_rate, momentum)`` (non-Nesterov) up to
  float rounding.

  Restarts (Sec. 4 / App. D of the paper): after ``steps_per_tree`` steps the
  next update starts a new tree: step 1 again, ``S`` and ``Ŝ_{prev}`` back to
  0, and a fresh key ``tree_noise_key(seed, tree_index)``; the momentum
  buffer carries over.

  Privacy: ``noise_std`` is the std of each tree node's noise on the
  pseudo-gradient; pass ``noise_multiplier * clip_norm / expected_cohort_size``
  so that ``noise_multiplier`` is the per-node multiplier z the accountant
  sees (``SingleEpochTreeAggregationDpEvent(z, steps_per_tree)`` composed
  over trees). Valid only if each client contributes to at most one round per
  tree: align ``steps_per_tree`` with the epochs of a shuffled sampler (equal
  to, or a divisor of, its ``rounds_per_epoch``).

  Args:
    learning_rate: server learning rate (> 0).
    noise_std: per-node noise standard deviation (>= 0; 0 disables noise).
    steps_per_tree: steps before the tree restarts (>= 1).
    momentum: momentum coefficient in ``[0, 1)``.
    seed: non-negative integer (< 2**32) fixing all the trees' noise.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`DPFTRLState`. ``params`` is not needed by ``update``.
  """
  learning_rate = _check_float("learning_rate", learning_rate, 0.0,
                               open_min=True)
  noise_std = _check_float("noise_std", noise_std, 0.0)
  steps_per_tree = check_int("steps_per_tree", steps_per_tree, 1)
  momentum = _check_float("momentum", momentum, 0.0, 1.0, open_max=True)
  seed = check_int("seed", seed, 0)
  if seed >= 2**32:
    raise ValueError(f"seed must be < 2**32, got {seed}.")
  num_levels = tree_depth(steps_per_tree)

  def zeros(params):
    return jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), _accumulator_dtype(
            jnp.result_type(p))), params)

  def init_fn(params: PyTree) -> DPFTRLState:
    # Separate buffers for every field, so the whole state can be donated.
    return DPFTRLState(step_in_tree=jnp.zeros([], jnp.int32),
                       tree_index=jnp.zeros([], jnp.int32),
                       exact_sum=zeros(params),
                       prev_noisy_sum=zeros(params),
                       momentum_buffer=zeros(params))

  def update_fn(grads: PyTree, state: DPFTRLState,
                params: PyTree | None = None
                ) -> tuple[PyTree, DPFTRLState]:
    del params
    restart = state.step_in_tree >= steps_per_tree
    tree_index = jnp.where(restart, state.tree_index + 1,
                           state.tree_index).astype(jnp.int32)
    step = jnp.where(restart, 1, state.step_in_tree + 1).astype(jnp.int32)

    def fresh(x):
      return jnp.where(restart, jnp.zeros_like(x), x)

    exact_sum = jax.tree.map(lambda s, g: fresh(s) + g.astype(s.dtype),
                             state.exact_sum, grads)
    noise = prefix_noise(tree_noise_key(seed, tree_index), step, exact_sum,
                         noise_std, num_levels)
    noisy_sum = jax.tree.map(jnp.add, exact_sum, noise)
    noisy_grad = jax.tree.map(lambda s, prev: s - fresh(prev), noisy_sum,
                              state.prev_noisy_sum)
    if momentum:
      velocity = jax.tree.map(lambda v, g: momentum * v + g,
                              state.momentum_buffer, noisy_grad)
    else:
      velocity = noisy_grad
    updates = jax.tree.map(lambda v, g: (-learning_rate * v).astype(g.dtype),
                           velocity, grads)
    return updates, DPFTRLState(step_in_tree=step, tree_index=tree_index,
                                exact_sum=exact_sum,
                                prev_noisy_sum=noisy_sum,
                                momentum_buffer=velocity)

  return optax.GradientTransformation(init_fn, update_fn)
