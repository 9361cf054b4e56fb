"""Canary clients for the one-shot empirical privacy audit.

The canaries of Andrew et al., "One-shot Empirical Privacy Estimation for
Federated Learning", ICLR 2024 (arXiv:2302.03098); the audit itself is
:mod:`fedjax_lab.audit.one_shot`.

* Canary ``i``'s update is a fixed random direction ``u_i`` (an isotropic
  Gaussian over the whole model pytree, normalised to unit L2 norm, drawn from
  ``(seed, i)``), scaled to the clip norm ``C`` so clipping leaves it as it
  is. It ignores its data and is the same in every round the canary is
  sampled. Canaries are sampled exactly like real clients and their updates go
  through the algorithm's aggregator (clipping, noise) like everyone else's.
* Held-out directions (ids after the inserted ones) come from the same
  distribution but are never inserted.
* Canaries enlarge the population: with a fixed cohort size the real
  sampling rate drops slightly to ``M / (N + k)``, and with Poisson sampling
  the expected cohort grows by ``q k``; the accountant's epsilon is the one
  computed for the configured (real) population.
* With adaptive clipping the canary norm is the initial clip norm.

The pieces:

* :func:`canary_direction` / :func:`canary_cosines` — the directions and
  their cosines with a model delta.
* :func:`with_canaries` — wraps a :class:`FederatedAlgorithm` so clients whose
  per-client state carries a canary id send ``C * u_id`` instead of their
  trained delta (vectorised; real clients are untouched).
* :func:`add_canaries` — adds canary clients to an
  :class:`~fedjax_lab.training.setup.Experiment` (data, sampler, algorithm,
  per-client state).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.algorithms import base
from fedjax_lab.data import sampling
from fedjax_lab.data.federated import ClientStore, FederatedDataset
from fedjax_lab.engine import round as round_lib
from fedjax_lab.privacy import clipping
from fedjax_lab.privacy import plan as plan_lib
from fedjax_lab.training.setup import Experiment

PyTree = Any

# Folded into the canary seed's key so canary directions are unrelated to any
# training randomness drawn from the same integer seed.
_CANARY_SALT = 0x0CA9A7
# Canary directions scored per compiled call in canary_cosines.
_COSINE_CHUNK = 64


# ------------------------------------------------------------ directions


def canary_direction(like: PyTree, canary_index: int | jax.Array,
                     seed: int) -> PyTree:
  """Unit-norm random direction ``u_i`` shaped like ``like`` (the model pytree).

  One vector of ``d`` i.i.d. standard normals (``d`` = number of scalars in
  ``like``) is divided by its L2 norm — a uniformly random point on the unit
  sphere of ``R^d`` — and cut into ``like``'s leaves in ``jax.tree.leaves``
  order. The draw is a pure function of ``(seed, canary_index)`` and the
  pytree's structure and shapes, so the same direction is produced inside the
  compiled round (with a traced ``canary_index``) and afterwards, when the
  cosines are computed. (One draw for the whole pytree, rather than one per
  leaf, also keeps the compile time of the round low.)

  Args:
    like: a pytree of arrays (only structure and shapes are used).
    canary_index: non-negative canary id (a Python int or an int32 scalar,
      possibly traced).
    seed: integer seed of the canary family.

  Returns:
    A float32 pytree with ``like``'s structure and global norm 1.
  """
  key = jax.random.fold_in(jax.random.key(seed), _CANARY_SALT)
  key = jax.random.fold_in(key, canary_index)
  leaves, treedef = jax.tree.flatten(like)
  sizes = [int(np.size(leaf)) for leaf in leaves]
  flat = jax.random.normal(key, [sum(sizes)], jnp.float32)
  flat = flat / jnp.sqrt(jnp.sum(jnp.square(flat)))
  parts = jnp.split(flat, np.cumsum(sizes)[:-1].tolist()) if leaves else []
  return jax.tree.unflatten(treedef, [
      part.reshape(jnp.shape(leaf)) for part, leaf in zip(parts, leaves)])


@functools.partial(jax.jit, static_argnums=(2,))
def _canary_dots(tree: PyTree, ids: jax.Array, seed: int) -> jax.Array:
  """``<u_i, tree>`` for a chunk of canary ids (compiled once per shape)."""
  def one(i):
    u = canary_direction(tree, i, seed)
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(u),
                                              jax.tree.leaves(tree)))
  return jax.vmap(one)(ids)


def canary_cosines(delta: PyTree, canary_ids: Sequence[int],
                   seed: int) -> np.ndarray:
  """``cos(delta, u_i)`` for each canary id ``i`` (float64 ``[len(ids)]``).

  Directions are generated and scored in compiled chunks of a fixed size, so
  memory stays at a few model copies however many canaries there are.
  """
  ids = np.asarray(canary_ids, dtype=np.int32).reshape(-1)
  if len(ids) == 0:
    return np.zeros([0], np.float64)
  delta = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), delta)
  delta_norm = float(clipping.global_norm(delta))
  if delta_norm == 0.0:
    raise ValueError("the model did not move (||theta_T - theta_0|| = 0); "
                     "cosines are undefined.")
  out = []
  for start in range(0, len(ids), _COSINE_CHUNK):
    chunk = ids[start:start + _COSINE_CHUNK]
    padded = np.pad(chunk, (0, _COSINE_CHUNK - len(chunk)))
    out.append(np.asarray(_canary_dots(delta, padded, int(seed)),
                          np.float64)[:len(chunk)])
  return np.concatenate(out) / delta_norm


# ------------------------------------------------------------- the engine


def with_canaries(algorithm: base.FederatedAlgorithm, clip_norm: float,
                  seed: int) -> base.FederatedAlgorithm:
  """``algorithm`` whose canary clients send ``clip_norm * u_id``.

  The per-client state becomes ``(inner_state, canary_id)`` (``canary_id``
  int32, ``-1`` for real clients). The id rides in the local-training carry
  from ``client_init`` to ``client_final``, which replaces a canary's trained
  delta by ``clip_norm * canary_direction(delta, canary_id, seed)`` with
  ``jnp.where`` (so it vectorises under ``vmap``; a real client's delta is
  selected bit for bit). The canary's weight is the inner algorithm's (the
  aggregator decides, e.g. DP-FedAvg's weight 1), and its update then goes
  through the unchanged aggregator: clipped (a no-op up to rounding, its norm
  is already ``clip_norm``) and noised like any other. Canaries still run
  local training on their (copied) data, so the engine's shapes and costs are
  those of a normal client; the result is discarded.

  Canaries' training metrics are given weight 0 (``train_loss`` stays the
  real clients' loss); a ``canary_fraction`` metric reports the share of
  canaries among the round's clients.

  Args:
    algorithm: the algorithm to audit.
    clip_norm: ``C``, the L2 norm of every canary update (the aggregator's
      clip norm).
    seed: seed of the canary directions (see :func:`canary_direction`).
  """
  clip_norm = float(clip_norm)
  if not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm}.")
  seed = int(seed)

  def client_state_init(params):
    return _with_canary_ids(algorithm.client_state_init(params),
                            jnp.asarray(-1, jnp.int32))

  # An aggregation chain with per-client state (error-feedback compression)
  # keeps base.ClientStates pairs; the canary id joins the algorithm half.
  client_state_init.pairs_aggregation_state = getattr(
      algorithm.client_state_init, "pairs_aggregation_state", False)

  def client_init(broadcast, client_state, rng):
    inner_state, canary_id = client_state
    return (algorithm.client_init(broadcast, inner_state, rng),
            jnp.asarray(canary_id, jnp.int32))

  def client_step(carry, batch, mask):
    inner_carry, canary_id = carry
    return algorithm.client_step(inner_carry, batch, mask), canary_id

  def client_final(broadcast, carry, num_examples):
    inner_carry, canary_id = carry
    update = algorithm.client_final(broadcast, inner_carry, num_examples)
    is_canary = canary_id >= 0
    direction = canary_direction(update.delta, jnp.maximum(canary_id, 0),
                                 seed)
    delta = jax.tree.map(
        lambda d, u: jnp.where(is_canary, (clip_norm * u).astype(d.dtype), d),
        update.delta, direction)
    real = 1.0 - is_canary.astype(jnp.float32)
    metrics = {name: (value * real, weight * real)
               for name, (value, weight) in update.metrics.items()}
    metrics["canary_fraction"] = (is_canary.astype(jnp.float32),
                                  jnp.ones([], jnp.float32))
    return update._replace(delta=delta,
                           client_state=(update.client_state, canary_id),
                           metrics=metrics)

  return dataclasses.replace(
      algorithm, name=f"{algorithm.name}+canaries", client_init=client_init,
      client_step=client_step, client_final=client_final,
      client_state_init=client_state_init)


def _with_canary_ids(states: Any, canary_ids: Any) -> Any:
  """``(states, canary_ids)``, or inside the algorithm half of a
  :class:`base.ClientStates` pair (the engine hands that half to local
  training and the other to the aggregation chain)."""
  if isinstance(states, base.ClientStates):
    return states._replace(algorithm=(states.algorithm, canary_ids))
  return (states, canary_ids)


@dataclasses.dataclass(frozen=True)
class CanarySetup:
  """Which clients are canaries and how their directions are drawn.

  Attributes:
    num_canaries: ``k``, inserted canaries (ids ``0..k-1``).
    num_held_out: ``k'``, never-inserted directions (ids ``k..k+k'-1``).
    seed: seed of the directions.
    clip_norm: norm ``C`` of every canary update.
    num_real_clients: the canaries are training rows
      ``num_real_clients .. num_real_clients + k - 1``; canary ``i`` is row
      ``num_real_clients + i``.
    source_client: the real client whose examples each canary row copies
      (only so the engine has data to run; the result is discarded).
  """

  num_canaries: int
  num_held_out: int
  seed: int
  clip_norm: float
  num_real_clients: int
  source_client: int

  @property
  def inserted_ids(self) -> np.ndarray:
    """Ids of the inserted canaries, ``0..k-1``."""
    return np.arange(self.num_canaries)

  @property
  def held_out_ids(self) -> np.ndarray:
    """Ids of the never-inserted directions, ``k..k+k'-1``."""
    return np.arange(self.num_canaries, self.num_canaries + self.num_held_out)

  @property
  def canary_rows(self) -> np.ndarray:
    """Training-store rows of the inserted canaries, in id order."""
    return self.num_real_clients + self.inserted_ids


def _append_canary_clients(store: ClientStore, num_canaries: int,
                           source_client: int) -> ClientStore:
  """``store`` followed by ``num_canaries`` copies of one client's examples."""
  source = store.client(source_client)
  size = int(store.client_sizes[source_client])
  features = {name: np.concatenate([column] + [source[name]] * num_canaries)
              for name, column in store.features.items()}
  offsets = np.concatenate([
      store.offsets,
      store.offsets[-1] + size * np.arange(1, num_canaries + 1)])
  ids = np.concatenate([store.client_ids.astype(object),
                        np.asarray([f"canary_{i}" for i in
                                    range(num_canaries)], dtype=object)])
  return ClientStore(ids.astype(str), offsets, features)


def _rebuild_sampler(sampler: Any, num_clients: int) -> Any:
  """The same kind of sampler (rate / cohort size, seed) over a new population."""
  kind = sampler.kind
  if kind == "poisson":
    return sampling.make_sampler(kind, num_clients,
                                 sampling_rate=sampler.sampling_rate,
                                 seed=sampler.seed)
  return sampling.make_sampler(kind, num_clients,
                               cohort_size=sampler.cohort_size,
                               seed=sampler.seed)


def _privacy_block(config: Any) -> Any:
  return config.get("privacy") if hasattr(config, "get") else None


def resolve_clip_norm(experiment: Experiment,
                      clip_norm: float | None = None) -> float | None:
  """The canary norm ``C``: ``clip_norm`` if given, else the experiment's DP
  plan's clip norm, else ``config.privacy.clip_norm``, else ``None``."""
  if clip_norm is not None:
    return float(clip_norm)
  plan = getattr(experiment, "privacy", None)
  if plan is not None:
    return float(plan.clip_norm)
  privacy = _privacy_block(experiment.config)
  if privacy is not None and privacy.get("clip_norm") is not None:
    return float(privacy.get("clip_norm"))
  return None


def resolve_delta(experiment: Experiment,
                  delta: float | None = None) -> float:
  """The ``delta`` to report at: ``delta`` if given, else the DP plan's (the
  accountant's), else ``config.privacy.delta`` if > 0, else
  ``1 / N**1.1`` for the ``N`` training clients (the plan's default rule)."""
  if delta is not None:
    return float(delta)
  plan = getattr(experiment, "privacy", None)
  if plan is not None:
    return float(plan.delta)
  privacy = _privacy_block(experiment.config)
  if privacy is not None and privacy.get("delta"):
    return float(privacy.get("delta"))
  return plan_lib.default_delta(experiment.dataset.train.num_clients)


def add_canaries(experiment: Experiment, num_canaries: int,
                 num_held_out: int, seed: int,
                 clip_norm: float | None = None,
                 source_client: int | None = None
                 ) -> tuple[Experiment, CanarySetup]:
  """``experiment`` with ``num_canaries`` canary clients in its population.

  The returned experiment (a ``dataclasses.replace`` copy; the input is not
  modified) has:

  * ``dataset.train`` = the real clients, unchanged and at the same positions,
    followed by ``num_canaries`` rows holding copies of one real client's
    examples (by default the client of median size, so canaries cost what a
    typical client costs and, under ``num_examples`` weighting without DP,
    weigh what a typical client weighs);
  * a sampler of the same kind, rate or cohort size and seed over the larger
    population (canaries are sampled exactly like real clients; note that a
    fixed cohort size over ``N + k`` clients is a slightly lower sampling
    rate, and the cohorts of real clients change);
  * the algorithm wrapped by :func:`with_canaries`;
  * ``client_states_init`` giving row ``N + i`` canary id ``i`` and real rows
    ``-1`` (on top of the previous hook's states, if it had one).

  Args:
    experiment: a built experiment (``setup.build_experiment``).
    num_canaries: ``k >= 1``, canaries inserted into the population.
    num_held_out: ``k' >= 0``, directions drawn but never inserted.
    seed: seed of the canary directions.
    clip_norm: ``C``; default :func:`resolve_clip_norm` (the DP plan's or
      ``config.privacy.clip_norm``).
    source_client: real client whose data the canary rows copy.

  Returns:
    ``(experiment_with_canaries, setup)``.
  """
  num_canaries, num_held_out = int(num_canaries), int(num_held_out)
  if num_canaries < 1 or num_held_out < 0:
    raise ValueError("need num_canaries >= 1 and num_held_out >= 0, got "
                     f"{num_canaries} and {num_held_out}.")
  clip_norm = resolve_clip_norm(experiment, clip_norm)
  if clip_norm is None:
    raise ValueError("the config has no privacy.clip_norm; pass clip_norm "
                     "(the L2 norm of a canary update).")
  train = experiment.dataset.train
  num_real = train.num_clients
  if source_client is None:
    sizes = train.client_sizes
    source_client = int(np.argsort(sizes, kind="stable")[len(sizes) // 2])
  if not 0 <= source_client < num_real:
    raise ValueError(f"source_client must be in [0, {num_real}), got "
                     f"{source_client}.")
  canaries = CanarySetup(num_canaries=num_canaries, num_held_out=num_held_out,
                         seed=int(seed), clip_norm=float(clip_norm),
                         num_real_clients=num_real,
                         source_client=source_client)
  new_train = _append_canary_clients(train, num_canaries, source_client)
  dataset: FederatedDataset = dataclasses.replace(
      experiment.dataset, train=new_train,
      info={**experiment.dataset.info, "canaries": num_canaries})
  inner_algorithm = experiment.algorithm
  inner_states_init = experiment.client_states_init

  def client_states_init(params, num_clients):
    if num_clients != num_real + num_canaries:
      raise ValueError(f"expected {num_real + num_canaries} clients (real + "
                       f"canaries), got {num_clients}.")
    if inner_states_init is not None:
      inner = inner_states_init(params, num_clients)
    else:
      inner = round_lib.stack_client_states(
          inner_algorithm.client_state_init(params), num_clients)
    ids = np.full([num_clients], -1, np.int32)
    ids[num_real:] = np.arange(num_canaries, dtype=np.int32)
    return _with_canary_ids(inner, ids)

  new_experiment = dataclasses.replace(
      experiment, dataset=dataset,
      sampler=_rebuild_sampler(experiment.sampler, new_train.num_clients),
      algorithm=with_canaries(inner_algorithm, canaries.clip_norm,
                              canaries.seed),
      client_states_init=client_states_init)
  return new_experiment, canaries
