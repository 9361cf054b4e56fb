"""Sweep members compiled into one program: the round vmapped over members.

Members of a hyperparameter sweep that differ only in numbers (client and
server learning rates, optimizer hyperparameters, DP clip norm and noise
multiplier, seeds) share the shapes of everything the round touches, so they
can train side by side as one more ``vmap`` axis of the compiled round: one
compilation and one launch per round for K members instead of K of each.

``make_algorithm(hparams) -> FederatedAlgorithm`` builds one member's
algorithm from a pytree of scalars. Inside the member round those scalars are
TRACED (one slice of the ``[K]`` arrays), so every component the algorithm is
built from must take a traced number: optax optimizers do
(``optax.sgd(hparams["client_lr"])``, ``optax.adam(hparams["server_lr"],
b1=hparams["b1"])``); a factory that checks or branches on its argument in
Python (``if value > 0``, ``float(value)``, ``math.isnan(value)``) does not
and fails at trace time with a ``jax.errors.TracerBoolConversionError`` or
``ConcretizationTypeError``. Hyperparameters that change shapes or Python
control flow (model width, local steps, cohort size, strategy) cannot be
members of one program.

The member round reuses :func:`fedjax_lab.engine.round.build_round`
unchanged: for each trace it builds the round of ``make_algorithm(hparams)``
(hparams being the member-axis tracers) and ``jax.vmap`` runs it over the
member axis, all under one ``jax.jit``. So a member's result is exactly the
result of its algorithm's ordinary round (same keys, padding rules, metrics),
and members never mix: nothing reduces over the member axis, so a member that
diverges (NaN) leaves the others untouched.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np

from fedjax_lab.algorithms import base
from fedjax_lab.engine import clients
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy

__all__ = ["MEMBER_AXIS", "MEMBER_SHARDS", "MakeAlgorithm", "MemberRoundFn",
           "build_member_round", "init_member_states", "member",
           "num_members", "stack_members"]

PyTree = Any
MakeAlgorithm = Callable[[PyTree], base.FederatedAlgorithm]
MemberRoundFn = Callable[..., tuple[base.ServerState, PyTree,
                                    dict[str, jax.Array]]]
MEMBER_AXIS = "members"  # the vmapped axis name of the member round
# The mesh axis the member axis is split over when members and clients are
# both sharded (a (MEMBER_SHARDS, "clients") mesh; see build_member_round).
MEMBER_SHARDS = "member_shards"


def num_members(hparams: PyTree) -> int:
  """K, the length of the leading member axis shared by every leaf.

  Raises:
    ValueError: ``hparams`` has no leaves, a scalar leaf, or leaves whose
      leading axes differ.
  """
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None
           for leaf in jax.tree.leaves(hparams)}
  if not sizes or None in sizes or len(sizes) != 1:
    raise ValueError(
        "hparams must be a pytree of [K] arrays (one value per member) with "
        f"the same K; got leading axes {sorted(map(str, sizes))}.")
  return sizes.pop()


def stack_members(trees: Sequence[PyTree]) -> PyTree:
  """K pytrees of the same structure -> one pytree of ``[K, ...]`` arrays
  (e.g. per-member hyperparameter dicts, cohorts or client states)."""
  if not trees:
    raise ValueError("stack_members needs at least one member.")
  return jax.tree.map(lambda *leaves: jnp.stack(
      [jnp.asarray(leaf) for leaf in leaves]), *trees)


def member(tree: PyTree, index: int) -> PyTree:
  """Member ``index``'s slice of a ``[K, ...]`` pytree (the leading axis
  dropped), e.g. its server state or metrics."""
  return jax.tree.map(lambda leaf: leaf[index], tree)


def init_member_states(make_algorithm: MakeAlgorithm, hparams: PyTree,
                       params: PyTree) -> base.ServerState:
  """Every member's initial server state, stacked ``[K, ...]``.

  Args:
    make_algorithm: ``hparams -> FederatedAlgorithm`` (see the module
      docstring; it sees one member's traced scalars).
    hparams: pytree of ``[K]`` arrays, one value per member.
    params: initial model parameters, shared by every member (vmap a model
      init over per-member keys and call ``server_init`` yourself for
      per-member initial parameters).

  Returns:
    The members' ``server_init(params)``, each leaf with a leading ``[K]``
    axis (the server optimizer state is initialised per member, so e.g.
    ``optax.adam`` hyperparameters may differ).
  """
  num_members(hparams)
  return jax.jit(jax.vmap(
      lambda hp: make_algorithm(hp).server_init(params)))(hparams)


def _check_member_axis(name: str, tree: PyTree, size: int) -> None:
  for leaf in jax.tree.leaves(tree):
    if not np.ndim(leaf) or np.shape(leaf)[0] != size:
      raise ValueError(
          f"{name} must have a leading member axis of {size} (one slice per "
          f"member, like hparams); got a leaf of shape {np.shape(leaf)}.")


def build_member_round(make_algorithm: MakeAlgorithm, strategy: Strategy,
                       shared_cohort: bool = True,
                       donate: bool = False,
                       mesh: Mesh | None = None) -> MemberRoundFn:
  """Compiles one round of K sweep members as one program (vmap over members).

  Args:
    make_algorithm: ``hparams -> FederatedAlgorithm``; called with one
      member's hyperparameters as traced scalars (once per trace, not per
      member), so every number it passes on must be usable traced.
    strategy: the round's client-parallel and step-loop choices, shared by
      every member. ``step_loop="host"`` is refused (its steps are driven
      from Python, so there is no single program to vmap).
    shared_cohort: ``True``: every member trains on the same cohort (no
      member axis on it; the usual sweep, same data and sampling). ``False``:
      the cohort has a leading ``[K]`` axis, each member its own cohort of
      the same padded shape ``[K, C, S, B, ...]`` (e.g. different sampling
      seeds).
    donate: donate the server states' and client states' buffers.
    mesh: optional 2-D mesh with axes ``(MEMBER_SHARDS, "clients")``: the
      member axis is split over the first (``vmap``'s ``spmd_axis_name``)
      and each member's cohort client axis over the second, as
      ``build_round(mesh=...)`` shards a separate run's (C must be a
      multiple of the ``"clients"`` size). Place the inputs accordingly
      (members' leading axis on ``MEMBER_SHARDS``, client axes on
      ``"clients"``). ``None``: GSPMD follows the inputs' placement.

  Returns:
    ``member_round_fn(hparams, server_states, cohort, client_states, rngs,
    noise_rngs=None) -> (server_states, client_states, metrics)``:

    * ``hparams``: pytree of ``[K]`` arrays (what ``make_algorithm`` takes);
    * ``server_states``: ``[K, ...]`` (:func:`init_member_states`);
    * ``cohort``: the engine's cohort dict (``features`` ``[C, S, B, ...]``,
      ``example_mask`` ``[C, S, B]``, ``client_mask``/``num_examples``/
      ``client_indices`` ``[C]``), with a leading ``[K]`` axis on every
      array when ``shared_cohort`` is False;
    * ``client_states``: ``[K, C, ...]``, each member's cohort rows;
    * ``rngs``: ``[K]`` base keys (a member's round key is
      ``fold_in(rngs[k], round)``, as in ``build_round``);
    * ``noise_rngs``: ``None`` or ``[K]`` aggregator noise keys;

    every output has a leading ``[K]`` axis and member ``k``'s slice equals
    ``build_round(make_algorithm(hparams[k]), strategy)`` run on member
    ``k``'s arguments. ``member_round_fn.trace_count()`` counts the traces
    (compilations) of the member program; ``.metric_origins()`` maps each
    metric to its origin as ``round_fn.metric_origins()`` does.

  Raises:
    ValueError: ``strategy.step_loop == "host"``; (when called) arguments
      whose member axes disagree with ``hparams``.
  """
  if strategy.step_loop == "host":
    raise ValueError(
        "build_member_round needs the whole round as one compiled program, "
        "and step_loop='host' drives local steps from Python; use "
        "step_loop='scan' or 'unroll' for a sweep compiled into one program.")
  trace_counter = [0]
  origins: dict[str, str] = {}
  client_mesh, spmd_axis = None, None
  if mesh is not None:
    if tuple(mesh.axis_names) != (MEMBER_SHARDS, "clients"):
      raise ValueError(f"mesh axes must be ({MEMBER_SHARDS!r}, 'clients'), "
                       f"got {mesh.axis_names}.")
    if mesh.shape["clients"] > 1:
      client_mesh, spmd_axis = mesh, MEMBER_SHARDS

  def one_member(hparams, server_state, cohort, client_states, rng,
                 noise_rng):
    algorithm = make_algorithm(hparams)
    round_fn = round_lib.build_round(algorithm, strategy, mesh=client_mesh,
                                     donate=False)
    with clients.member_axis(MEMBER_AXIS):
      outputs = round_fn(server_state, cohort, client_states, rng, noise_rng)
    origins.update(round_fn.metric_origins())
    return outputs

  cohort_axis = None if shared_cohort else 0

  def member_round_fn(hparams, server_states, cohort, client_states, rngs,
                      noise_rngs=None):
    trace_counter[0] += 1
    size = num_members(hparams)
    checked = [("server_states", server_states),
               ("client_states", client_states), ("rngs", rngs),
               ("noise_rngs", noise_rngs)]
    if not shared_cohort:
      checked.append(("cohort (shared_cohort=False)", cohort))
    for name, tree in checked:
      _check_member_axis(name, tree, size)
    if noise_rngs is None:
      run = lambda h, s, c, cs, r: one_member(h, s, c, cs, r, None)
      return jax.vmap(run, in_axes=(0, 0, cohort_axis, 0, 0),
                      axis_name=MEMBER_AXIS, spmd_axis_name=spmd_axis)(
          hparams, server_states, cohort, client_states, rngs)
    return jax.vmap(one_member, in_axes=(0, 0, cohort_axis, 0, 0, 0),
                    axis_name=MEMBER_AXIS, spmd_axis_name=spmd_axis)(
        hparams, server_states, cohort, client_states, rngs, noise_rngs)

  fn = jax.jit(member_round_fn, donate_argnums=(1, 3) if donate else ())
  fn.trace_count = lambda: trace_counter[0]
  fn.metric_origins = lambda: dict(origins)
  return fn
