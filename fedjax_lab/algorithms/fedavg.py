"""FedAvg, FedOpt and FedSGD as pure init/step/final functions.

* FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks
  from Decentralized Data", AISTATS 2017.
* FedOpt (FedAvgM / FedAdam / FedYogi / FedAdagrad): Reddi et al., "Adaptive
  Federated Optimization", ICLR 2021 — FedAvg whose server treats the negated
  average model delta as a pseudo-gradient for any optax optimizer.
* FedSGD: the FedAvg paper's baseline — each client computes the gradient of
  its loss over all its local examples at the global model, no local update.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.models import base as model_base

WEIGHTINGS = ("num_examples", "uniform")


class LocalCarry(NamedTuple):
  """Per-client state during local training."""

  params: base.PyTree
  opt_state: base.PyTree
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


def masked_loss_and_grad(model, params, batch, mask, rng):
  """Gradient of the masked mean loss; also (loss_sum, weight_sum) of the batch."""

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


def fedopt(model: model_base.Model,
           client_optimizer: optax.GradientTransformation,
           server_optimizer: optax.GradientTransformation,
           weighting: str = "num_examples",
           aggregator: base.Aggregator | None = None,
           name: str = "fedopt") -> base.FederatedAlgorithm:
  """FedAvg / FedOpt: local optax training, weighted delta average, server optax.

  Args:
    model: the model to train.
    client_optimizer: optax transformation for local steps (re-initialised at
      the start of every round, as in the papers).
    server_optimizer: optax transformation applied to the pseudo-gradient
      ``-(weighted mean of client deltas)``; ``optax.sgd(1.0)`` is FedAvg.
    weighting: ``"num_examples"`` (weight each client by its dataset size, as
      in McMahan et al.) or ``"uniform"``.
    aggregator: how deltas are combined; default weighted mean. A DP
      aggregator plugs in here.
    name: display name.
  """
  check_weighting(weighting)
  aggregator = aggregator or base.weighted_mean()

  def server_init(params):
    return base.ServerState(params=params,
                            opt_state=server_optimizer.init(params),
                            round=jnp.zeros([], jnp.int32),
                            aggregator_state=aggregator.init())

  def broadcast(state):
    return state.params

  def client_init(global_params, client_state, rng):
    del client_state
    zero = jnp.zeros([], jnp.float32)
    return LocalCarry(global_params, client_optimizer.init(global_params), rng,
                      zero, zero)

  def client_step(carry, batch, mask):
    rng, step_rng = jax.random.split(carry.rng)
    grads, loss_sum, weight_sum = masked_loss_and_grad(
        model, carry.params, batch, mask, step_rng)
    updates, opt_state = client_optimizer.update(grads, carry.opt_state,
                                                 carry.params)
    params = optax.apply_updates(carry.params, updates)
    return LocalCarry(params, opt_state, rng, carry.loss_sum + loss_sum,
                      carry.loss_weight + weight_sum)

  def client_final(global_params, carry, num_examples):
    delta = jax.tree.map(jnp.subtract, carry.params, global_params)
    return base.ClientUpdate(
        delta=delta, weight=client_weight(weighting, num_examples),
        client_state=(),
        metrics={"train_loss": (carry.loss_sum, carry.loss_weight)})

  def server_update(state, aggregate):
    return server_opt_update(server_optimizer, state, aggregate)

  return base.FederatedAlgorithm(
      name=name, server_init=server_init, broadcast=broadcast,
      client_init=client_init, client_step=client_step,
      client_final=client_final, aggregator=aggregator,
      server_update=server_update)


def fedavg(model: model_base.Model,
           client_optimizer: optax.GradientTransformation,
           server_learning_rate: float = 1.0,
           weighting: str = "num_examples",
           aggregator: base.Aggregator | None = None) -> base.FederatedAlgorithm:
  """FedAvg (McMahan et al. 2017): FedOpt with server SGD (lr 1 = plain average)."""
  return fedopt(model, client_optimizer, optax.sgd(server_learning_rate),
                weighting=weighting, aggregator=aggregator, name="fedavg")


class GradCarry(NamedTuple):
  grad_sum: base.PyTree
  rng: jax.Array
  loss_sum: jax.Array
  loss_weight: jax.Array


def fedsgd(model: model_base.Model,
           server_optimizer: optax.GradientTransformation,
           weighting: str = "num_examples",
           aggregator: base.Aggregator | None = None) -> base.FederatedAlgorithm:
  """FedSGD: each client sends ``-grad`` of its mean loss over all local data.

  The client's "delta" is the negated full-batch gradient at the global model,
  so the server optimizer (e.g. ``optax.sgd(lr)``) takes one gradient step on
  the weighted average of client gradients. Local batches only split the
  computation; they do not change the result.
  """
  # Server side (init, broadcast, aggregation, server step) is FedOpt's; only
  # the client part differs. FedOpt's client optimizer is never used here.
  server_side = fedopt(model, optax.sgd(1.0), server_optimizer, weighting,
                       aggregator, name="fedsgd")

  def client_init(global_params, client_state, rng):
    del client_state
    zero = jnp.zeros([], jnp.float32)
    # The global params ride along: every local gradient is taken at them.
    return (global_params,
            GradCarry(jax.tree.map(jnp.zeros_like, global_params), rng, zero,
                      zero))

  def client_step(carry, batch, mask):
    global_params, inner_carry = carry
    rng, step_rng = jax.random.split(inner_carry.rng)
    grads, loss_sum, weight_sum = masked_loss_and_grad(
        model, global_params, batch, mask, step_rng)
    # Gradient of the batch's loss SUM, so the total is exact over batches.
    grad_sum = jax.tree.map(lambda acc, g: acc + g * weight_sum,
                            inner_carry.grad_sum, grads)
    return (global_params,
            GradCarry(grad_sum, rng, inner_carry.loss_sum + loss_sum,
                      inner_carry.loss_weight + weight_sum))

  def client_final(global_params, carry, num_examples):
    _, inner_carry = carry
    scale = 1.0 / jnp.maximum(inner_carry.loss_weight, 1e-12)
    delta = jax.tree.map(lambda g: -g * scale, inner_carry.grad_sum)
    return base.ClientUpdate(
        delta=delta, weight=client_weight(weighting, num_examples),
        client_state=(),
        metrics={"train_loss": (inner_carry.loss_sum,
                                inner_carry.loss_weight)})

  return dataclasses.replace(server_side, client_init=client_init,
                             client_step=client_step,
                             client_final=client_final)
