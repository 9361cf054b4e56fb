"""How an algorithm is built from a config: :class:`Recipe` and its context.

Every algorithm module declares a :class:`Recipe` next to its factory, and
:mod:`fedjax_lab.algorithms` registers it under its name (one line), so the
training setup needs no per-algorithm code:

* ``build(context, **options) -> FederatedAlgorithm``: the keyword-only
  parameters of ``build`` ARE the algorithm's config block (``config.<block>``,
  e.g. ``--config.fedprox.mu=0.1``) and their defaults are the block's only
  defaults (``configs/common.py`` copies them into the base config). A key of
  the block that ``build`` does not take is an error naming the valid ones.
* ``requires(context) -> message | None``: settings the algorithm cannot run
  with at all (SCAFFOLD's plain-SGD local steps).
* ``refuses`` (mechanism -> reason) and ``refuse(context, mechanism) ->
  reason | None``: the privacy mechanisms it cannot be run under, and why.
  They are the algorithm's rows of the refusal table
  (:mod:`fedjax_lab.privacy.refusals`), which the config's validation
  consults; the reason text is the algorithm's own.
* ``client_states_init(context)``: every client's initial state when clients
  do not all start alike (agnostic FL's domain ids).
* ``local_schedule(context) -> (num_epochs, max_steps)``: the cohorts' local
  work when it is not the ``client`` block's (Reptile's fixed inner steps).
* ``evaluator(context)``: an evaluation replacing the plain one of the global
  model (HypCluster's, each client with its best cluster).

:class:`BuildContext` carries what builders need: the config, the block's
validated ``options``, the model, the client and server optimizers, the DP
aggregator and privacy plan, the population size and the dataset.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
from typing import Any, Callable, Mapping

import optax

from fedjax_lab.algorithms import base
from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.models import base as model_base

# (initial params, num_clients) -> every client's initial state, stacked.
ClientStatesInit = Callable[[base.PyTree, int], base.PyTree]
# (params, "test" | "train") -> metrics.
Evaluator = Callable[[base.PyTree, str], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a recipe's functions may use; fields a caller lacks stay None.

  Attributes:
    config: the whole experiment config (``ml_collections.ConfigDict``).
    options: the algorithm's config block, validated, defaults filled in
      (the keyword arguments ``build`` receives).
    model: the model to train.
    client_optimizer: optax transformation from the ``client`` block.
    server_optimizer: optax transformation from the ``server`` block (DP-FTRL's
      under ``privacy.mechanism='tree'``).
    aggregator: the DP aggregator, or None (the default weighted mean).
    privacy: the resolved privacy plan
      (:class:`fedjax_lab.privacy.plan.PrivacyPlan`), None without DP.
    num_clients: the training population size ``N``.
    dataset: the federated dataset.
  """

  config: Any
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  model: model_base.Model | None = None
  client_optimizer: optax.GradientTransformation | None = None
  server_optimizer: optax.GradientTransformation | None = None
  aggregator: base.Aggregator | None = None
  privacy: Any = None
  num_clients: int | None = None
  dataset: FederatedDataset | None = None

  @property
  def weighting(self) -> str:
    """``config.weighting``: ``"num_examples"`` or ``"uniform"``."""
    return self.config.weighting

  @property
  def mechanism(self) -> str:
    """``config.privacy.mechanism`` (``"none"`` without a privacy block)."""
    return self.config.get("privacy", {}).get("mechanism", "none")

  @property
  def expected_cohort_size(self) -> float | None:
    """A DP run's expected number of trained clients per round, else None."""
    return (self.privacy.simulated_cohort_size if self.privacy is not None
            else None)


def keyword_defaults(fn: Callable[..., Any]) -> dict[str, Any]:
  """The default of every parameter of ``fn`` that has one, by name.

  Lets a recipe's ``build`` reuse its factory's defaults instead of repeating
  them (``straggler_fraction: float = _FACTORY["straggler_fraction"]``).
  """
  parameters = inspect.signature(fn).parameters
  return {name: p.default for name, p in parameters.items()
          if p.default is not inspect.Parameter.empty}


def _plain(value: Any) -> Any:
  """A fresh copy of a default; read-only mappings become dicts."""
  if isinstance(value, Mapping):
    return {key: _plain(item) for key, item in value.items()}
  return copy.deepcopy(value)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How one named algorithm is built from a config (see the module doc).

  Attributes:
    name: the value of ``config.algorithm`` that selects it.
    build: ``build(context, **options) -> FederatedAlgorithm``; its
      keyword-only parameters (each with a default) are the config block.
    block: the name of its config block (None: it takes no options). Several
      recipes may share a block (``mime`` and ``mimelite``) if their ``build``
      takes the same options with the same defaults.
    requires: ``requires(context) -> message | None``: a setting it cannot
      run with, whatever the privacy mechanism.
    refuses: privacy mechanisms it never runs under, each with the reason.
    refuse: ``refuse(context, mechanism) -> reason | None`` for refusals that
      depend on the options (called for every mechanism but ``"none"``).
    client_states_init: ``(context) -> ClientStatesInit | None``.
    local_schedule: ``(context) -> (num_epochs, max_steps)``.
    evaluator: ``(context) -> Evaluator | None``.
  """

  name: str
  build: Callable[..., base.FederatedAlgorithm]
  block: str | None = None
  requires: Callable[[BuildContext], str | None] | None = None
  refuses: Mapping[str, str] = dataclasses.field(default_factory=dict)
  refuse: Callable[[BuildContext, str], str | None] | None = None
  client_states_init: Callable[[BuildContext],
                               ClientStatesInit | None] | None = None
  local_schedule: Callable[[BuildContext],
                           tuple[int, int | None]] | None = None
  evaluator: Callable[[BuildContext], Evaluator | None] | None = None

  def __post_init__(self):
    params = list(inspect.signature(self.build).parameters.values())
    if not params or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD):
      raise TypeError(f"recipe {self.name!r}: build must take the context as "
                      "its first positional parameter.")
    others = params[1:]
    loose = [p.name for p in others
             if p.kind is not inspect.Parameter.KEYWORD_ONLY or
             p.default is inspect.Parameter.empty]
    if loose:
      raise TypeError(
          f"recipe {self.name!r}: build's options {loose} must be "
          "keyword-only with a default (build(context, *, key=default)).")
    if others and self.block is None:
      raise TypeError(f"recipe {self.name!r}: build takes options "
                      f"{[p.name for p in others]} but names no config block.")

  def option_defaults(self) -> dict[str, Any]:
    """The config block's keys and defaults (fresh copies), in order."""
    return {name: _plain(value)
            for name, value in keyword_defaults(self.build).items()}

  def options(self, config: Any) -> dict[str, Any]:
    """The config block's values with the defaults of missing keys.

    Raises:
      ValueError: the block has a key ``build`` does not take (the message
        names it and the valid ones).
    """
    defaults = self.option_defaults()
    if self.block is None:
      return defaults
    block = config.get(self.block, None) or {}
    if hasattr(block, "to_dict"):
      block = block.to_dict()
    unknown = sorted(set(block) - set(defaults))
    if unknown:
      raise ValueError(
          f"{self.block} has unknown key(s) {unknown} for "
          f"algorithm={self.name!r}; valid keys: {sorted(defaults)}.")
    return {**defaults, **block}

  def refusal(self, context: BuildContext, mechanism: str) -> str | None:
    """Why it cannot run under ``mechanism`` (naming it), or None: the
    reason text of its rows in ``privacy.refusals.table()``."""
    if mechanism == "none":
      return None
    reason = self.refuses.get(mechanism)
    if reason is None and self.refuse is not None:
      reason = self.refuse(context, mechanism)
    if reason is None:
      return None
    return (f"algorithm={self.name!r} cannot run with "
            f"privacy.mechanism={mechanism!r}: {reason}")
