"""Privacy accounting of federated rounds, through ``dp_accounting``.

:class:`AccountingSpec` describes one round; :func:`dp_event` turns t rounds
into a ``DpEvent`` and :func:`make_accountant` builds an accountant with the
matching neighboring relation. z = ``noise_multiplier`` is the noise std on
the SUM of clipped client updates over the clip norm C (per tree node for
DP-FTRL, per client for local DP); guarantees are client-level.

Why each mechanism is described to ``dp_accounting`` the way it is:

* ``gaussian`` + ``poisson`` (DP-FedAvg, each client joins with probability
  q): add/remove-one neighbors move the sum by at most C, so each round is
  ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.
* ``gaussian`` + ``fixed`` (M of N drawn uniformly without replacement): the
  amplification theorem (Wang, Balle, Kasiviswanathan 2019, Thm. 27) holds for
  replace-one neighbors, with the base Gaussian's RDP alpha / (2 sigma^2) and
  sigma = std / sensitivity *under replace-one*; ``dp_accounting`` implements
  exactly that (``_compute_rdp_sample_wor_gaussian``: ``cgf(x) = x (x + 1) /
  (2 sigma^2)``, ``REPLACE_ONE`` required). Replacing a client moves a sum of
  C-clipped vectors by up to 2C, so sigma = zC / 2C: each round is
  ``SampledWithoutReplacementDpEvent(N, M, GaussianDpEvent(z / 2))``. The PLD
  accountant has no such event: pld + fixed is refused.
* ``gaussian`` + ``shuffle``: shuffling's amplification is not accounted.
* ``tree`` (DP-FTRL; Kairouz et al. 2021, "Practical and Private (Deep)
  Learning without Sampling or Shuffling", App. D): each client takes part at
  most once per epoch of E = N // M rounds; the noise tree restarts every R
  rounds, R dividing E (else a tree spans two epochs and may see a client
  twice). Neighbors replace a client by a special one whose update is zero
  (``REPLACE_SPECIAL``, sensitivity C per node), and a client touches one tree
  per epoch, so an epoch is ``SingleEpochTreeAggregationDpEvent(z, [R] *
  (E // R))``; epochs compose, a partial epoch lists the trees it started.
* ``local`` (each client adds N(0, (zC)^2) to its own clipped update; no
  amplification, the client is assumed in every round): replace-one moves the
  update by up to 2C, a Gaussian with Delta / sigma = 2 / z. The accountants
  read a Gaussian's ``noise_multiplier`` differently under ``REPLACE_ONE``:
  RDP as std / (distance between neighbors) whatever the relation, so it gets
  ``GaussianDpEvent(z / 2)``; PLD's ``from_gaussian_mechanism`` already puts
  the neighbors 2 sensitivities apart, so it gets ``GaussianDpEvent(z)`` (z / 2
  would count the 2 twice). For pld, :func:`epsilon` skips the accountant: t
  such Gaussians are one Gaussian with Delta / sigma = 2 sqrt(t) / z (the
  reduction the PLD accountant makes too), with a closed-form epsilon (Balle &
  Wang 2018, ``dp_accounting.get_epsilon_gaussian``); the accountant's value
  is above it by < 1e-6 relative but takes seconds once epsilon is in the
  hundreds, as local-DP epsilons often are.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Dict, List, Optional, Tuple

import dp_accounting
from dp_accounting import pld as dp_pld
from dp_accounting import rdp as dp_rdp
import numpy as np

from fedjax_lab.privacy import refusals

MECHANISMS = ("gaussian", "tree", "local")
SAMPLINGS = ("poisson", "fixed", "shuffle")
ACCOUNTANTS = ("rdp", "pld")

# PLD discretization; pessimistic, so epsilon only rounds up. Measured against
# 1e-5 (q from 5e-4 to 0.1, T up to 2e4): at most 2.9e-4 relative; 3e-4 would
# reach 2.8e-3.
PLD_VALUE_DISCRETIZATION = 1e-4


class _DropNonConvergedOrderWarnings(logging.Filter):
  """Silences dp_accounting's per-order "failed to converge" warnings.

  For large sampling rates its series for fractional RDP orders (1.1-1.9)
  does not converge and the order is excluded from the minimum over orders;
  excluding a candidate can only raise epsilon (conservative), and the
  integer and larger orders remain, so the warnings (dozens per call) carry
  no action for the user.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return "_compute_log_a_frac failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropNonConvergedOrderWarnings())

_Relation = dp_accounting.NeighboringRelation


class PrivacyError(ValueError):
  """A refused accounting combination or an unreachable privacy budget."""


@dataclasses.dataclass(frozen=True)
class AccountingSpec:
  """What the accountant needs about one round.

  Attributes:
    noise_multiplier: noise std on the sum of clipped updates / clip norm (per
      tree node for ``tree``, per client for ``local``).
    sampling: ``poisson`` | ``fixed`` | ``shuffle``.
    population: clients in the population accounted for.
    sampling_rate: poisson only: q (ignored otherwise).
    cohort_size: fixed / shuffle: clients per round (ignored for poisson).
    mechanism: ``gaussian`` (DP-FedAvg), ``tree`` (DP-FTRL), ``local``.
    accountant: ``rdp`` or ``pld``.
    rounds_per_tree: tree only: restart period R in rounds (0 = one epoch).
  """
  noise_multiplier: float
  sampling: str
  population: int
  sampling_rate: float = 0.0
  cohort_size: int = 0
  mechanism: str = "gaussian"
  accountant: str = "rdp"
  rounds_per_tree: int = 0

  def validate(self) -> None:
    """Raises PrivacyError for an invalid or refused combination."""
    for name, choices in (("mechanism", MECHANISMS), ("sampling", SAMPLINGS),
                          ("accountant", ACCOUNTANTS)):
      if getattr(self, name) not in choices:
        raise PrivacyError(f"unknown {name} {getattr(self, name)!r}; choose "
                           f"one of {', '.join(choices)}")
    z, n, m, tree = (self.noise_multiplier, self.population, self.cohort_size,
                     self.mechanism == "tree")
    problems = [
        (not z >= 0, f"noise_multiplier must be >= 0, got {z}"),
        (n < 1, f"population must be >= 1, got {n}"),
        (self.sampling == "poisson" and not 0 < self.sampling_rate <= 1,
         f"poisson sampling needs 0 < sampling_rate <= 1, got "
         f"{self.sampling_rate}"),
        (self.sampling != "poisson" and not 1 <= m <= n,
         f"{self.sampling} sampling needs 1 <= cohort_size <= population "
         f"({n}), got {m}"),
    ]
    for refused, message in problems:
      if refused:
        raise PrivacyError(message)
    # Refused mechanism x sampling x accountant combinations: rows of the
    # refusal table.
    reason = refusals.first_refusal(refusals.Setting(
        mechanism=self.mechanism, sampling=self.sampling,
        accountant=self.accountant), scopes=("accounting",))
    if reason is not None:
      raise PrivacyError(reason)
    if tree and self.rounds_per_tree < 0:
      raise PrivacyError(
          f"rounds_per_tree must be >= 0, got {self.rounds_per_tree}")
    if tree and self.rounds_per_epoch % _tree_period(self):
      raise PrivacyError(
          f"rounds_per_tree={self.rounds_per_tree} must divide the "
          f"{self.rounds_per_epoch} rounds of an epoch (population // "
          "cohort_size), else a tree would span two epochs and see a client "
          "twice")

  @property
  def rounds_per_epoch(self) -> int:
    """Rounds per epoch (each client at most once): N // M; 0 for poisson."""
    if self.sampling == "poisson":
      return 0
    return self.population // self.cohort_size

  @property
  def expected_cohort_size(self) -> float:
    """Expected clients per round: q * N for poisson, else cohort_size."""
    if self.sampling == "poisson":
      return self.sampling_rate * self.population
    return float(self.cohort_size)


def _tree_period(spec: AccountingSpec) -> int:
  """Rounds per tree: ``rounds_per_tree``, or one epoch when it is 0."""
  return spec.rounds_per_tree or spec.rounds_per_epoch


def neighboring_relation(
    spec: AccountingSpec) -> dp_accounting.NeighboringRelation:
  """The neighboring relation under which ``spec`` is accounted."""
  spec.validate()
  if spec.mechanism == "tree":
    return _Relation.REPLACE_SPECIAL
  if spec.mechanism == "local" or spec.sampling == "fixed":
    return _Relation.REPLACE_ONE
  return _Relation.ADD_OR_REMOVE_ONE


def _tree_steps(rounds: int, period: int) -> List[int]:
  full, rest = divmod(rounds, period)
  return [period] * full + ([rest] if rest else [])


def _terms(spec: AccountingSpec, rounds: int
           ) -> List[Tuple[int, dp_accounting.DpEvent]]:
  """``(count, event)`` pairs whose composition is the first ``rounds``."""
  if rounds < 0:
    raise PrivacyError(f"rounds must be >= 0, got {rounds}")
  if rounds == 0:
    return []
  z = spec.noise_multiplier
  if spec.mechanism == "local":
    scale = 1.0 if spec.accountant == "pld" else 0.5  # See module docstring.
    return [(rounds, dp_accounting.GaussianDpEvent(z * scale))]
  if spec.mechanism == "gaussian":
    if spec.sampling == "poisson":
      unit = dp_accounting.PoissonSampledDpEvent(
          spec.sampling_rate, dp_accounting.GaussianDpEvent(z))
    else:
      unit = dp_accounting.SampledWithoutReplacementDpEvent(
          spec.population, spec.cohort_size,
          dp_accounting.GaussianDpEvent(z / 2))
    return [(rounds, unit)]
  epoch, period = spec.rounds_per_epoch, _tree_period(spec)
  full, rest = divmod(rounds, epoch)
  terms = []
  if full:
    terms.append((full, dp_accounting.SingleEpochTreeAggregationDpEvent(
        z, _tree_steps(epoch, period))))
  if rest:
    terms.append((1, dp_accounting.SingleEpochTreeAggregationDpEvent(
        z, _tree_steps(rest, period))))
  return terms


def dp_event(spec: AccountingSpec, rounds: int) -> dp_accounting.DpEvent:
  """The DpEvent of the first ``rounds`` rounds (NoOpDpEvent for 0)."""
  spec.validate()
  events = []
  for count, event in _terms(spec, rounds):
    if spec.mechanism != "tree" or count > 1:
      event = dp_accounting.SelfComposedDpEvent(event, count)
    events.append(event)
  if not events:
    return dp_accounting.NoOpDpEvent()
  return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(
      events)


def make_accountant(spec: AccountingSpec) -> dp_accounting.PrivacyAccountant:
  """A fresh accountant of ``spec.accountant`` with the right relation."""
  relation = neighboring_relation(spec)
  if spec.accountant == "pld":
    return dp_pld.PLDAccountant(
        relation, value_discretization_interval=PLD_VALUE_DISCRETIZATION)
  return dp_rdp.RdpAccountant(neighboring_relation=relation)


def _check(spec: AccountingSpec, rounds: int, delta: float) -> None:
  spec.validate()
  if not 0 < delta < 1:
    raise PrivacyError(f"delta must be in (0, 1), got {delta}")
  if rounds < 0:
    raise PrivacyError(f"rounds must be >= 0, got {rounds}")


def epsilon(spec: AccountingSpec, rounds: int, delta: float) -> float:
  """Epsilon at ``delta`` after ``rounds`` rounds, from a fresh accountant.

  0 for 0 rounds; inf when the noise multiplier is 0 and rounds > 0; local +
  pld uses the closed form (module docstring).
  """
  _check(spec, rounds, delta)
  if rounds == 0:
    return 0.0
  if spec.noise_multiplier == 0:
    return math.inf
  if spec.mechanism == "local" and spec.accountant == "pld":
    return float(dp_accounting.get_epsilon_gaussian(
        spec.noise_multiplier / (2 * math.sqrt(rounds)), delta))
  accountant = make_accountant(spec)
  accountant.compose(dp_event(spec, rounds))
  return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(spec: AccountingSpec, rounds: int,
                               target_epsilon: float, delta: float) -> float:
  """Smallest noise multiplier with epsilon <= ``target_epsilon`` at ``delta``.

  ``spec.noise_multiplier`` is ignored; 0.0 for 0 rounds. A bracket [z / 2, z]
  with finite epsilon at both ends is found by doubling or halving from 1, then
  ``dp_accounting.calibrate_dp_mechanism`` (Brent's method, tolerance 1e-6 in
  z, on the same accountant and events as :func:`epsilon`) returns a z with
  epsilon <= target. Local + pld inverts the closed form instead
  (``dp_accounting.get_sigma_gaussian``).
  """
  spec = dataclasses.replace(spec, noise_multiplier=1.0)
  _check(spec, rounds, delta)
  if rounds == 0:
    return 0.0
  if not target_epsilon > 0:
    raise PrivacyError(f"target_epsilon must be > 0 (epsilon 0 needs infinite "
                       f"noise), got {target_epsilon}")

  def eps_at(z: float) -> float:
    return epsilon(dataclasses.replace(spec, noise_multiplier=z), rounds,
                   delta)

  if spec.mechanism == "local" and spec.accountant == "pld":
    z = 2 * math.sqrt(rounds) * dp_accounting.get_sigma_gaussian(
        target_epsilon, delta)
    while eps_at(z) > target_epsilon:  # Brent's root may sit a hair low.
      z *= 1 + 1e-12
    return float(z)
  high = 1.0
  while eps_at(high) > target_epsilon:
    high *= 2
    if high > 2.0**40:
      raise PrivacyError(
          f"epsilon {target_epsilon} at delta {delta} is out of reach after "
          f"{rounds} rounds even with noise_multiplier 2**40; raise "
          "target_epsilon or delta, or run fewer rounds")
  low = high / 2
  while eps_at(low) <= target_epsilon:
    high, low = low, low / 2
    if low < 1e-6:
      raise PrivacyError(f"target_epsilon {target_epsilon} is met with "
                         "essentially no noise (noise_multiplier < 1e-6)")
  z = dp_accounting.calibrate_dp_mechanism(
      lambda: make_accountant(spec),
      lambda z: dp_event(dataclasses.replace(spec, noise_multiplier=z),
                         rounds),
      target_epsilon, delta, dp_accounting.ExplicitBracketInterval(low, high))
  if eps_at(z) > target_epsilon:  # calibrate_dp_mechanism promises otherwise.
    raise PrivacyError(f"calibration missed: epsilon({z}) > {target_epsilon}")
  return float(z)


class RoundAccountant:
  """Epsilon after each round of one run, cheap enough to call every round.

  RDP: the RDP vector of each distinct term of the composition (one round;
  for the tree one epoch and each partial epoch) is computed once; t rounds
  sum ``count * vector`` in the order ``RdpAccountant`` does and convert with
  its ``compute_epsilon``, so values equal :func:`epsilon` bit for bit.
  PLD, gaussian + poisson: the one-round PLD is built once; round t + 1
  composes it onto round t's PLD, other jumps self-compose it (both
  pessimistic; equal to :func:`epsilon` to ~1e-9 relative). PLD, local:
  :func:`epsilon`'s closed form. Every value is cached per t. Thread-safe
  (the training loop computes the next rounds' values in its prefetch
  thread while the device runs the current round).
  """

  def __init__(self, spec: AccountingSpec, delta: float):
    """Validates ``spec`` and ``delta``; nothing is computed yet."""
    _check(spec, 0, delta)
    self.spec, self.delta = spec, delta
    self._cache: Dict[int, float] = {0: 0.0}
    self._unit_rdp: Dict[str, np.ndarray] = {}
    self._orders: Optional[np.ndarray] = None
    self._one_pld = None
    self._last: Optional[Tuple[int, object]] = None
    self._lock = threading.Lock()

  def epsilon(self, rounds: int) -> float:
    """Epsilon at ``self.delta`` after ``rounds`` rounds (cached)."""
    if rounds < 0:
      raise PrivacyError(f"rounds must be >= 0, got {rounds}")
    with self._lock:
      return self._epsilon_locked(rounds)

  def _epsilon_locked(self, rounds: int) -> float:
    if rounds not in self._cache:
      if self.spec.noise_multiplier == 0:
        value = math.inf
      elif self.spec.accountant == "rdp":
        value = self._rdp_epsilon(rounds)
      elif self.spec.mechanism == "local":
        value = epsilon(self.spec, rounds, self.delta)
      else:
        value = self._pld_epsilon(rounds)
      self._cache[rounds] = float(value)
    return self._cache[rounds]

  def max_rounds_within(self, target_epsilon: float, limit: int) -> int:
    """Largest t <= ``limit`` with epsilon(t) <= target (0 if none)."""
    if self.epsilon(limit) <= target_epsilon:
      return limit
    low, high = 0, limit  # epsilon(low) <= target < epsilon(high), if t >= 1.
    while high - low > 1:
      mid = (low + high) // 2
      if self.epsilon(mid) <= target_epsilon:
        low = mid
      else:
        high = mid
    return low

  def _rdp_epsilon(self, rounds: int) -> float:
    total = 0.0
    for count, event in _terms(self.spec, rounds):
      key = repr(event)
      if key not in self._unit_rdp:
        accountant = make_accountant(self.spec)
        accountant.compose(event)
        self._unit_rdp[key], self._orders = accountant.rdp, accountant.orders
      total = total + count * self._unit_rdp[key]
    return dp_rdp.rdp_privacy_accountant.compute_epsilon(
        self._orders, total, self.delta)[0]

  def _pld_epsilon(self, rounds: int) -> float:
    if self._one_pld is None:
      self._one_pld = dp_pld.privacy_loss_distribution.from_gaussian_mechanism(
          standard_deviation=self.spec.noise_multiplier,
          value_discretization_interval=PLD_VALUE_DISCRETIZATION,
          sampling_prob=self.spec.sampling_rate,
          neighboring_relation=neighboring_relation(self.spec))
    if self._last is not None and self._last[0] == rounds - 1:
      pld = self._last[1].compose(self._one_pld)
    else:
      pld = self._one_pld.self_compose(rounds)
    self._last = (rounds, pld)
    return pld.get_epsilon_for_delta(self.delta)
