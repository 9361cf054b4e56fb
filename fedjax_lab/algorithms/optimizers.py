"""optax optimizers by name, for client and server optimizers in configs.

FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) is FedAvg
with the server optimizer swapped: ``sgd`` (FedAvg), ``momentum`` (FedAvgM,
Hsu et al. 2019), ``adam`` (FedAdam), ``yogi`` (FedYogi), ``adagrad``
(FedAdagrad with optax's eps inside the square root) or ``adagrad_tau``
(FedAdagrad as Reddi et al. define it). Reddi et al. use ``eps`` (their tau,
"adaptivity") around 1e-3 for the adaptive server optimizers, much larger than
optax's defaults.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax


class AdagradTauState(NamedTuple):
  """Sum of squared updates of :func:`adagrad_tau`, shaped like the params."""
  sum_of_squares: optax.Updates


def scale_by_adagrad_tau(eps: float = 1e-3,
                         initial_accumulator_value: float = 0.0
                         ) -> optax.GradientTransformation:
  """Divides each update by sqrt(sum of its squares so far) + eps.

  Reddi et al. 2021, Algorithm 2 (FedAdagrad, beta1 = 0): v_t = v_{t-1} +
  delta_t^2, step delta_t / (sqrt(v_t) + tau). The adaptivity tau is added
  outside the square root, as in the paper and Keras's Adagrad that its
  reference code runs; ``optax.scale_by_rss`` adds eps inside it.

  Args:
    eps: tau, the adaptivity (Reddi et al.'s best for Shakespeare: 10^-1).
    initial_accumulator_value: v_{-1} (0 in the reference code).
  """

  def init(params):
    return AdagradTauState(jax.tree.map(
        lambda leaf: jnp.full_like(leaf, initial_accumulator_value), params))

  def update(updates, state, params=None):
    del params
    sum_of_squares = jax.tree.map(lambda total, update: total + update ** 2,
                                  state.sum_of_squares, updates)
    scaled = jax.tree.map(lambda update, total: update / (jnp.sqrt(total) + eps),
                          updates, sum_of_squares)
    return scaled, AdagradTauState(sum_of_squares)

  return optax.GradientTransformation(init, update)


def adagrad_tau(learning_rate: float, eps: float = 1e-3,
                initial_accumulator_value: float = 0.0
                ) -> optax.GradientTransformation:
  """Adagrad with tau outside the square root (Reddi et al.'s FedAdagrad).

  Args:
    learning_rate: server step size eta.
    eps: tau, the adaptivity.
    initial_accumulator_value: v_{-1}.
  """
  return optax.chain(
      scale_by_adagrad_tau(eps, initial_accumulator_value),
      optax.scale_by_learning_rate(learning_rate))


_BUILDERS = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate, momentum=0.9, nesterov=False: optax.sgd(
        learning_rate, momentum=momentum, nesterov=nesterov),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "yogi": optax.yogi,
    "adagrad": optax.adagrad,
    "adagrad_tau": adagrad_tau,
    "rmsprop": optax.rmsprop,
    "lamb": optax.lamb,
}


def optimizer_names() -> tuple[str, ...]:
  """Names accepted by :func:`build_optimizer`."""
  return tuple(sorted(_BUILDERS))


def build_optimizer(name: str, learning_rate: float,
                    hparams: Mapping[str, Any] | None = None
                    ) -> optax.GradientTransformation:
  """An optax optimizer from its name, learning rate and extra hyperparameters.

  Args:
    name: one of :func:`optimizer_names` (optax's own names).
    learning_rate: step size.
    hparams: extra keyword arguments of the optax constructor (``momentum``,
      ``b1``, ``b2``, ``eps``, ``initial_accumulator_value``, ...).

  Raises:
    ValueError: unknown optimizer name or a hyperparameter it does not take,
      with the valid choices in the message.
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown optimizer {name!r}; choose one of "
                     f"{', '.join(optimizer_names())}.")
  builder = _BUILDERS[name]
  hparams = dict(hparams or {})
  accepted = set(inspect.signature(builder).parameters) - {"learning_rate"}
  unknown = set(hparams) - accepted
  if unknown:
    raise ValueError(
        f"optimizer {name!r} does not take {sorted(unknown)}; it accepts "
        f"{sorted(accepted)}.")
  if learning_rate is None or (not isinstance(learning_rate, jax.core.Tracer)
                               and not learning_rate > 0):
    # A traced rate (a sweep member's) was checked as a number first.
    raise ValueError(f"{name} learning_rate must be > 0, got {learning_rate}.")
  return builder(learning_rate=learning_rate, **hparams)
