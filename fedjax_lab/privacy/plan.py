"""From a config's ``privacy`` block to the mechanism and its accounting.

The ``privacy`` block (``configs/common.py`` has the defaults):

* ``mechanism``: ``none`` | ``gaussian`` (DP-FedAvg) | ``adaptive`` (DP-FedAvg
  with adaptive clipping) | ``tree`` (DP-FTRL) | ``local`` (local DP).
* ``clip_norm`` (the initial one for ``adaptive``), ``noise_multiplier``.
* ``delta``: 0 picks ``1 / population**1.1``; must be below 1/population.
* ``accountant``: ``rdp`` | ``pld``.
* ``target_epsilon``: > 0 stops training before the round that would exceed
  it; with ``calibrate=True`` the noise multiplier is instead chosen as the
  smallest that keeps ``num_rounds`` rounds within it.
* ``noise_cohort_size``: > 0 adds the noise of a cohort of this many clients
  while training the configured (smaller) cohort; epsilon is then accounted
  for that cohort (sampling rate ``noise_cohort_size / population``).
* ``accounting_population``: > 0 accounts for a population of this size
  instead of the dataset's number of training clients.
* ``adaptive``: ``target_quantile``, ``clip_learning_rate``,
  ``clipped_count_stddev`` (0 = max(expected cohort / 20, noise_multiplier)).
* ``ftrl``: ``rounds_per_tree`` (0 = one epoch), ``momentum``.

The sampling the simulation runs is the sampling accounted for; the
accountant refuses combinations whose guarantee does not hold.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import optax

from fedjax_lab.algorithms import base
from fedjax_lab.privacy import accounting
from fedjax_lab.privacy import aggregators
from fedjax_lab.privacy import tree

MECHANISMS = ("none", "gaussian", "adaptive", "tree", "local")
_ACCOUNTED_AS = {"gaussian": "gaussian", "adaptive": "gaussian",
                 "tree": "tree", "local": "local"}


@dataclasses.dataclass(frozen=True)
class PrivacyPlan:
  """A resolved DP configuration: the mechanism and how it is accounted.

  Attributes:
    mechanism: one of :data:`MECHANISMS` (never ``"none"``).
    spec: what the accountant composes every round.
    delta: the delta epsilon is reported at.
    clip_norm: the (initial) L2 clip norm C.
    calibrated: whether ``noise_multiplier`` was found by calibration.
    target_epsilon: 0, or the budget training must stay within.
    simulated_cohort_size: expected number of clients really trained.
    settings: the raw ``privacy`` block (adaptive / ftrl options).
  """

  mechanism: str
  spec: accounting.AccountingSpec
  delta: float
  clip_norm: float
  calibrated: bool
  target_epsilon: float
  simulated_cohort_size: float
  settings: Any

  @property
  def noise_multiplier(self) -> float:
    """z, the accounted noise std / C (after calibration): the spec's."""
    return self.spec.noise_multiplier

  @property
  def noise_cohort_size(self) -> float:
    """The cohort size whose noise is added (= the accounted cohort)."""
    return self.spec.expected_cohort_size

  def round_metrics(self, round_index: int) -> dict[str, float]:
    """Host-side metrics of 0-based round ``round_index`` the round cannot know.

    With ``noise_cohort_size`` the line carries ``accounted_cohort_size``.

    For DP-FTRL the noise lives in the server optimizer's prefix sums: the
    released sum at tree step ``s`` carries ``popcount(s)`` node noises, so
    ``dp_noise_std_on_mean`` is the std of that prefix-sum noise (per
    coordinate, on the clipped mean) and ``tree_step`` is ``s``.
    """
    if self.mechanism != "tree":
      if math.isclose(self.noise_cohort_size, self.simulated_cohort_size):
        return {}
      # Large-cohort simulation: say in every line which cohort the noise
      # and epsilon are for.
      return {"accounted_cohort_size": self.noise_cohort_size}
    period = self.spec.rounds_per_tree or self.spec.rounds_per_epoch
    step = round_index % period + 1
    node_std = self.noise_multiplier * self.clip_norm / (
        self.simulated_cohort_size)
    return {"tree_step": step,
            "dp_noise_std_on_mean": tree.prefix_noise_std(step, node_std),
            "dp_noise_std": tree.prefix_noise_std(
                step, node_std * self.simulated_cohort_size)}

  def describe(self) -> dict[str, Any]:
    """JSON-ready summary of the mechanism and its accounting."""
    spec = self.spec
    out = {"mechanism": self.mechanism, "accountant": spec.accountant,
           "sampling": spec.sampling, "population": spec.population,
           "noise_multiplier": self.noise_multiplier,
           "clip_norm": self.clip_norm, "delta": self.delta,
           "calibrated": self.calibrated,
           "target_epsilon": self.target_epsilon or None,
           "accounted_cohort_size": spec.expected_cohort_size,
           "simulated_cohort_size": self.simulated_cohort_size}
    if spec.sampling == "poisson":
      out["sampling_rate"] = spec.sampling_rate
    if not math.isclose(spec.expected_cohort_size,
                        self.simulated_cohort_size):
      out["note"] = (
          f"epsilon is accounted for a cohort of {spec.expected_cohort_size:g}"
          f" clients out of {spec.population}, whose noise level was added to "
          f"a simulated cohort of {self.simulated_cohort_size:g}")
    return out


def default_delta(population: int) -> float:
  """delta when the config leaves it at 0: ``1 / population**1.1``."""
  return 1.0 / population**1.1


def _population_and_cohort(privacy, *, sampling, num_clients, cohort_size,
                           sampling_rate):
  population = int(privacy.get("accounting_population", 0) or num_clients)
  noise_cohort = privacy.get("noise_cohort_size", 0) or 0
  if sampling == "poisson":
    simulated = sampling_rate * num_clients
    rate = (noise_cohort / population if noise_cohort else
            sampling_rate if population == num_clients else
            simulated / population)
    return population, 0, rate, simulated
  simulated = float(cohort_size)
  accounted = int(noise_cohort or cohort_size)
  return population, accounted, 0.0, simulated


def build_plan(privacy: Any, *, sampling: str, num_clients: int,
               cohort_size: int, sampling_rate: float,
               num_rounds: int) -> PrivacyPlan | None:
  """Resolves the ``privacy`` block; None when ``mechanism == "none"``.

  Runs calibration when asked (logged by the caller through ``describe``).

  Raises:
    accounting.PrivacyError: an invalid value, a refused combination of
      mechanism / sampling / accountant, or an unreachable budget.
  """
  mechanism = privacy.get("mechanism", "none")
  if mechanism not in MECHANISMS:
    raise accounting.PrivacyError(
        f"privacy.mechanism must be one of {MECHANISMS}, got {mechanism!r}.")
  if mechanism == "none":
    return None
  clip_norm = float(privacy.clip_norm)
  if not clip_norm > 0:
    raise accounting.PrivacyError(
        f"privacy.clip_norm must be > 0, got {privacy.clip_norm}.")
  noise_cohort = privacy.get("noise_cohort_size", 0) or 0
  if noise_cohort and sampling == "shuffle":
    raise accounting.PrivacyError(
        "privacy.noise_cohort_size is not supported with sampling='shuffle' "
        "(DP-FTRL's epochs are defined by the simulated cohort).")
  population, accounted_cohort, rate, simulated = _population_and_cohort(
      privacy, sampling=sampling, num_clients=num_clients,
      cohort_size=cohort_size, sampling_rate=sampling_rate)
  if noise_cohort and noise_cohort < simulated:
    raise accounting.PrivacyError(
        f"privacy.noise_cohort_size={noise_cohort} is smaller than the "
        f"simulated cohort ({simulated:g}); it is the (larger) cohort whose "
        "noise level to simulate.")
  spec = accounting.AccountingSpec(
      noise_multiplier=float(privacy.noise_multiplier), sampling=sampling,
      population=population, sampling_rate=rate,
      cohort_size=accounted_cohort, mechanism=_ACCOUNTED_AS[mechanism],
      accountant=privacy.get("accountant", "rdp"),
      rounds_per_tree=int(privacy.get("ftrl", {}).get("rounds_per_tree", 0)))
  delta = float(privacy.get("delta", 0.0)) or default_delta(population)
  if not 0 < delta < 1.0 / population:
    raise accounting.PrivacyError(
        f"privacy.delta={delta:g} must be in (0, 1/population) = (0, "
        f"{1.0 / population:.3g}) for a population of {population} clients; "
        "a larger delta allows releasing a client's data outright.")
  target = float(privacy.get("target_epsilon", 0.0) or 0.0)
  calibrated = bool(privacy.get("calibrate", False))
  if calibrated:
    if target <= 0:
      raise accounting.PrivacyError(
          "privacy.calibrate=True needs privacy.target_epsilon > 0.")
    spec.validate()
    spec = dataclasses.replace(
        spec, noise_multiplier=accounting.calibrate_noise_multiplier(
            spec, num_rounds, target, delta))
  spec.validate()
  if spec.noise_multiplier == 0 and target > 0:
    raise accounting.PrivacyError(
        "privacy.noise_multiplier is 0, so epsilon is infinite after one round"
        f" and target_epsilon={target} cannot be met; set a noise multiplier "
        "or privacy.calibrate=True.")
  return PrivacyPlan(mechanism=mechanism, spec=spec, delta=delta,
                     clip_norm=clip_norm,
                     calibrated=calibrated, target_epsilon=target,
                     simulated_cohort_size=simulated, settings=privacy)


def build_aggregator(plan: PrivacyPlan) -> base.Aggregator:
  """The aggregator implementing ``plan`` inside the compiled round."""
  noise_cohort = (plan.noise_cohort_size if not math.isclose(
      plan.noise_cohort_size, plan.simulated_cohort_size) else 0)
  if plan.mechanism == "gaussian":
    return aggregators.gaussian_sum(plan.clip_norm, plan.noise_multiplier,
                                    plan.simulated_cohort_size, noise_cohort)
  if plan.mechanism == "adaptive":
    adaptive = plan.settings.get("adaptive", {})
    return aggregators.adaptive_clipping(
        plan.clip_norm, plan.noise_multiplier, plan.simulated_cohort_size,
        target_quantile=adaptive.get("target_quantile", 0.5),
        clip_learning_rate=adaptive.get("clip_learning_rate", 0.2),
        clipped_count_stddev=adaptive.get("clipped_count_stddev", 0.0),
        noise_cohort_size=noise_cohort)
  if plan.mechanism == "tree":
    # DP-FTRL: clip and average here; the noise lives in the server optimizer.
    return aggregators.gaussian_sum(plan.clip_norm, 0.0,
                                    plan.simulated_cohort_size)
  if plan.mechanism == "local":
    return aggregators.local_gaussian(plan.clip_norm, plan.noise_multiplier)
  raise ValueError(f"no aggregator for mechanism {plan.mechanism!r}")


def build_ftrl_server_optimizer(plan: PrivacyPlan, learning_rate: float,
                                seed: int) -> optax.GradientTransformation:
  """DP-FTRL's server optimizer for ``plan`` (mechanism ``"tree"``)."""
  ftrl = plan.settings.get("ftrl", {})
  return tree.dp_ftrl(
      learning_rate=learning_rate,
      noise_std=(plan.noise_multiplier * plan.clip_norm /
                 plan.simulated_cohort_size),
      steps_per_tree=plan.spec.rounds_per_tree or plan.spec.rounds_per_epoch,
      momentum=ftrl.get("momentum", 0.0), seed=seed)
