"""FedAvg, FedOpt and FedSGD as pure init/step/final functions.

* FedAvg: McMahan et al., "Communication-Efficient Learning of Deep Networks
  from Decentralized Data", AISTATS 2017.
* FedOpt (FedAvgM / FedAdam / FedYogi / FedAdagrad): Reddi et al., "Adaptive
  Federated Optimization", ICLR 2021 — FedAvg whose server treats the negated
  average model delta as a pseudo-gradient for any optax optimizer.
* FedSGD: the FedAvg paper's baseline — each client computes the gradient of
  its loss over all its local examples at the global model, no local update.

Recipes: ``fedavg`` and ``fedopt`` (the same algorithm: the server optimizer
is the ``server`` block's) and ``fedsgd``; none has a config block. The
local-training kit they share with the other algorithms is
:mod:`fedjax_lab.algorithms.local`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import local
from fedjax_lab.algorithms import recipe
from fedjax_lab.models import base as model_base


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
  local.check_weighting(weighting)
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
    return local.local_init(client_optimizer, global_params, rng)

  def client_step(carry, batch, mask):
    return local.local_step(model, client_optimizer, carry, batch, mask)

  def client_final(global_params, carry, num_examples):
    return local.local_update(weighting, global_params, carry, num_examples)

  def server_update(state, aggregate):
    return local.server_opt_update(server_optimizer, state, aggregate)

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
            local.GradCarry(jax.tree.map(jnp.zeros_like, global_params), rng,
                            zero, zero))

  def client_step(carry, batch, mask):
    global_params, inner_carry = carry
    rng, step_rng = jax.random.split(inner_carry.rng)
    grads, loss_sum, weight_sum = local.masked_loss_and_grad(
        model, global_params, batch, mask, step_rng)
    # Gradient of the batch's loss SUM, so the total is exact over batches.
    grad_sum = jax.tree.map(lambda acc, g: acc + g * weight_sum,
                            inner_carry.grad_sum, grads)
    return (global_params,
            local.GradCarry(grad_sum, rng, inner_carry.loss_sum + loss_sum,
                            inner_carry.loss_weight + weight_sum))

  def client_final(global_params, carry, num_examples):
    _, inner_carry = carry
    scale = 1.0 / jnp.maximum(inner_carry.loss_weight, 1e-12)
    delta = jax.tree.map(lambda g: -g * scale, inner_carry.grad_sum)
    return base.ClientUpdate(
        delta=delta, weight=local.client_weight(weighting, num_examples),
        client_state=(),
        metrics={"train_loss": (inner_carry.loss_sum,
                                inner_carry.loss_weight)})

  return dataclasses.replace(server_side, client_init=client_init,
                             client_step=client_step,
                             client_final=client_final)


def _build_fedopt(name: str):
  """The recipe builder of FedOpt named ``name`` (``fedavg`` or ``fedopt``)."""

  def build(context: recipe.BuildContext) -> base.FederatedAlgorithm:
    return fedopt(context.model, context.client_optimizer,
                  context.server_optimizer, weighting=context.weighting,
                  aggregator=context.aggregator, name=name)

  return build


def _build_fedsgd(context: recipe.BuildContext) -> base.FederatedAlgorithm:
  return fedsgd(context.model, context.server_optimizer,
                weighting=context.weighting, aggregator=context.aggregator)


FEDAVG = recipe.Recipe("fedavg", build=_build_fedopt("fedavg"))
FEDOPT = recipe.Recipe("fedopt", build=_build_fedopt("fedopt"))
FEDSGD = recipe.Recipe("fedsgd", build=_build_fedsgd)
