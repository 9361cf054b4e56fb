"""optax optimizers by name, for client and server optimizers in configs.

FedOpt (Reddi et al., "Adaptive Federated Optimization", ICLR 2021) is FedAvg
with the server optimizer swapped: ``sgd`` (FedAvg), ``momentum`` (FedAvgM,
Hsu et al. 2019), ``adam`` (FedAdam), ``yogi`` (FedYogi), ``adagrad``
(FedAdagrad). Reddi et al. use ``eps`` (their tau, "adaptivity") around 1e-3
for the adaptive server optimizers, much larger than optax's defaults.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import jax
import optax

_BUILDERS = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate, momentum=0.9, nesterov=False: optax.sgd(
        learning_rate, momentum=momentum, nesterov=nesterov),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "yogi": optax.yogi,
    "adagrad": optax.adagrad,
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
