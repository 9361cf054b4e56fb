"""Tree-aggregation noise: the DP-FTRL aggregator and server optimizer.

Kairouz, McMahan, Song, Thakkar, Thakurta, Xu, "Practical and Private (Deep)
Learning without Sampling or Shuffling", ICML 2021 (arXiv:2103.00039).

DP-FTRL never noises a round's pseudo-gradient g_t on its own. It releases
noisy *prefix sums* ``S_t = g_1 + ... + g_t`` through the binary-tree
mechanism: every node of a binary tree over the steps ``1..T`` of a tree holds
one Gaussian draw, and the noise ``N_t`` on ``S_t`` is the sum of the nodes of
``t``'s binary decomposition (one node per set bit of ``t``). A node covers a
dyadic block of steps, so each g_t lies under at most ``tree_depth(T)`` nodes,
and a client that takes part in one round of the tree changes at most that
many node values; each release ``Ŝ_t = S_t + N_t`` uses only ``popcount(t)``
of them.

The noisy gradient DP-FTRL steps on is ``ĝ_t = Ŝ_t - Ŝ_{t-1} = g_t + (N_t -
N_{t-1})``, and ``N_t`` is a pure function of the tree's key and ``t``
(:func:`prefix_noise`; ``N_0 = 0``). So nothing param-shaped has to be
remembered: :func:`prefix_noise_increment` draws ``N_t - N_{t-1}`` afresh
each step, and plain SGD (with heavy-ball momentum for DP-FTRLM) on ``ĝ_t``
is DP-FTRL with restarts. Two forms are provided:

* :func:`tree_aggregator` (preferred): an engine aggregator that clips every
  client, averages with a fixed denominator and adds the increment; pair it
  with ``optax.sgd(learning_rate, momentum=m)``. Its tree keys come from the
  secret per-round key the engine passes to ``finalize``.
* :func:`dp_ftrl`: the same math as an optax server optimizer on an already
  clipped, un-noised mean, keyed by a secret ``noise_key``.

Why this shape. (1) Noise keys must be secret: a key derived from the run's
public config seed lets anyone regenerate every node and subtract it, which
voids the guarantee. (2) No state may hold an un-noised sum: runners publish
server states (checkpoints, released models), so the states here hold only
scalars (the step, the tree index, the aggregator's raw tree key) and noisy
post-processed values (the momentum of ``ĝ``). The aggregator's tree key is
itself secret while its tree's noise matters: a state holding it must not be
released as is (see :class:`TreeAggregatorState`).

Privacy accounting. The per-node noise std on the pseudo-gradient is
``noise_std`` (``noise_multiplier * clip_norm / expected_cohort_size`` in the
aggregator). With per-client L2 clip norm ``C`` and a fixed denominator ``M``
(the expected cohort size), one client moves g_t by at most ``C / M``, so the
per-node noise multiplier is ``z = noise_std * M / C``. The accountant must
account for the tree mechanism with that per-node ``z`` — in
``dp_accounting`` terms ``SingleEpochTreeAggregationDpEvent(z,
steps_per_tree)`` for one tree, composed over the trees of the run
(``SelfComposedDpEvent(..., num_trees)``, the last tree possibly shorter) —
and this is only valid if **each client contributes to at most one round per
tree** (e.g. the ``"shuffle"`` sampler of :mod:`fedjax_lab.data.sampling`,
with trees aligned to its epochs). Every value computed here from the
released ``Ŝ_t`` (differences, momentum, parameters) is post-processing and
costs nothing more.

The node noise itself (:func:`prefix_noise`, :func:`prefix_noise_increment`,
...) lives in :mod:`fedjax_lab.privacy.tree_noise`.

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
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.checks import check_int
from fedjax_lab.privacy.clipping import clip_to_norm
from fedjax_lab.privacy.tree_noise import _check_float
from fedjax_lab.privacy.tree_noise import prefix_noise
from fedjax_lab.privacy.tree_noise import prefix_noise_increment
from fedjax_lab.privacy.tree_noise import prefix_noise_std
from fedjax_lab.privacy.tree_noise import tree_depth
from fedjax_lab.privacy.tree_noise import tree_noise_key

__all__ = ["DPFTRLState", "TreeAggregatorState", "dp_ftrl", "prefix_noise",
           "prefix_noise_increment", "prefix_noise_std", "tree_aggregator",
           "tree_depth", "tree_noise_key"]

PyTree = Any


class DPFTRLState(NamedTuple):
  """State of :func:`dp_ftrl`; every field is an array (a pure pytree).

  Nothing here is un-noised or secret, so the state may be published with
  the server state: no exact prefix sum is kept (``ĝ_t`` is ``g_t`` plus
  :func:`prefix_noise_increment`) and the noise key stays in the optimizer's
  closure.

  Attributes:
    step_in_tree: int32 scalar, the 1-based step of the current tree used by
      the last update (0 before the first update). When it equals
      ``steps_per_tree`` the next update starts a new tree.
    tree_index: int32 scalar, index of the current tree (its noise key is
      ``tree_noise_key(noise_key, tree_index)``).
    momentum_buffer: momentum ``v_t`` of the noisy gradients ``ĝ`` (kept
      across tree restarts; the last ``ĝ_t`` when ``momentum`` is 0), at
      least float32.
  """

  step_in_tree: jax.Array
  tree_index: jax.Array
  momentum_buffer: PyTree


def _traced(*values: Any) -> bool:
  """Whether any of ``values`` is a JAX tracer (a sweep member's
  hyperparameter)."""
  return any(isinstance(value, jax.core.Tracer) for value in values)


def _accumulator_dtype(dtype: Any) -> Any:
  """At least float32 for the sums, whatever the parameters' precision."""
  return jnp.promote_types(dtype, jnp.float32)


def _check_key(name: str, key: Any) -> jax.Array:
  """Returns ``key`` after checking it is a JAX PRNG key (not an int seed)."""
  dtype = getattr(key, "dtype", None)
  if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
    if jnp.shape(key) == ():
      return key
  elif dtype == jnp.uint32 and jnp.shape(key) == (2,):
    return key  # A raw (legacy) threefry key.
  raise TypeError(
      f"{name} must be one JAX PRNG key (e.g. from jax.random.key) drawn "
      f"from secret randomness, got {key!r}: a key derived from a published "
      "seed lets anyone regenerate and subtract the noise.")


def dp_ftrl(learning_rate: float, noise_std: float, steps_per_tree: int,
            momentum: float = 0.0, noise_key: jax.Array | None = None
            ) -> optax.GradientTransformation:
  """DP-FTRL (tree aggregation, with optional momentum) as a server optimizer.

  Kairouz et al. 2021 (ICML), "Practical and Private (Deep) Learning without
  Sampling or Shuffling": ``update(grads, state, params)`` takes the round's
  pseudo-gradient g_t — already clipped per client, summed and divided by the
  fixed denominator, but **not noised** (this optimizer adds all the noise).
  It forms the noisy gradient ``ĝ_t = Ŝ_t - Ŝ_{t-1} = g_t + N_t - N_{t-1}``
  (:func:`prefix_noise_increment`, without keeping ``S_t``), the momentum
  ``v_t = momentum * v_{t-1} + ĝ_t``, and returns
  ``updates = -learning_rate * v_t``. With ``momentum=0`` this is the FTRL
  form ``params_t = params_at_tree_start - learning_rate * Ŝ_t``; with
  momentum it is DP-FTRLM (as in the paper and TFF). With ``noise_std=0`` it
  is exactly ``optax.sgd(learning_rate, momentum)`` (non-Nesterov) up to
  float rounding. :func:`tree_aggregator` followed by ``optax.sgd`` is the
  same mechanism as an engine aggregator.

  Restarts (Sec. 4 / App. D of the paper): after ``steps_per_tree`` steps the
  next update starts a new tree: step 1 again with a fresh key
  ``tree_noise_key(noise_key, tree_index)``; the momentum buffer carries
  over.

  Privacy: ``noise_std`` is the std of each tree node's noise on the
  pseudo-gradient; pass ``noise_multiplier * clip_norm / expected_cohort_size``
  so that ``noise_multiplier`` is the per-node multiplier z the accountant
  sees (``SingleEpochTreeAggregationDpEvent(z, steps_per_tree)`` composed
  over trees). Valid only if each client contributes to at most one round per
  tree: align ``steps_per_tree`` with the epochs of a shuffled sampler (equal
  to, or a divisor of, its ``rounds_per_epoch``). ``noise_key`` must be
  secret: it is not stored in the state, but whoever holds it can remove
  the noise.

  Args:
    learning_rate: server learning rate (> 0).
    noise_std: per-node noise standard deviation (>= 0; 0 disables noise).
    steps_per_tree: steps before the tree restarts (>= 1).
    momentum: momentum coefficient in ``[0, 1)``.
    noise_key: secret JAX PRNG key fixing all the trees' noise; required
      when ``noise_std > 0``.

  ``learning_rate``, ``noise_std`` and ``momentum`` may be traced (sweep
  members; checked on their concrete values only): a traced ``noise_std``
  always draws the noise (std 0 adds exactly 0) and so needs ``noise_key``.

  Returns:
    An ``optax.GradientTransformation`` whose state is a
    :class:`DPFTRLState`. ``params`` is not needed by ``update``.

  Raises:
    ValueError: ``noise_std > 0`` (or traced) without a ``noise_key``, or an
      argument out of range.
    TypeError: ``noise_key`` is not a PRNG key (e.g. an integer seed).
  """
  learning_rate = _check_float("learning_rate", learning_rate, 0.0,
                               open_min=True)
  noise_std = _check_float("noise_std", noise_std, 0.0)
  steps_per_tree = check_int("steps_per_tree", steps_per_tree, 1)
  momentum = _check_float("momentum", momentum, 0.0, 1.0, open_max=True)
  add_noise = _traced(noise_std) or noise_std > 0
  use_momentum = _traced(momentum) or momentum > 0
  if noise_key is not None:
    noise_key = _check_key("noise_key", noise_key)
  elif add_noise:
    raise ValueError(
        "dp_ftrl with noise_std > 0 needs noise_key, a secret JAX PRNG key "
        "(e.g. jax.random.key drawn from os.urandom); it cannot be derived "
        "from the run's public seed.")
  num_levels = tree_depth(steps_per_tree)

  def init_fn(params: PyTree) -> DPFTRLState:
    momentum_buffer = jax.tree.map(
        lambda p: jnp.zeros(jnp.shape(p), _accumulator_dtype(
            jnp.result_type(p))), params)
    return DPFTRLState(step_in_tree=jnp.zeros([], jnp.int32),
                       tree_index=jnp.zeros([], jnp.int32),
                       momentum_buffer=momentum_buffer)

  def update_fn(grads: PyTree, state: DPFTRLState,
                params: PyTree | None = None
                ) -> tuple[PyTree, DPFTRLState]:
    del params
    restart = state.step_in_tree >= steps_per_tree
    tree_index = jnp.where(restart, state.tree_index + 1,
                           state.tree_index).astype(jnp.int32)
    step = jnp.where(restart, 1, state.step_in_tree + 1).astype(jnp.int32)
    noisy_grad = jax.tree.map(
        lambda g, v: g.astype(v.dtype), grads, state.momentum_buffer)
    if add_noise:
      noise = prefix_noise_increment(tree_noise_key(noise_key, tree_index),
                                     step, noisy_grad, noise_std, num_levels)
      noisy_grad = jax.tree.map(jnp.add, noisy_grad, noise)
    if use_momentum:
      velocity = jax.tree.map(lambda v, g: momentum * v + g,
                              state.momentum_buffer, noisy_grad)
    else:
      velocity = noisy_grad
    updates = jax.tree.map(lambda v, g: (-learning_rate * v).astype(g.dtype),
                           velocity, grads)
    return updates, DPFTRLState(step_in_tree=step, tree_index=tree_index,
                                momentum_buffer=velocity)

  return optax.GradientTransformation(init_fn, update_fn)


# Folded into the round's secret key to draw a new tree's key.
_TREE_KEY_SALT = 0x7EE5


class TreeAggregatorState(NamedTuple):
  """State of :func:`tree_aggregator`: two small arrays, nothing model-shaped.

  No un-noised sum is kept. ``tree_key`` is secret, though: whoever reads it
  can regenerate the current tree's noise, so a server state holding it must
  not be published as is (drop or zero ``aggregator_state`` first).

  Attributes:
    step_in_tree: int32 scalar, the 1-based step of the current tree used by
      the last round; ``steps_per_tree`` at init, so the first round starts a
      tree.
    tree_key: uint32 array of shape ``(2,)``, the raw key data
      (``jax.random.key_data``) of the current tree's threefry key; zeros
      before the first round.
  """

  step_in_tree: jax.Array
  tree_key: jax.Array


def tree_aggregator(clip_norm: float, noise_multiplier: float,
                    expected_cohort_size: float,
                    steps_per_tree: int) -> base.Aggregator:
  """DP-FTRL's tree aggregation as an engine aggregator (Kairouz et al. 2021).

  Every client's delta is clipped to L2 norm ``clip_norm`` over the whole
  pytree and summed with weight 1; the sum is divided by the fixed
  denominator ``expected_cohort_size`` into g_t, and ``finalize`` returns the
  noisy gradient ``ĝ_t = g_t + N_t - N_{t-1}`` of the tree mechanism
  (:func:`prefix_noise_increment`, per-node std
  ``noise_multiplier * clip_norm / expected_cohort_size`` on the mean).
  ``optax.sgd(learning_rate)`` on ``ĝ`` is then DP-FTRL in FTRL form
  (``params_t = params_at_tree_start - learning_rate * Ŝ_t`` within a tree),
  ``optax.sgd(learning_rate, momentum=m)`` is DP-FTRLM with the momentum
  carried across restarts. With ``noise_multiplier=0`` this is plain clipped
  averaging, exactly.

  Trees: a round whose state has ``step_in_tree >= steps_per_tree`` (the
  first round, and every ``steps_per_tree`` rounds after) starts a tree at
  step 1 with key ``fold_in(rng, salt)`` of that round's secret ``rng``;
  other rounds take the next step with the stored key. Accounting: per-node
  multiplier ``noise_multiplier``, ``SingleEpochTreeAggregationDpEvent``
  composed over the trees; each client may take part in at most one round
  per tree.

  Metrics: ``dp_noise_std`` (per-node std on the sum,
  ``noise_multiplier * clip_norm``), ``dp_noise_std_on_mean`` (per-node std
  on the mean), ``clip_norm`` and ``tree_step``; nothing computed from the
  un-noised sum.

  Args:
    clip_norm: L2 bound C on each client's update (> 0; may be infinite
      only when ``noise_multiplier`` is 0).
    noise_multiplier: z, per-node noise std / C on the sum (>= 0).
    expected_cohort_size: the fixed denominator (> 0).
    steps_per_tree: rounds before the tree restarts (>= 1).

  ``clip_norm`` and ``noise_multiplier`` may be traced (sweep members;
  checked on their concrete values only): the noise is then always drawn,
  with std 0 (exactly 0 added) for a member whose ``noise_multiplier`` is 0.

  Returns:
    A :class:`~fedjax_lab.algorithms.base.Aggregator` whose state is a
    :class:`TreeAggregatorState`.
  """
  noise_multiplier = _check_float("noise_multiplier", noise_multiplier, 0.0)
  if (not _traced(clip_norm) and clip_norm == math.inf and
      (_traced(noise_multiplier) or noise_multiplier == 0)):
    # Noiseless averaging without clipping (a traced multiplier: each
    # member's concrete plan allowed an infinite clip norm only with z = 0).
    clip_norm = math.inf
  else:
    clip_norm = _check_float("clip_norm", clip_norm, 0.0, open_min=True)
  expected_cohort_size = _check_float("expected_cohort_size",
                                      expected_cohort_size, 0.0,
                                      open_min=True)
  steps_per_tree = check_int("steps_per_tree", steps_per_tree, 1)
  if steps_per_tree >= 2**31:
    raise ValueError(f"steps_per_tree must be < 2**31 (an int32 step), got "
                     f"{steps_per_tree}.")
  num_levels = tree_depth(steps_per_tree)
  if _traced(noise_multiplier, clip_norm):
    # 0 for z = 0 also with clip_norm = inf (0 * inf would be NaN).
    noise_std_on_sum = jnp.where(noise_multiplier == 0, 0.0,
                                 noise_multiplier * clip_norm)
  else:
    noise_std_on_sum = (noise_multiplier * clip_norm if noise_multiplier
                        else 0.0)
  node_std = noise_std_on_sum / expected_cohort_size
  add_noise = _traced(node_std) or node_std > 0

  def init() -> TreeAggregatorState:
    return TreeAggregatorState(
        step_in_tree=jnp.asarray(steps_per_tree, jnp.int32),
        tree_key=jnp.zeros([2], jnp.uint32))

  def client_transform(delta, weight, state, rng):
    del weight, state, rng
    clipped, norm = clip_to_norm(delta, clip_norm)
    metrics = {"update_norm": norm,
               "fraction_clipped": (norm > clip_norm).astype(jnp.float32)}
    return clipped, jnp.ones([], jnp.float32), metrics

  def finalize(weighted_sum, total_weight, num_clients,
               state: TreeAggregatorState, rng):
    del total_weight, num_clients
    restart = state.step_in_tree >= steps_per_tree
    step = jnp.where(restart, 1, state.step_in_tree + 1).astype(jnp.int32)
    new_key_data = jax.random.key_data(jax.random.fold_in(rng,
                                                          _TREE_KEY_SALT))
    if new_key_data.shape != (2,) or new_key_data.dtype != jnp.uint32:
      raise TypeError("tree_aggregator needs threefry keys (key data uint32 "
                      f"(2,)), got key data {new_key_data.dtype}"
                      f"{new_key_data.shape}.")
    tree_key = jnp.where(restart, new_key_data, state.tree_key)
    aggregate = jax.tree.map(lambda s: s / expected_cohort_size,
                             weighted_sum)
    if add_noise:
      noise = prefix_noise_increment(
          jax.random.wrap_key_data(tree_key, impl="threefry2x32"), step,
          aggregate, node_std, num_levels)
      aggregate = jax.tree.map(jnp.add, aggregate, noise)
    metrics = {
        "dp_noise_std": jnp.asarray(noise_std_on_sum, jnp.float32),
        "dp_noise_std_on_mean": jnp.asarray(node_std, jnp.float32),
        "clip_norm": jnp.asarray(clip_norm, jnp.float32),
        "tree_step": step.astype(jnp.float32),
    }
    return aggregate, TreeAggregatorState(step_in_tree=step,
                                          tree_key=tree_key), metrics

  return base.Aggregator(init=init, client_transform=client_transform,
                         finalize=finalize, uniform_weights_only=True)
