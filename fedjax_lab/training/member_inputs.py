"""The member program's inputs: per-member cohorts stacked, the member axis
placed on the devices, and a group of one member run without a member axis.

Used by :mod:`fedjax_lab.training.member_loop`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
import numpy as np

from fedjax_lab.engine import members as members_lib
from fedjax_lab.engine import round as round_lib
from fedjax_lab.training import setup

__all__ = ["Placement", "one_member_round", "same_cohort", "stack_cohorts"]


def pad_to(array: np.ndarray, shape: Sequence[int], fill: Any) -> np.ndarray:
  """``array`` padded at the end of each axis to ``shape`` with ``fill``."""
  if tuple(array.shape) == tuple(shape):
    return array
  out = np.full(shape, fill, array.dtype)
  out[tuple(slice(0, n) for n in array.shape)] = array
  return out


def stack_cohorts(cohorts: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Per-member cohorts stacked ``[K, C, S, ...]``, each padded to the
  largest cohort (clients: index -1, masks 0) and step count (masked)."""
  clients = max(c["client_mask"].shape[0] for c in cohorts)
  steps = max(c["example_mask"].shape[1] for c in cohorts)

  def padded(cohort):
    out = {"features": {
        name: pad_to(value, (clients, steps) + value.shape[2:], 0)
        for name, value in cohort["features"].items()}}
    out["example_mask"] = pad_to(cohort["example_mask"],
                                  (clients, steps) +
                                  cohort["example_mask"].shape[2:], 0)
    for name, fill in (("client_mask", 0), ("num_examples", 0),
                       ("client_indices", -1)):
      out[name] = pad_to(cohort[name], (clients,), fill)
    return out

  return jax.tree.map(lambda *leaves: np.stack(leaves),
                      *[padded(c) for c in cohorts])


class Placement:
  """Where the member program's arrays live.

  One device, or every device of this process as a 2-D mesh
  ``(members_lib.MEMBER_SHARDS, "clients")``: the member axis is split over
  the largest device count that divides the devices and is at most K (K
  padded to a multiple of it with copies of member 0, whose outputs are
  dropped), and each member's cohort client axis over the rest, as a
  separate run shards its clients (a group of one shards clients only).
  """

  def __init__(self, num_members: int, shard: bool):
    self.num_members = num_members
    self.mesh = None
    self.padded = num_members
    self.client_shards = 1
    count = jax.device_count()
    if shard and count > 1:
      member_shards = max(d for d in range(1, min(count, num_members) + 1)
                          if count % d == 0)
      self.client_shards = count // member_shards
      self.mesh = Mesh(
          np.asarray(jax.devices()).reshape(member_shards, self.client_shards),
          (members_lib.MEMBER_SHARDS, "clients"))
      self.padded = -(-num_members // member_shards) * member_shards

  def _put(self, tree: Any, spec: PartitionSpec, pad_members: bool) -> Any:
    if self.mesh is None:
      return jax.device_put(tree)
    extra = self.padded - self.num_members if pad_members else 0

    def pad(leaf):
      leaf = jnp.asarray(leaf)
      if not extra:
        return leaf
      return jnp.concatenate([leaf, jnp.repeat(leaf[:1], extra, axis=0)])

    return jax.device_put(jax.tree.map(pad, tree),
                          NamedSharding(self.mesh, spec))

  def members(self, tree: Any) -> Any:
    """A ``[K, ...]`` tree on the device(s), member axis split."""
    return self._put(tree, PartitionSpec(members_lib.MEMBER_SHARDS), True)

  def member_clients(self, tree: Any) -> Any:
    """A ``[K, C, ...]`` tree (per-member cohorts, the cohort rows' client
    states): member axis and client axis split."""
    return self._put(
        tree, PartitionSpec(members_lib.MEMBER_SHARDS, "clients"), True)

  def shared(self, tree: Any) -> Any:
    """A ``[C, ...]`` cohort every member reads: client axis split (each
    member shard holds a copy)."""
    return self._put(tree, PartitionSpec("clients"), False)


def same_cohort(cohorts: Sequence[dict[str, Any]]) -> bool:
  first = cohorts[0]
  return all(c is first for c in cohorts)


def one_member_round(exp: setup.Experiment, strategy: Any,
                     mesh: Mesh | None = None) -> members_lib.MemberRoundFn:
  """A group of one: the experiment's ordinary compiled round behind the
  member round's signature (a leading axis of one on states and outputs);
  ``mesh``: :class:`Placement`'s, whose ``"clients"`` axis shards the
  cohort as a separate run's mesh does."""
  if mesh is not None and mesh.shape["clients"] == 1:
    mesh = None
  plain = round_lib.build_round(exp.algorithm, strategy, mesh=mesh,
                                donate=False)
  first = lambda tree: jax.tree.map(lambda leaf: leaf[0], tree)

  def round_fn(hparams, server_states, cohort, client_states, rngs,
               noise_rngs=None):
    del hparams
    outputs = plain(first(server_states), cohort, first(client_states),
                    rngs[0], None if noise_rngs is None else noise_rngs[0])
    return jax.tree.map(lambda leaf: leaf[None], outputs)

  round_fn.trace_count = plain.trace_count
  round_fn.metric_origins = plain.metric_origins
  return round_fn
