"""Reptile: first-order meta-learning as a federated algorithm.

Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv
2018, Algorithm 2 (batched Reptile); used for federated personalization by
Jiang, Konecny, Rush & Kannan, "Improving Federated Learning Personalization
via Model Agnostic Meta Learning", arXiv 2019.

Every sampled client (a "task") starts from the global model ``x``, runs
``k`` local optimizer steps on its own data and returns the adapted model
``y_k``; the server moves toward the average adapted model,

  ``x <- x + epsilon * mean_k(y_k - x)``,

i.e. a server SGD step of size ``epsilon`` (the meta step size) on the
pseudo-gradient ``-mean_k(y_k - x)``; any optax server optimizer can replace
it, as in FedOpt. The server side is FedOpt's (:func:`fedavg.fedopt`); Reptile
differs from FedAvg only in three documented choices:

* **Fixed inner-step count.** Every client takes exactly ``num_inner_steps``
  steps, however much data it holds, so all clients adapt by the same amount
  (FedAvg's ``E`` epochs give a client steps in proportion to its size). The
  algorithm ignores steps past the cap; the batches themselves come from the
  runner, which must supply at least ``num_inner_steps`` per client:
  :func:`cohort_schedule` gives the ``num_epochs`` / ``max_steps`` for
  :func:`fedjax_lab.data.cohort.make_round_cohort` that hand every non-empty
  client exactly that many full batches (small clients cycle through their
  reshuffled data). A client that still runs short is reported in
  ``fraction_clients_short_of_inner_steps``.
* **Uniform client weighting.** Every task counts once in the mean, as in
  Reptile (and as DP aggregators require anyway).
* **Meta step size** ``epsilon`` (``meta_step_size``): 1 moves the server all
  the way to the average adapted model (then, with uniform weighting and no
  step cap, the round is exactly FedAvg's); smaller values interpolate.

Jiang et al. observe that FedAvg itself is Reptile-like; this module lets the
two be compared head to head with the personalization evaluator
(:mod:`fedjax_lab.evaluation.personalization`).

DP: pass e.g. ``privacy.aggregators.gaussian_sum(...)`` as ``aggregator``;
each client's ``y_k - x`` is clipped and noised like any FedAvg delta. The
fixed step count bounds every client's local work identically, which suits
the per-client clipping.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import fedavg
from fedjax_lab.algorithms import recipe
from fedjax_lab.algorithms.local import LocalCarry
from fedjax_lab.models import base as model_base


class ReptileCarry(NamedTuple):
  """One client's state during Reptile's inner loop.

  Attributes:
    local: FedAvg's local-training carry (parameters, optimizer state, key,
      training-loss sums).
    num_steps: int32 inner steps taken so far (steps with real examples).
  """

  local: LocalCarry
  num_steps: jax.Array


def cohort_schedule(num_inner_steps: int, batch_size: int) -> dict[str, int]:
  """Cohort settings that give every non-empty client ``num_inner_steps`` steps.

  With ``num_epochs = num_inner_steps * batch_size`` even a one-example client
  has a stream of at least ``num_inner_steps * batch_size`` examples, and
  ``max_steps = num_inner_steps`` cuts every stream there; only the needed
  epochs are ever shuffled, so the large epoch count costs nothing.

  Returns:
    ``{"num_epochs": ..., "max_steps": ...}`` for
    :func:`fedjax_lab.data.cohort.make_round_cohort` (or the runner's
    ``client.num_epochs`` / ``client.max_steps``).
  """
  _check_positive_int("num_inner_steps", num_inner_steps)
  _check_positive_int("batch_size", batch_size)
  return {"num_epochs": num_inner_steps * batch_size,
          "max_steps": num_inner_steps}


def _check_positive_int(name: str, value: int) -> None:
  if isinstance(value, bool) or int(value) != value or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def reptile(model: model_base.Model,
            inner_optimizer: optax.GradientTransformation,
            num_inner_steps: int | None,
            meta_step_size: float = 1.0,
            server_optimizer: optax.GradientTransformation | None = None,
            weighting: str = "uniform",
            aggregator: base.Aggregator | None = None
            ) -> base.FederatedAlgorithm:
  """Federated Reptile (Nichol et al. 2018; Jiang et al. 2019).

  Args:
    model: the model to meta-train.
    inner_optimizer: optax transformation of the client's inner loop
      (``optax.sgd(lr)`` is the papers'; a fresh state every round).
    num_inner_steps: steps ``k`` every client takes per round; steps the
      runner supplies beyond ``k`` are ignored. ``None``: no cap (every
      supplied step is taken, as in FedAvg).
    meta_step_size: ``epsilon`` of ``x <- x + epsilon * mean(y_k - x)``
      (> 0); ignored when ``server_optimizer`` is given.
    server_optimizer: optional optax transformation applied to the
      pseudo-gradient ``-mean(y_k - x)`` instead of SGD with
      ``meta_step_size``.
    weighting: ``"uniform"`` (Reptile: every task counts once) or
      ``"num_examples"``.
    aggregator: how the client deltas are combined; default weighted mean. A
      DP aggregator plugs in here.

  Returns:
    The algorithm. Client metrics: ``train_loss`` (over the inner steps
    taken), ``inner_steps`` (mean inner steps taken per client) and, with a
    cap, ``fraction_clients_short_of_inner_steps`` (clients whose batches ran
    out before ``num_inner_steps``).

  Raises:
    ValueError: non-positive ``num_inner_steps`` or ``meta_step_size``,
      ``meta_step_size`` set together with ``server_optimizer``, or an
      unknown ``weighting``.
  """
  if num_inner_steps is not None:
    _check_positive_int("num_inner_steps", num_inner_steps)
  if server_optimizer is None:
    if not meta_step_size > 0:
      raise ValueError(f"meta_step_size must be > 0, got {meta_step_size!r}.")
    server_optimizer = optax.sgd(meta_step_size)
  elif meta_step_size != 1.0:
    raise ValueError("pass either meta_step_size or server_optimizer, not "
                     "both (server_optimizer replaces the meta SGD step).")
  # Inner steps, delta, weight and the whole server side are FedOpt's; only
  # the step cap and its bookkeeping are added here.
  fedopt = fedavg.fedopt(model, inner_optimizer, server_optimizer,
                         weighting=weighting, aggregator=aggregator,
                         name="reptile")

  def client_init(global_params, client_state, rng):
    return ReptileCarry(fedopt.client_init(global_params, client_state, rng),
                        jnp.zeros([], jnp.int32))

  def client_step(carry, batch, mask):
    stepped = fedopt.client_step(carry.local, batch, mask)
    if num_inner_steps is None:
      return ReptileCarry(stepped, carry.num_steps + 1)
    take = carry.num_steps < num_inner_steps
    stepped = jax.tree.map(lambda n, o: jnp.where(take, n, o), stepped,
                           carry.local)
    return ReptileCarry(stepped, carry.num_steps + take.astype(jnp.int32))

  def client_final(global_params, carry, num_examples):
    update = fedopt.client_final(global_params, carry.local, num_examples)
    one = jnp.ones([], jnp.float32)
    metrics = dict(update.metrics)
    metrics["inner_steps"] = (carry.num_steps.astype(jnp.float32), one)
    if num_inner_steps is not None:
      short = (carry.num_steps < num_inner_steps).astype(jnp.float32)
      metrics["fraction_clients_short_of_inner_steps"] = (short, one)
    return update._replace(metrics=metrics)

  return dataclasses.replace(fedopt, client_init=client_init,
                             client_step=client_step,
                             client_final=client_final)


def from_config(context: recipe.BuildContext, *,
                num_inner_steps: int = 10) -> base.FederatedAlgorithm:
  """Reptile from the ``reptile`` block: every client takes exactly
  ``num_inner_steps`` full batches; the meta step is the server optimizer
  (``server.optimizer`` sgd at ``server.learning_rate``)."""
  return reptile(context.model, context.client_optimizer, num_inner_steps,
                 server_optimizer=context.server_optimizer,
                 weighting=context.weighting, aggregator=context.aggregator)


def _local_schedule(context: recipe.BuildContext) -> tuple[int, int | None]:
  schedule = cohort_schedule(context.options["num_inner_steps"],
                             context.config.client.batch_size)
  return schedule["num_epochs"], schedule["max_steps"]


RECIPE = recipe.Recipe("reptile", build=from_config, block="reptile",
                       local_schedule=_local_schedule)
