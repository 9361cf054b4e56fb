"""SCAFFOLD: federated training corrected by control variates.

Karimireddy, Kale, Mohri, Reddi, Stich & Suresh 2020, "SCAFFOLD: Stochastic
Controlled Averaging for Federated Learning", ICML, Algorithm 1.

The server keeps a control variate ``c`` (an estimate of the global gradient)
and every client ``i`` a control variate ``c_i`` (an estimate of its own
gradient). Local SGD steps are corrected by ``c - c_i``, which removes the
client drift that makes FedAvg slow on heterogeneous data:

* round start: the server broadcasts ``(x, c)``;
* local step: ``y <- y - lr * (g_i(y) + c - c_i)``;
* end of local training: ``c_i+`` is either the client's full-batch gradient
  at ``x`` (option I) or ``c_i - c + (x - y) / (K * lr)`` (option II, ``K``
  local steps); the client sends ``(y - x, c_i+ - c_i)`` and keeps ``c_i+``;
* server: ``x`` takes a server-optimizer step on ``-mean(y - x)`` (with
  ``optax.sgd(eta_g)`` this is the paper's ``x + eta_g * mean(dy)``) and
  ``c <- c + (|S| / N) * mean(dc)``.

Engine mapping: ``c`` lives in ``ServerState.extra``; ``c_i`` is the client's
persistent state (``client_state_init`` gives zeros shaped like the
parameters), which the training loop gathers for the sampled clients and
scatters back afterwards, so clients outside the cohort keep their ``c_i``.
The aggregator only averages ``ClientUpdate.delta``, so ``delta`` is the pair
``(y - x, c_i+ - c_i)`` and :func:`scaffold`'s ``server_update`` splits it.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import local
from fedjax_lab.algorithms import recipe
from fedjax_lab.algorithms.tree_math import zeros_like_f32
from fedjax_lab.models import base as model_base

OPTIONS = ("I", "II")


class ScaffoldCarry(NamedTuple):
  """Per-client state during SCAFFOLD's local training.

  Attributes:
    params: the local model ``y``.
    correction: ``c - c_i``, added to every local gradient.
    client_control: the client's control variate ``c_i`` at round start.
    rng: the client's key for local steps.
    loss_sum: summed example loss over the local steps (at ``y``).
    loss_weight: summed example weight over the local steps.
    num_steps: local steps taken (steps with at least one real example).
    global_params: option I only: the global model ``x`` at which the
      gradient for ``c_i+`` is taken (``()`` for option II).
    grad_sum: option I only: running sum of example-weighted gradients at
      ``x`` (``()`` for option II).
  """

  params: base.PyTree
  correction: base.PyTree
  client_control: base.PyTree
  rng: jax.Array
  loss_sum: jax.Array
  loss_weight: jax.Array
  num_steps: jax.Array
  global_params: base.PyTree
  grad_sum: base.PyTree


def _with_cohort_size(aggregator: base.Aggregator,
                      expected_cohort_size: float | None = None
                      ) -> base.Aggregator:
  """``aggregator`` whose aggregate also carries the cohort size ``|S|``.

  SCAFFOLD's server step scales the control-variate update by ``|S| / N``;
  ``server_update`` does not see ``|S|``, so the finalize step attaches it:
  the round's real count, or ``expected_cohort_size`` when given (a DP run:
  the realised size of a Poisson cohort is private, and the DP aggregate is
  already a sum over the expected size).
  """

  def finalize(weighted_sum, total_weight, num_clients, state, rng):
    aggregate, state, metrics = aggregator.finalize(
        weighted_sum, total_weight, num_clients, state, rng)
    if expected_cohort_size is not None:
      num_clients = jnp.asarray(expected_cohort_size, jnp.float32)
    return (aggregate, num_clients), state, metrics

  # _replace keeps the aggregator's kind (an Aggregator, or a chain's
  # Transform with its per-client state).
  return aggregator._replace(finalize=finalize)


def scaffold(model: model_base.Model,
             client_learning_rate: float,
             server_optimizer: optax.GradientTransformation,
             option: str = "II",
             weighting: str = "uniform",
             aggregator: base.Aggregator | None = None,
             num_clients: int | None = None,
             expected_cohort_size: float | None = None
             ) -> base.FederatedAlgorithm:
  """SCAFFOLD (Karimireddy et al. 2020, ICML, Algorithm 1).

  Local training is plain SGD at ``client_learning_rate`` on the corrected
  gradient ``g_i(y) + c - c_i``; within a batch only the loss is masked, and
  steps whose examples are all masked are no-ops (the engine skips them).

  Weighting: the default ``"uniform"`` is Algorithm 1, where both ``dy`` and
  ``dc`` are plain means over the sampled clients; with uniform weighting and
  the default aggregator, ``c`` stays exactly the mean of all ``N`` clients'
  ``c_i``. ``"num_examples"`` makes both means example-weighted (as FedAvg
  does); ``c`` then only approximates the example-weighted mean of the
  ``c_i``.

  Aggregation: the pair ``(y - x, c_i+ - c_i)`` is averaged as one pytree, so
  a DP aggregator clips the pair jointly (its L2 norm covers both the model
  delta and the control-variate change) and noises both. The ``|S|`` in the
  control-variate step is the round's real cohort size as counted by the
  engine, except with ``expected_cohort_size`` (pass it with a DP
  aggregator): then ``c += (E|S| / N) * noisy_sum / E|S| = noisy_sum / N``,
  a function of the noised sum only; the realised size of a Poisson cohort
  is private and must not reach the server state.

  Args:
    model: the model to train.
    client_learning_rate: local SGD step size ``eta_l``.
    server_optimizer: optax transformation applied to ``-mean(y - x)``;
      ``optax.sgd(eta_g)`` is the paper's global step size ``eta_g``.
    option: ``"I"``: ``c_i+`` is the gradient of the client's loss at the
      global model over the examples it trained on this round (computed
      alongside local training, one extra gradient per step); ``"II"``:
      ``c_i+ = c_i - c + (x - y) / (K * eta_l)`` with ``K`` the local steps
      actually taken. A client that took no step keeps its ``c_i``.
    weighting: ``"uniform"`` (Algorithm 1) or ``"num_examples"``.
    aggregator: how the ``(dy, dc)`` pairs are combined; default weighted mean.
    num_clients: the population size ``N`` (required).
    expected_cohort_size: if given, the ``|S|`` of the control-variate step
      (a DP run's fixed denominator) instead of the realised cohort size.

  Returns:
    The algorithm; ``client_state_init(params)`` gives one client's zero
    ``c_i`` and the new client state of a round is ``c_i+``.

  Raises:
    ValueError: unknown ``option`` or ``weighting``, missing or non-positive
      ``num_clients``, or non-positive ``client_learning_rate``.
  """
  if option not in OPTIONS:
    raise ValueError(f"option must be one of {OPTIONS}, got {option!r}.")
  local.check_weighting(weighting)
  if num_clients is None or int(num_clients) < 1:
    raise ValueError("num_clients (the population size N) is required and "
                     f"must be >= 1, got {num_clients!r}.")
  lr = base.positive_number("client_learning_rate", client_learning_rate)
  population = float(num_clients)
  if expected_cohort_size is not None and not expected_cohort_size > 0:
    raise ValueError("expected_cohort_size must be > 0, got "
                     f"{expected_cohort_size!r}.")
  wrapped = _with_cohort_size(aggregator or base.weighted_mean(),
                              expected_cohort_size)

  def server_init(params):
    return base.ServerState(params=params,
                            opt_state=server_optimizer.init(params),
                            round=jnp.zeros([], jnp.int32),
                            aggregator_state=wrapped.init(),
                            extra=zeros_like_f32(params))

  def broadcast(state):
    return (state.params, state.extra)

  def client_init(bcast, client_state, rng):
    global_params, server_control = bcast
    zero = jnp.zeros([], jnp.float32)
    correction = jax.tree.map(jnp.subtract, server_control, client_state)
    if option == "I":
      anchor, grad_sum = global_params, zeros_like_f32(global_params)
    else:
      anchor, grad_sum = (), ()
    return ScaffoldCarry(global_params, correction, client_state, rng, zero,
                         zero, zero, anchor, grad_sum)

  def client_step(carry, batch, mask):
    rng, step_rng = jax.random.split(carry.rng)
    grads, loss_sum, weight_sum = local.masked_loss_and_grad(
        model, carry.params, batch, mask, step_rng)
    params = jax.tree.map(lambda y, g, d: y - lr * (g + d), carry.params,
                          grads, carry.correction)
    grad_sum = carry.grad_sum
    if option == "I":
      # Gradient of the batch's loss SUM at x, so that dividing the total by
      # the total example weight gives the exact full-data gradient.
      anchor_grads, _, _ = local.masked_loss_and_grad(
          model, carry.global_params, batch, mask, step_rng)
      grad_sum = jax.tree.map(lambda acc, g: acc + g * weight_sum, grad_sum,
                              anchor_grads)
    active = jnp.any(mask > 0).astype(jnp.float32)
    return carry._replace(params=params, rng=rng,
                          loss_sum=carry.loss_sum + loss_sum,
                          loss_weight=carry.loss_weight + weight_sum,
                          num_steps=carry.num_steps + active,
                          grad_sum=grad_sum)

  def client_final(bcast, carry, num_examples):
    global_params, server_control = bcast
    delta = jax.tree.map(jnp.subtract, carry.params, global_params)
    took_steps = carry.num_steps > 0
    if option == "I":
      scale = 1.0 / jnp.maximum(carry.loss_weight, 1e-12)
      new_control = jax.tree.map(lambda g: g * scale, carry.grad_sum)
    else:
      scale = 1.0 / (jnp.maximum(carry.num_steps, 1.0) * lr)
      new_control = jax.tree.map(lambda ci, c, d: ci - c - d * scale,
                                 carry.client_control, server_control, delta)
    new_control = jax.tree.map(lambda n, o: jnp.where(took_steps, n, o),
                               new_control, carry.client_control)
    control_delta = jax.tree.map(jnp.subtract, new_control,
                                 carry.client_control)
    return base.ClientUpdate(
        delta=(delta, control_delta),
        weight=local.client_weight(weighting, num_examples),
        client_state=new_control,
        metrics={"train_loss": (carry.loss_sum, carry.loss_weight),
                 "local_steps": (carry.num_steps, jnp.ones([], jnp.float32))})

  def server_update(state, aggregate):
    (mean_delta, mean_control_delta), cohort_size = aggregate
    state, metrics = local.server_opt_update(server_optimizer, state,
                                              mean_delta)
    fraction = cohort_size / population
    control = jax.tree.map(lambda c, d: c + fraction * d, state.extra,
                           mean_control_delta)
    metrics["server_control_norm"] = optax.tree.norm(control)
    return state._replace(extra=control), metrics

  return base.FederatedAlgorithm(
      name=f"scaffold_{option}", server_init=server_init, broadcast=broadcast,
      client_init=client_init, client_step=client_step,
      client_final=client_final, aggregator=wrapped,
      server_update=server_update,
      client_state_init=zeros_like_f32)


_FACTORY = recipe.keyword_defaults(scaffold)


def from_config(context: recipe.BuildContext, *,
                option: str = _FACTORY["option"]) -> base.FederatedAlgorithm:
  """SCAFFOLD from the ``scaffold`` config block (``option``: I or II).

  Local SGD runs at ``client.learning_rate``; under DP the control-variate
  step uses the expected cohort size.
  """
  return scaffold(  # named scaffold_I / scaffold_II
      context.model, context.config.client.learning_rate,
      context.server_optimizer, option=option, weighting=context.weighting,
      aggregator=context.aggregator, num_clients=context.num_clients,
      expected_cohort_size=context.expected_cohort_size)


def _requires(context: recipe.BuildContext) -> str | None:
  optimizer = context.config.client.optimizer
  if optimizer != "sgd":
    return ("algorithm='scaffold' corrects plain SGD local steps; set "
            f"client.optimizer='sgd', not {optimizer!r}.")
  return None


RECIPE = recipe.Recipe("scaffold", build=from_config, block="scaffold",
                       requires=_requires)
