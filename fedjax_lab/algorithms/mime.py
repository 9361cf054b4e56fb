"""Mime and MimeLite: local steps mimic a server-side optimizer's statistics.

Karimireddy, Jaggi, Kale, Mohri, Reddi, Stich & Suresh, "Breaking the
centralized barrier for cross-device federated learning", NeurIPS 2021
(Mime, Algorithm 1; MimeLite, its variant without control variates).

A base optimizer (any optax transformation: SGD with momentum, Adam, ...)
keeps its statistics ``s`` on the server. A round with server model ``x``:

* every sampled client starts at ``y = x`` and takes local steps
  ``y <- y + lr * U(g, s)`` where ``U(g, s)`` is the optax update of ``g``
  under the FROZEN state ``s`` (the new state optax returns is dropped);
* MimeLite: ``g = grad f_k(y; batch)``;
  Mime: ``g = grad f_k(y; batch) - grad f_k(x; batch) + c`` (an SVRG
  correction) with ``c`` the full-batch gradient at ``x`` averaged over the
  round's clients;
* server: ``x <- x + server_lr * mean_k(y_k - x)`` and ``s`` becomes the
  state optax returns for the gradient ``c`` at ``x`` (its update is dropped).

With a stateless base optimizer (``optax.sgd(1.0)``) MimeLite is FedAvg with
client SGD at ``lr``; Mime with one full-batch local step per client is
FedSGD's step ``x - lr * c``.

Engine mapping: ``s`` is ``ServerState.opt_state``. MimeLite computes the
gradient at ``x`` during local training (one extra gradient per step, summed
with example weights, as FedSGD does) and sends the pair
``(y - x, grad f_k(x))``; one aggregation covers both and ``server_update``
splits it. Mime needs ``c`` before local training, so it declares a
:class:`~fedjax_lab.algorithms.base.PreRound`: the engine first runs a
gradient pass at ``x`` over the same cohort and stores the weighted mean in
``ServerState.extra`` before broadcasting ``(x, s, c)``.

The "full-batch" gradient is taken over the cohort's batches of the round:
with several local epochs an example counts once per epoch, which over whole
epochs is exactly the gradient of the client's mean loss.
"""

from __future__ import annotations

import types
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import local
from fedjax_lab.algorithms import recipe
from fedjax_lab.algorithms.optimizers import build_optimizer
from fedjax_lab.algorithms.tree_math import zeros_like_f32
from fedjax_lab.models import base as model_base


class MimeCarry(NamedTuple):
  """Per-client state during Mime / MimeLite local training.

  Attributes:
    params: the local model ``y``.
    global_params: the server model ``x`` (gradients at ``x`` are taken here).
    opt_state: the base optimizer's frozen server state ``s``.
    server_grad: Mime: the cohort's full-batch gradient ``c``; MimeLite ``()``.
    grad_sum: MimeLite: running sum of example-weighted gradients at ``x``;
      Mime ``()``.
    rng: the client's key for local steps.
    loss_sum: summed example loss over the local steps (at ``y``).
    loss_weight: summed example weight over the local steps.
  """

  params: base.PyTree
  global_params: base.PyTree
  opt_state: base.PyTree
  server_grad: base.PyTree
  grad_sum: base.PyTree
  rng: jax.Array
  loss_sum: jax.Array
  loss_weight: jax.Array


def _add_weighted(grad_sum: base.PyTree, grads: base.PyTree,
                  weight: jax.Array) -> base.PyTree:
  """``grad_sum + weight * grads``: a batch-mean gradient back to a sum."""
  return jax.tree.map(lambda acc, g: acc + g * weight, grad_sum, grads)


def _mean_grad(grad_sum: base.PyTree, weight: jax.Array) -> base.PyTree:
  """``grad_sum / weight`` (0 for a client without examples)."""
  scale = 1.0 / jnp.maximum(weight, 1e-12)
  return jax.tree.map(lambda g: g * scale, grad_sum)


def frozen_step(base_optimizer: optax.GradientTransformation,
                learning_rate: float, params: base.PyTree,
                grads: base.PyTree, opt_state: base.PyTree) -> base.PyTree:
  """``params + learning_rate * U(grads, opt_state)``; the state is not updated.

  ``U`` is ``base_optimizer.update`` (which already carries the descent sign
  and the optimizer's own learning rate); the new state it returns is
  discarded, as Mime's local steps require (Karimireddy et al., NeurIPS 2021,
  Algorithm 1, line "y <- y - eta U(g, s)").
  """
  updates, _ = base_optimizer.update(grads, opt_state, params)
  updates = jax.tree.map(lambda u: learning_rate * u, updates)
  return optax.apply_updates(params, updates)


def _full_batch_pre_round(model: model_base.Model,
                          weighting: str) -> base.PreRound:
  """Mime's first pass: each client's mean-loss gradient at the server model."""

  def client_init(bcast, client_state, rng):
    del client_state
    global_params = bcast[0]
    zero = jnp.zeros([], jnp.float32)
    return (global_params,
            local.GradCarry(zeros_like_f32(global_params), rng, zero, zero))

  def client_step(carry, batch, mask):
    global_params, inner = carry
    rng, step_rng = jax.random.split(inner.rng)
    grads, loss_sum, weight_sum = local.masked_loss_and_grad(
        model, global_params, batch, mask, step_rng)
    return (global_params,
            local.GradCarry(_add_weighted(inner.grad_sum, grads, weight_sum),
                             rng, inner.loss_sum + loss_sum,
                             inner.loss_weight + weight_sum))

  def client_final(bcast, carry, num_examples):
    del bcast
    _, inner = carry
    return (_mean_grad(inner.grad_sum, inner.loss_weight),
            local.client_weight(weighting, num_examples))

  def absorb(state, mean_grad):
    return state._replace(extra=mean_grad)

  return base.PreRound(client_init=client_init, client_step=client_step,
                       client_final=client_final, absorb=absorb)


def _check_arguments(client_learning_rate: float, server_learning_rate: float,
                     weighting: str) -> None:
  local.check_weighting(weighting)
  base.positive_number("client_learning_rate", client_learning_rate)
  base.positive_number("server_learning_rate", server_learning_rate)


def _build(model: model_base.Model,
           base_optimizer: optax.GradientTransformation,
           client_learning_rate: float, server_learning_rate: float,
           weighting: str, aggregator: base.Aggregator | None,
           lite: bool) -> base.FederatedAlgorithm:
  """Mime (``lite=False``) or MimeLite (``lite=True``); see the module doc."""
  _check_arguments(client_learning_rate, server_learning_rate, weighting)
  aggregator = aggregator or base.weighted_mean()
  lr = base.positive_number("client_learning_rate", client_learning_rate)
  server_lr = base.positive_number("server_learning_rate",
                                   server_learning_rate)

  def server_init(params):
    return base.ServerState(
        params=params, opt_state=base_optimizer.init(params),
        round=jnp.zeros([], jnp.int32), aggregator_state=aggregator.init(),
        extra=() if lite else zeros_like_f32(params))

  def broadcast(state):
    return (state.params, state.opt_state, state.extra)

  def client_init(bcast, client_state, rng):
    del client_state
    global_params, opt_state, server_grad = bcast
    zero = jnp.zeros([], jnp.float32)
    grad_sum = zeros_like_f32(global_params) if lite else ()
    return MimeCarry(global_params, global_params, opt_state, server_grad,
                     grad_sum, rng, zero, zero)

  def client_step(carry, batch, mask):
    rng, step_rng = jax.random.split(carry.rng)
    grads, loss_sum, weight_sum = local.masked_loss_and_grad(
        model, carry.params, batch, mask, step_rng)
    # Same key as at y: with dropout both gradients see the same mask.
    anchor_grads, _, _ = local.masked_loss_and_grad(
        model, carry.global_params, batch, mask, step_rng)
    grad_sum = carry.grad_sum
    if lite:
      grad_sum = _add_weighted(grad_sum, anchor_grads, weight_sum)
    else:
      grads = jax.tree.map(lambda g, ga, c: g - ga + c, grads, anchor_grads,
                           carry.server_grad)
    params = frozen_step(base_optimizer, lr, carry.params, grads,
                         carry.opt_state)
    return carry._replace(params=params, grad_sum=grad_sum, rng=rng,
                          loss_sum=carry.loss_sum + loss_sum,
                          loss_weight=carry.loss_weight + weight_sum)

  def client_final(bcast, carry, num_examples):
    global_params = bcast[0]
    delta = jax.tree.map(jnp.subtract, carry.params, global_params)
    if lite:
      delta = (delta, _mean_grad(carry.grad_sum, carry.loss_weight))
    return base.ClientUpdate(
        delta=delta, weight=local.client_weight(weighting, num_examples),
        client_state=(),
        metrics={"train_loss": (carry.loss_sum, carry.loss_weight)})

  def server_update(state, aggregate):
    if lite:
      mean_delta, server_grad = aggregate
    else:
      mean_delta, server_grad = aggregate, state.extra
    _, opt_state = base_optimizer.update(server_grad, state.opt_state,
                                         state.params)
    params = optax.apply_updates(
        state.params, jax.tree.map(lambda d: server_lr * d, mean_delta))
    metrics = {"aggregate_delta_norm": optax.tree.norm(mean_delta),
               "server_grad_norm": optax.tree.norm(server_grad)}
    return state._replace(params=params, opt_state=opt_state,
                          round=state.round + 1), metrics

  return base.FederatedAlgorithm(
      name="mimelite" if lite else "mime", server_init=server_init,
      broadcast=broadcast, client_init=client_init, client_step=client_step,
      client_final=client_final, aggregator=aggregator,
      server_update=server_update,
      pre_round=None if lite else _full_batch_pre_round(model, weighting))


def mime(model: model_base.Model,
         base_optimizer: optax.GradientTransformation,
         client_learning_rate: float,
         server_learning_rate: float = 1.0,
         weighting: str = "num_examples",
         aggregator: base.Aggregator | None = None) -> base.FederatedAlgorithm:
  """Mime (Karimireddy et al., NeurIPS 2021, Algorithm 1).

  Each round makes two passes over the cohort: first the full-batch gradient
  ``c`` at the server model ``x`` (the engine's pre-round, stored in
  ``ServerState.extra``), then local training with the corrected gradient
  ``grad f_k(y) - grad f_k(x) + c`` under the frozen base-optimizer state.

  Privacy: ``aggregator`` only sees the model deltas. ``c`` is an exact,
  unclipped, noiseless average of the clients' gradients that shapes every
  client's update and the server's optimizer state, so Mime with a DP
  aggregator is NOT a central-DP release of the round; use :func:`mimelite`,
  whose gradient rides in the clipped, noised update.

  Args:
    model: the model to train.
    base_optimizer: the optax optimizer Mime mimics (e.g.
      ``optax.sgd(1.0, momentum=0.9)``, ``optax.adam(1.0)``); its own learning
      rate multiplies ``client_learning_rate``, so give it 1.0.
    client_learning_rate: local step size ``eta``.
    server_learning_rate: ``x <- x + server_learning_rate * mean(y - x)``.
    weighting: ``"num_examples"`` or ``"uniform"``; weights both the mean of
      the deltas and the mean gradient ``c``.
    aggregator: how the deltas are combined; default weighted mean.

  Raises:
    ValueError: unknown ``weighting`` or a non-positive learning rate.
  """
  return _build(model, base_optimizer, client_learning_rate,
                server_learning_rate, weighting, aggregator, lite=False)


def mimelite(model: model_base.Model,
             base_optimizer: optax.GradientTransformation,
             client_learning_rate: float,
             server_learning_rate: float = 1.0,
             weighting: str = "num_examples",
             aggregator: base.Aggregator | None = None
             ) -> base.FederatedAlgorithm:
  """MimeLite (Karimireddy et al., NeurIPS 2021, Sec. 3): Mime without ``c``.

  Local steps use the plain gradient under the frozen base-optimizer state.
  The client's gradient at ``x`` (taken on its local batches alongside
  training) travels with its delta as the pair ``(y - x, grad f_k(x))``, so
  a DP aggregator clips the pair jointly (one L2 norm over both) and noises
  both: the optimizer state is then updated from the privatised gradient, and
  the round is one DP release. Arguments are those of :func:`mime`.
  """
  return _build(model, base_optimizer, client_learning_rate,
                server_learning_rate, weighting, aggregator, lite=True)


# ---- recipes -----------------------------------------------------------------


_BASE_HPARAMS = types.MappingProxyType({"momentum": 0.9})


def _from_config(lite: bool):
  """The recipe builder of Mime (``lite=False``) or MimeLite."""

  def build(context: recipe.BuildContext, *,
            base_optimizer: str = "momentum",
            base_hparams: Mapping[str, Any] = _BASE_HPARAMS
            ) -> base.FederatedAlgorithm:
    """Mime / MimeLite from the ``mime`` block: the optax optimizer clients
    mimic, by name with its hyperparameters (learning rate 1; its state
    lives on the server, frozen in local steps whose step size is
    ``client.learning_rate``; optax momentum is undampened, its step is
    ~ lr / (1 - momentum)); the server step is ``server.learning_rate``
    (``server.optimizer`` must be sgd)."""
    mimicked = build_optimizer(base_optimizer, 1.0, base_hparams)
    return _build(context.model, mimicked, context.config.client.learning_rate,
                  context.config.server.learning_rate, context.weighting,
                  context.aggregator, lite=lite)

  return build


def _requires(context: recipe.BuildContext) -> str | None:
  if context.config.server.optimizer != "sgd":
    return (f"algorithm={context.config.algorithm!r} steps x + "
            "server.learning_rate * mean(y - x); the optimizer it mimics is "
            "mime.base_optimizer. Set server.optimizer='sgd'.")
  return None


def _refuse_mime(context: recipe.BuildContext, mechanism: str) -> str:
  del context, mechanism  # every mechanism
  return ("Mime broadcasts the cohort's exact (un-noised) mean gradient "
          "before local training, which no DP mechanism covers; use "
          "algorithm='mimelite' (its gradient rides in the clipped, noised "
          "update).")


MIME = recipe.Recipe("mime", build=_from_config(lite=False), block="mime",
                     requires=_requires, refuse=_refuse_mime)
MIMELITE = recipe.Recipe(
    "mimelite", build=_from_config(lite=True), block="mime",
    requires=_requires,
    refuses={"tree": "DP-FTRL noises the server optimizer's input, but "
                     "MimeLite updates its optimizer statistics outside it; "
                     "use privacy.mechanism='gaussian' or 'adaptive'."})
