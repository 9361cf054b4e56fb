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

  Both make the reported epsilon a statement about a hypothetical deployment
  (a larger cohort or population than the simulation has); the run warns,
  and its summary gives the epsilon of the simulated run beside it
  (``epsilon_simulated_run``).
* ``noise_seed``: < 0 (default) draws the DP noise and the cohort sampling
  from a secret seed kept only in checkpoints
  (:mod:`fedjax_lab.privacy.secret_seed`); >= 0 makes them reproducible from
  the config, for simulation studies (every output then says the noise is
  seeded: the run is not a private release).
* ``release_diagnostics``: also write the metrics computed from clients' data
  without noise (training loss, update norms, cohort size, ...), labelled
  ``diagnostic/<name>``; they are not covered by epsilon
  (:mod:`fedjax_lab.privacy.release`).
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

from fedjax_lab.algorithms import base
from fedjax_lab.privacy import accounting
from fedjax_lab.privacy import refusals
from fedjax_lab.privacy import tree_noise

__all__ = ["MECHANISMS", "PrivacyPlan", "build_plan",
           "check_private_algorithm", "default_delta"]

MECHANISMS = ("none", "gaussian", "adaptive", "tree", "local")
# Noise levels and targets beyond these make a run meaningless; it warns.
NOISE_MULTIPLIER_WARN_ABOVE = 50.0
TARGET_EPSILON_WARN_BELOW = 0.01
EPSILON_WARN_ABOVE = 10.0
_RELATIONS = {
    "add_or_remove_one": "add/remove one client (all of its data)",
    "replace_one": "replace one client (all of its data) by another",
    "replace_special": "replace one client's contributions by zero (tree "
                       "aggregation: each client in at most one round per "
                       "epoch)",
}
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
    delta_from_config: whether ``delta`` was set (else ``1/population**1.1``).
    simulated_spec: the accounting of the run as simulated, when ``spec`` is
      that of a hypothetical deployment (``noise_cohort_size`` or
      ``accounting_population``); else None.
    noise_seed: ``>= 0``: the configured reproducible noise seed; ``-1``:
      secret (drawn by the runner, kept in checkpoints).
    release_diagnostics: write un-noised diagnostics, labelled.
    warnings: settings that make the guarantee or the run meaningless.
  """

  mechanism: str
  spec: accounting.AccountingSpec
  delta: float
  clip_norm: float
  calibrated: bool
  target_epsilon: float
  simulated_cohort_size: float
  settings: Any
  delta_from_config: bool = True
  simulated_spec: accounting.AccountingSpec | None = None
  noise_seed: int = -1
  release_diagnostics: bool = False
  warnings: tuple[str, ...] = ()

  @property
  def noise_seeded(self) -> bool:
    """Whether the noise (and cohort sampling) is reproducible from the
    config."""
    return self.noise_seed >= 0

  @property
  def hypothetical(self) -> bool:
    """Whether the reported epsilon is for a deployment other than the run."""
    return self.simulated_spec is not None

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
            "dp_noise_std_on_mean": tree_noise.prefix_noise_std(step, node_std),
            "dp_noise_std": tree_noise.prefix_noise_std(
                step, node_std * self.simulated_cohort_size)}

  def describe(self) -> dict[str, Any]:
    """The privacy report (JSON-ready): what is protected, under which
    relation, how delta was chosen, the accounting, the noise's secrecy."""
    spec = self.spec
    relation = accounting.neighboring_relation(spec).name.lower()
    out = {"unit": "user-level: every example of a client is protected "
                   "together",
           "neighboring_relation": _RELATIONS.get(relation, relation),
           "mechanism": self.mechanism, "accountant": spec.accountant,
           "sampling": spec.sampling, "population": spec.population,
           "noise_multiplier": self.noise_multiplier,
           "clip_norm": self.clip_norm, "delta": self.delta,
           "delta_chosen": ("privacy.delta" if self.delta_from_config else
                            f"default 1/population^1.1 (population "
                            f"{spec.population})"),
           "calibrated": self.calibrated,
           "target_epsilon": self.target_epsilon or None,
           "accounted_cohort_size": spec.expected_cohort_size,
           "simulated_cohort_size": self.simulated_cohort_size,
           "noise": (
               f"SEEDED (privacy.noise_seed={self.noise_seed}): the noise and "
               "the cohorts can be regenerated from config.json, so this run's "
               "outputs are not a private release" if self.noise_seeded else
               "secret: noise and cohort sampling come from a 64-bit seed "
               "drawn from the OS's entropy, kept only in the checkpoints"),
           "evaluation": (
               "eval_* metrics score the released model on the evaluation "
               "split; with a per-client split (every built-in dataset) those "
               "are held-out examples of the same users, which epsilon does "
               "not cover: treat them as a benchmark statistic, or evaluate "
               "on data from outside the population"),
           "warnings": list(self.warnings)}
    if spec.sampling == "poisson":
      out["sampling_rate"] = spec.sampling_rate
    if self.hypothetical:
      sim = self.simulated_spec
      parts = []
      if not math.isclose(spec.expected_cohort_size,
                          self.simulated_cohort_size):
        parts.append(f"a cohort of {spec.expected_cohort_size:g} clients "
                     f"(noise of that cohort added to a simulated cohort of "
                     f"{self.simulated_cohort_size:g})")
      if spec.population != sim.population:
        parts.append(f"a population of {spec.population} (the simulation "
                     f"has {sim.population})")
      out["note"] = ("epsilon is accounted for a hypothetical deployment "
                     f"with {' and '.join(parts)}; epsilon_simulated_run is "
                     "the guarantee of the run as simulated")
      out["simulated_run"] = {
          "population": sim.population,
          "noise_multiplier": sim.noise_multiplier,
          "sampling_rate": sim.sampling_rate if sim.sampling == "poisson"
                           else None,
          "cohort_size": sim.cohort_size or None}
    return out

  def epsilon_simulated_run(self, rounds: int) -> float:
    """epsilon at ``delta`` of ``rounds`` rounds of the run as simulated
    (= the reported epsilon unless :attr:`hypothetical`)."""
    return accounting.epsilon(self.simulated_spec or self.spec, rounds,
                              self.delta)


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
  reason = refusals.first_refusal(refusals.Setting(
      mechanism=mechanism, sampling=sampling, noise_cohort_size=noise_cohort,
      accounting_population=privacy.get("accounting_population", 0) or 0),
      scopes=("plan",))
  if reason is not None:
    raise accounting.PrivacyError(reason)
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
  delta_from_config = bool(privacy.get("delta", 0.0))
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
  noise_seed = int(privacy.get("noise_seed", -1))
  return PrivacyPlan(mechanism=mechanism, spec=spec, delta=delta,
                     clip_norm=clip_norm,
                     calibrated=calibrated, target_epsilon=target,
                     simulated_cohort_size=simulated, settings=privacy,
                     delta_from_config=delta_from_config,
                     simulated_spec=_simulated_spec(
                         spec, num_clients=num_clients, simulated=simulated,
                         sampling_rate=sampling_rate),
                     noise_seed=max(noise_seed, -1),
                     release_diagnostics=bool(
                         privacy.get("release_diagnostics", False)),
                     warnings=tuple(_warnings(spec, target, calibrated)))


def _simulated_spec(spec: accounting.AccountingSpec, *, num_clients: int,
                    simulated: float, sampling_rate: float
                    ) -> accounting.AccountingSpec | None:
  """The accounting of the run as simulated, when ``spec`` accounts for a
  larger cohort (``noise_cohort_size``) or population
  (``accounting_population``); None when they are the same.

  With a noise cohort of M clients the simulated cohort of m gets noise std
  ``z C m / M`` on its sum: noise multiplier ``z m / M`` for the m clients
  really sampled from the dataset's population.
  """
  if (spec.population == num_clients and
      math.isclose(spec.expected_cohort_size, simulated)):
    return None
  multiplier = spec.noise_multiplier
  if spec.mechanism != "local":
    multiplier *= simulated / spec.expected_cohort_size
  if spec.sampling == "poisson":
    return dataclasses.replace(spec, noise_multiplier=multiplier,
                               population=num_clients,
                               sampling_rate=sampling_rate)
  return dataclasses.replace(spec, noise_multiplier=multiplier,
                             population=num_clients,
                             cohort_size=int(round(simulated)))


def _warnings(spec: accounting.AccountingSpec, target: float,
              calibrated: bool) -> list[str]:
  """Settings that make the guarantee (or the training) meaningless."""
  out = []
  z = spec.noise_multiplier
  if z == 0:
    out.append("noise_multiplier is 0: no noise is added and epsilon is "
               "infinite; nothing this run releases is private (set "
               "privacy.mechanism=none for a non-private baseline).")
  elif z > NOISE_MULTIPLIER_WARN_ABOVE:
    out.append(
        f"noise_multiplier={z:.4g}{' (calibrated)' if calibrated else ''} "
        f"> {NOISE_MULTIPLIER_WARN_ABOVE:g}: the noise on each coordinate of "
        "the sum is that many clip norms, so training is unlikely to learn "
        "anything; raise target_epsilon, the cohort or the number of rounds' "
        "budget.")
  if 0 < target < TARGET_EPSILON_WARN_BELOW:
    out.append(f"target_epsilon={target:g} < {TARGET_EPSILON_WARN_BELOW:g}: "
               "a budget this small leaves noise that swamps any update.")
  return out


def check_private_algorithm(algorithm: base.FederatedAlgorithm) -> None:
  """Refuses an algorithm through which client data would reach the server
  state outside the DP aggregator (the clipped, noised sum): the ``built``
  rows of :mod:`fedjax_lab.privacy.refusals` (a ``pre_round`` whose exact
  mean the server absorbs, ``server_update_uses_client_metrics``).

  Raises:
    accounting.PrivacyError: naming the path.
  """
  reason = refusals.first_refusal(refusals.Setting(
      mechanism="gaussian", built_algorithm=algorithm), scopes=("built",))
  if reason is not None:
    raise accounting.PrivacyError(reason)
