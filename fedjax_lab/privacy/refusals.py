"""The refusal table: every unsafe DP combination, each row with its reason.

Each :class:`Refusal` row says which facts of a run it reads, when it
refuses, and why (the reason is the error message). Callers describe what
they know as a :class:`Setting` (facts left None are unknown, and the rows
that need them are skipped) and raise their own error type with the first
reason :func:`first_refusal` returns:

* ``training.setup.validate`` (config facts: algorithm, compression,
  weighting, diagnostics, server optimizer);
* ``privacy.plan.build_plan`` (noise cohort / accounting population x
  sampling);
* ``privacy.accounting.AccountingSpec.validate`` (mechanism x sampling x
  accountant, with the accounted mechanism: ``adaptive`` is ``gaussian``);
* ``privacy.plan.check_private_algorithm`` (the built algorithm's paths
  around the DP aggregator: a pre-round, client metrics in the server
  update);
* the direct API: :func:`check_weighting` (a DP aggregator with per-example
  weights; the engine calls it when a DP sum meets weights that read the
  example count).

Algorithms contribute rows: every registered recipe's ``refuses`` (mechanism
-> reason) and ``refuse`` (option-dependent) become rows of :func:`table`,
with the algorithm's own reason text.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Any, Callable

from fedjax_lab import algorithms

DP_MECHANISMS = ("gaussian", "adaptive", "tree", "local")
# Config keys whose outputs are un-noised statistics of private data.
DIAGNOSTIC_KEYS = {
    "eval_train_split": "evaluates on the clients' training examples",
    "personalization.enabled": "fine-tunes on every client's training data "
                               "and reports per-client accuracies",
}


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a caller knows about a run; None = unknown (rows needing it skip).

  Attributes:
    mechanism: ``none`` or one of :data:`DP_MECHANISMS`.
    algorithm: the registered algorithm name.
    context: its ``algorithms.BuildContext`` (for option-dependent refusals).
    compression: ``none`` | ``quantize`` | ``top_k``.
    weighting: ``num_examples`` | ``uniform``.
    server_optimizer: the ``server.optimizer`` name.
    diagnostics: the :data:`DIAGNOSTIC_KEYS` that are switched on.
    release_diagnostics: ``privacy.release_diagnostics``.
    sampling: ``fixed`` | ``poisson`` | ``shuffle``.
    accountant: ``rdp`` | ``pld``.
    noise_cohort_size: ``privacy.noise_cohort_size`` (0 = off).
    accounting_population: ``privacy.accounting_population`` (0 = off).
    built_algorithm: the built ``FederatedAlgorithm`` (its paths around the
      DP aggregator).
  """

  mechanism: str | None = None
  algorithm: str | None = None
  context: Any = None
  compression: str | None = None
  weighting: str | None = None
  server_optimizer: str | None = None
  diagnostics: tuple[str, ...] | None = None
  release_diagnostics: bool | None = None
  sampling: str | None = None
  accountant: str | None = None
  noise_cohort_size: float | None = None
  accounting_population: int | None = None
  built_algorithm: Any = None


@dataclasses.dataclass(frozen=True)
class Refusal:
  """One row: ``applies(setting)`` -> refused; ``reason(setting)`` says why.

  Attributes:
    name: a short id, e.g. ``"local x compression"``.
    needs: the :class:`Setting` fields the row reads (all must be known).
    applies: ``(setting) -> bool``.
    reason: ``(setting) -> str``, the error message.
    example: field values of a setting the row refuses (for tests and docs).
    scope: who checks it: ``algorithm`` and ``config`` (the config's
      validation), ``plan`` (``build_plan``), ``accounting``
      (``AccountingSpec.validate``), ``built`` (``plan.
      check_private_algorithm``, on the built algorithm).
  """

  name: str
  needs: tuple[str, ...]
  applies: Callable[[Setting], bool]
  reason: Callable[[Setting], str]
  example: dict[str, Any] = dataclasses.field(default_factory=dict)
  scope: str = "config"

  def check(self, setting: Setting) -> str | None:
    """The reason if the row refuses ``setting``, else None."""
    if any(getattr(setting, field) is None for field in self.needs):
      return None
    return self.reason(setting) if self.applies(setting) else None


def _dp(setting: Setting) -> bool:
  return setting.mechanism in DP_MECHANISMS


def _diagnostic_reason(key: str) -> Callable[[Setting], str]:
  def reason(s: Setting) -> str:
    return (f"{key}=True {DIAGNOSTIC_KEYS[key]}: un-noised statistics of "
            "private data that epsilon does not cover. With "
            f"privacy.mechanism={s.mechanism!r} set --config.{key}=False, or "
            "--config.privacy.release_diagnostics=True to write them "
            "labelled diagnostic/ (not private).")
  return reason


_CONFIG_ROWS = (
    Refusal(
        "local x compression", ("mechanism", "compression"),
        lambda s: s.mechanism == "local" and s.compression != "none",
        lambda s: ("compression with privacy.mechanism='local' would add the "
                   "local noise after decoding, which is not what a device "
                   "sends; use central DP ('gaussian' or 'adaptive') or "
                   "compression.method='none'."),
        {"mechanism": "local", "compression": "quantize"}),
    Refusal(
        "mechanism x weighting", ("mechanism", "weighting"),
        lambda s: _dp(s) and s.weighting != "uniform",
        lambda s: (f"privacy.mechanism={s.mechanism!r} sums clipped updates "
                   "with weight 1 (per-client weights would change the "
                   "sensitivity); set --config.weighting=uniform."),
        {"mechanism": "gaussian", "weighting": "num_examples"}),
) + tuple(
    Refusal(
        f"mechanism x {key}", ("mechanism", "diagnostics",
                               "release_diagnostics"),
        lambda s, key=key: (_dp(s) and not s.release_diagnostics and
                            key in s.diagnostics),
        _diagnostic_reason(key),
        {"mechanism": "adaptive", "diagnostics": (key,),
         "release_diagnostics": False})
    for key in DIAGNOSTIC_KEYS) + (
    Refusal(
        "tree x server optimizer", ("mechanism", "server_optimizer"),
        lambda s: s.mechanism == "tree" and s.server_optimizer != "sgd",
        lambda s: ("privacy.mechanism='tree' makes DP-FTRL the server "
                   "optimizer (with server.learning_rate and "
                   "privacy.ftrl.momentum); set server.optimizer='sgd', not "
                   f"{s.server_optimizer!r}."),
        {"mechanism": "tree", "server_optimizer": "adam"}),
)

_PLAN_ROWS = (
    Refusal(
        "noise cohort x shuffle", ("mechanism", "noise_cohort_size",
                                   "sampling"),
        lambda s: _dp(s) and bool(s.noise_cohort_size) and
        s.sampling == "shuffle",
        lambda s: ("privacy.noise_cohort_size is not supported with "
                   "sampling='shuffle' (DP-FTRL's epochs are defined by the "
                   "simulated cohort)."),
        {"mechanism": "tree", "noise_cohort_size": 100,
         "sampling": "shuffle"}, "plan"),
    Refusal(
        "accounting population x shuffle", ("mechanism",
                                            "accounting_population",
                                            "sampling"),
        lambda s: _dp(s) and bool(s.accounting_population) and
        s.sampling == "shuffle",
        lambda s: ("privacy.accounting_population is not supported with "
                   "sampling='shuffle' (DP-FTRL's trees follow the simulated "
                   "epochs; a larger population would put a client in "
                   "several rounds of a tree)."),
        {"mechanism": "tree", "accounting_population": 10**6,
         "sampling": "shuffle"}, "plan"),
)

_ACCOUNTING_ROWS = (
    Refusal(
        "gaussian x shuffle", ("mechanism", "sampling"),
        lambda s: s.mechanism in ("gaussian", "adaptive") and
        s.sampling == "shuffle",
        lambda s: ("shuffling's amplification is not accounted for "
                   "mechanism=gaussian; use sampling=poisson (or fixed), or "
                   "mechanism=tree for DP-FTRL, which needs no "
                   "amplification"),
        {"mechanism": "gaussian", "sampling": "shuffle"}, "accounting"),
    Refusal(
        "gaussian x fixed x pld", ("mechanism", "sampling", "accountant"),
        lambda s: s.mechanism in ("gaussian", "adaptive") and
        s.sampling == "fixed" and s.accountant == "pld",
        lambda s: ("dp_accounting's PLD accountant does not support "
                   "fixed-size sampling without replacement; use "
                   "accountant=rdp or sampling=poisson"),
        {"mechanism": "gaussian", "sampling": "fixed", "accountant": "pld"},
        "accounting"),
    Refusal(
        "tree x sampling", ("mechanism", "sampling"),
        lambda s: s.mechanism == "tree" and s.sampling != "shuffle",
        lambda s: ("mechanism=tree (DP-FTRL) needs sampling=shuffle: its "
                   "accounting assumes each client at most once per epoch, "
                   f"which {s.sampling} sampling does not guarantee"),
        {"mechanism": "tree", "sampling": "poisson"}, "accounting"),
    Refusal(
        "tree x accountant", ("mechanism", "accountant"),
        lambda s: s.mechanism == "tree" and s.accountant != "rdp",
        lambda s: ("mechanism=tree is supported by dp_accounting's RDP "
                   "accountant only; use accountant=rdp"),
        {"mechanism": "tree", "accountant": "pld"}, "accounting"),
)


_BUILT_ROWS = (
    Refusal(
        "mechanism x pre-round", ("mechanism", "built_algorithm"),
        lambda s: _dp(s) and s.built_algorithm.pre_round is not None,
        lambda s: (f"{s.built_algorithm.name} absorbs an un-noised pre-round "
                   "mean of the cohort's data into the server state, which no "
                   "DP mechanism here accounts for."),
        {"mechanism": "gaussian", "built_algorithm": types.SimpleNamespace(
            name="mime", pre_round=object(),
            server_update_uses_client_metrics=False)}, "built"),
    Refusal(
        "mechanism x client metrics", ("mechanism", "built_algorithm"),
        lambda s: (_dp(s) and
                   s.built_algorithm.server_update_uses_client_metrics),
        lambda s: (f"{s.built_algorithm.name}'s server update reads the "
                   "round's un-noised client metrics, which no DP mechanism "
                   "here accounts for."),
        {"mechanism": "gaussian", "built_algorithm": types.SimpleNamespace(
            name="fedprox", pre_round=None,
            server_update_uses_client_metrics=True)}, "built"),
)


def algorithm_rows() -> tuple[Refusal, ...]:
  """The rows the registered algorithms contribute (their own reasons)."""
  rows = []
  for name in algorithms.names():
    recipe = algorithms.get(name)
    for mechanism in recipe.refuses:
      rows.append(Refusal(
          f"{name} x {mechanism}", ("mechanism", "algorithm"),
          lambda s, name=name, mechanism=mechanism: (
              s.algorithm == name and s.mechanism == mechanism),
          lambda s, recipe=recipe: recipe.refusal(s.context, s.mechanism),
          {"algorithm": name, "mechanism": mechanism}, "algorithm"))
    if recipe.refuse is not None:
      rows.append(Refusal(
          f"{name} x options", ("mechanism", "algorithm", "context"),
          lambda s, name=name, recipe=recipe: (
              s.algorithm == name and s.mechanism != "none" and
              recipe.refusal(s.context, s.mechanism) is not None),
          lambda s, recipe=recipe: recipe.refusal(s.context, s.mechanism),
          {"algorithm": name}, "algorithm"))
  return tuple(rows)


def table() -> tuple[Refusal, ...]:
  """Every row, in the order they are checked: algorithms' rows, the
  config's, the plan's, the accountant's, the built algorithm's."""
  return (algorithm_rows() + _CONFIG_ROWS + _PLAN_ROWS + _ACCOUNTING_ROWS +
          _BUILT_ROWS)


def first_refusal(setting: Setting,
                  scopes: tuple[str, ...] | None = None) -> str | None:
  """The reason of the first row of :func:`table` (of ``scopes``, default
  all) refusing ``setting``."""
  for row in table():
    if scopes is not None and row.scope not in scopes:
      continue
    reason = row.check(setting)
    if reason is not None:
      return reason
  return None


def requires_uniform_weights(aggregator: Any) -> bool:
  """Whether ``aggregator`` (a DP link or a chain holding one) sums clipped
  updates with weight 1, ignoring the algorithm's client weights."""
  return bool(getattr(aggregator, "uniform_weights_only", False))


def check_weighting(weighting: str, mechanism: str = "gaussian") -> None:
  """The direct API's form of the ``mechanism x weighting`` row.

  Raises:
    ValueError: ``weighting`` is not ``"uniform"`` under a DP mechanism.
  """
  reason = first_refusal(Setting(mechanism=mechanism, weighting=weighting))
  if reason is not None:
    raise ValueError(f"weighting={weighting!r} under DP: {reason}")
