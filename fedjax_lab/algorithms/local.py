"""The shared local-training kit: client weights, masked gradients, local SGD.

Every algorithm's client part is built from these pieces:

* :func:`check_weighting` / :func:`client_weight`: a client's aggregation
  weight, its example count (``"num_examples"``) or 1 (``"uniform"``).
* :func:`masked_loss_and_grad`: the gradient of a batch's masked mean loss.
* :class:`LocalCarry` with :func:`local_init`, :func:`local_step` and
  :func:`local_update`: FedAvg's local optax training (init, one step, the
  delta ``local - global`` as a :class:`~fedjax_lab.algorithms.base.
  ClientUpdate`), which FedProx, Reptile, agnostic FL and HypCluster wrap.
* :class:`GradCarry`: a running sum of example-weighted gradients (FedSGD,
  Mime's full-batch pass).
* :func:`server_opt_update`: FedOpt's server step on ``-aggregate``.
* :func:`train_clients`: local training of a whole cohort outside a round
  (HypCluster's k-means initialisation), computed as the engine's
  ``vmap+scan`` round computes it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.models import base as model_base

WEIGHTINGS = ("num_examples", "uniform")


class LocalCarry(NamedTuple):
  """Per-client state during local training."""

  params: base.PyTree
  opt_state: base.PyTree
  rng: jax.Array
  loss_sum: jax.Array
  loss_weight: jax.Array


class GradCarry(NamedTuple):
  """A running sum of example-weighted gradients and of the batches' loss."""

  grad_sum: base.PyTree
  rng: jax.Array
  loss_sum: jax.Array
  loss_weight: jax.Array


def check_weighting(weighting: str) -> None:
  """Raises ValueError unless ``weighting`` is one of :data:`WEIGHTINGS`."""
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got "
                     f"{weighting!r}.")


def client_weight(weighting: str, num_examples: jax.Array) -> jax.Array:
  """A client's aggregation weight: its example count, or 1 (``uniform``)."""
  if weighting == "uniform":
    return jnp.ones_like(num_examples)
  return num_examples


def masked_loss_and_grad(model: model_base.Model, params: base.PyTree,
                         batch: dict[str, jax.Array], mask: jax.Array,
                         rng: jax.Array
                         ) -> tuple[base.PyTree, jax.Array, jax.Array]:
  """Gradient of the masked mean loss, and the batch's loss and weight sums."""

  def loss_fn(p):
    logits = model.apply(p, batch, rng, True)
    loss_sum, weight = model.example_loss(logits, batch)
    maskf = mask.astype(loss_sum.dtype)
    total_loss = jnp.sum(loss_sum * maskf)
    total_weight = jnp.sum(weight * maskf)
    return total_loss / jnp.maximum(total_weight, 1e-12), (total_loss,
                                                           total_weight)

  (_, (loss_sum, weight_sum)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(params)
  return grads, loss_sum, weight_sum


def local_init(client_optimizer: optax.GradientTransformation,
               global_params: base.PyTree, rng: jax.Array) -> LocalCarry:
  """Local training starts at the global model with a fresh optimizer state."""
  zero = jnp.zeros([], jnp.float32)
  return LocalCarry(global_params, client_optimizer.init(global_params), rng,
                    zero, zero)


def local_step(model: model_base.Model,
               client_optimizer: optax.GradientTransformation,
               carry: LocalCarry, batch: dict[str, jax.Array],
               mask: jax.Array) -> LocalCarry:
  """One optax step on the batch's masked mean loss (a fresh key per step)."""
  rng, step_rng = jax.random.split(carry.rng)
  grads, loss_sum, weight_sum = masked_loss_and_grad(
      model, carry.params, batch, mask, step_rng)
  updates, opt_state = client_optimizer.update(grads, carry.opt_state,
                                               carry.params)
  params = optax.apply_updates(carry.params, updates)
  return LocalCarry(params, opt_state, rng, carry.loss_sum + loss_sum,
                    carry.loss_weight + weight_sum)


def local_update(weighting: str, global_params: base.PyTree,
                 carry: LocalCarry, num_examples: jax.Array
                 ) -> base.ClientUpdate:
  """The stateless client update ``local - global`` with its weight and
  ``train_loss``."""
  delta = jax.tree.map(jnp.subtract, carry.params, global_params)
  return base.ClientUpdate(
      delta=delta, weight=client_weight(weighting, num_examples),
      client_state=(),
      metrics={"train_loss": (carry.loss_sum, carry.loss_weight)})


def server_opt_update(server_optimizer: optax.GradientTransformation,
                      state: base.ServerState,
                      aggregate: base.PyTree) -> tuple[base.ServerState,
                                                       base.Metrics]:
  """FedOpt server step: pseudo-gradient ``-aggregate`` into the optimizer."""
  pseudo_grad = jax.tree.map(jnp.negative, aggregate)
  updates, opt_state = server_optimizer.update(pseudo_grad, state.opt_state,
                                               state.params)
  params = optax.apply_updates(state.params, updates)
  update_norm = optax.tree.norm(aggregate)
  return state._replace(params=params, opt_state=opt_state,
                        round=state.round + 1), {
                            "aggregate_delta_norm": update_norm}


def over_clients(fn: Callable[..., Any], in_axes: Sequence[int | None],
                 num_clients: int) -> Callable[..., Any]:
  """``jax.vmap(fn, in_axes)`` over ``num_clients`` clients; for one client,
  ``fn`` on the squeezed client with the axis put back (a vmap over one
  client still costs ~1.5x on XLA:CPU). The engine's client groups use it
  too."""
  if num_clients != 1:
    return jax.vmap(fn, in_axes=in_axes)

  def single(*args):
    args = [a if axis is None else jax.tree.map(lambda x: x[0], a)
            for a, axis in zip(args, in_axes)]
    return jax.tree.map(lambda x: x[None], fn(*args))

  return single


def train_clients(model: model_base.Model,
                  client_optimizer: optax.GradientTransformation,
                  init_params: base.PyTree, cohort: cohort_lib.CohortBatch,
                  rng: jax.Array) -> base.PyTree:
  """Every cohort slot's model after local training from ``init_params``.

  Local steps are :func:`local_step`'s, vectorised over the cohort's
  ``C`` slots and scanned over its ``S`` steps; a step is a no-op for a
  client without real examples in it. Client ``i`` trains with key
  ``fold_in(fold_in(rng, 0), i)``: exactly what the engine's round 0 of
  FedAvg does with ``Strategy("vmap", "scan")``. Returns the local models
  stacked ``[C, ...]`` (padding slots included).
  """
  init = lambda params, client_rng: local_init(client_optimizer, params,
                                               client_rng)

  def masked_step(carry, batch, mask):
    new_carry = local_step(model, client_optimizer, carry, batch, mask)
    active = jnp.any(mask > 0)
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new_carry, carry)

  @jax.jit
  def run(params, features, mask, client_indices):
    num_clients, num_steps = mask.shape[:2]
    step = over_clients(masked_step, (0, 0, 0), num_clients)
    round_rng = jax.random.fold_in(rng, jnp.zeros([], jnp.int32))
    rngs = jax.vmap(lambda i: jax.random.fold_in(round_rng, i))(
        client_indices)
    carry = over_clients(init, (None, 0), num_clients)(params, rngs)

    def body(carry, s):
      take = lambda a: jax.lax.dynamic_index_in_dim(a, s, 1, keepdims=False)
      batch, step_mask = jax.tree.map(take, features), take(mask)
      carry = jax.lax.cond(jnp.any(step_mask > 0), step, lambda c, b, m: c,
                           carry, batch, step_mask)
      return carry, None

    carry, _ = jax.lax.scan(body, carry, jnp.arange(num_steps))
    return carry.params

  return run(init_params, dict(cohort.features), cohort.example_mask,
             cohort.client_indices)
