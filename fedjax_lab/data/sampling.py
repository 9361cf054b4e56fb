"""Client samplers: which clients take part in a federated round.

A sampler maps a round index to a sorted ``int64`` array of client positions
(rows of a :class:`~fedjax_lab.data.federated.ClientStore`). The draw depends
only on ``(seed, round_index)``, never on earlier draws, so a run resumed at
round ``t`` draws exactly the cohorts it would have drawn without stopping, and
rounds can be sampled out of order (e.g. by a prefetcher).

Three schemes are provided:

* :class:`UniformSampler` (``kind = "fixed"``): ``cohort_size`` distinct
  clients, uniformly at random without replacement (the usual FedAvg setting).
* :class:`PoissonSampler` (``kind = "poisson"``): every client is included
  independently with probability ``sampling_rate``, so the cohort size is
  ``Binomial(num_clients, sampling_rate)`` and may be 0. This is the scheme
  that user-level DP accounting (amplification by sampling) assumes.
* :class:`ShuffledSampler` (``kind = "shuffle"``): rounds are grouped in
  epochs; each epoch walks through a fresh random permutation of the clients,
  ``cohort_size`` at a time, so every client takes part in at most one round
  per epoch. This is what DP-FTRL's tree-aggregation accounting assumes
  (:mod:`fedjax_lab.privacy.tree`).

:class:`ScheduleSampler` (``kind = "schedule"``) replays a given list of
cohorts instead of drawing them.

A round's draw costs O(cohort), not O(population): uniform and Poisson
cohorts of a large population are drawn as a subset (Floyd's algorithm,
after a Binomial count for Poisson), and the shuffled sampler draws one
permutation per epoch (``tests/data/test_sampling.py`` checks the memory of a
draw from 10^8 clients).
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from fedjax_lab.checks import check_int

# Distinct salts keep the samplers' random streams unrelated even when
# they share a seed (and unrelated to the batching streams in cohort.py).
_UNIFORM_SALT = 0x5A3F_01
_POISSON_SALT = 0x5A3F_02
_SHUFFLE_SALT = 0x5A3F_03


class ClientSampler(Protocol):
  """What the training loop needs from a sampler."""

  kind: str
  num_clients: int

  def sample(self, round_index: int) -> np.ndarray:
    """Sorted ``int64`` client positions for round ``round_index``."""
    ...


def _round_rng(seed: int, round_index: int, salt: int) -> np.random.Generator:
  """Generator seeded from ``(seed, round_index, salt)`` only."""
  round_index = check_int("round_index", round_index, 0)
  return np.random.default_rng([seed, round_index, salt])


class UniformSampler:
  """``cohort_size`` distinct clients per round, uniformly at random.

  Attributes:
    num_clients: population size N; clients are positions ``0..N-1``.
    cohort_size: number of clients drawn per round (``<= num_clients``).
    seed: non-negative integer; with ``round_index`` it fixes the draw.
    kind: ``"fixed"`` (the cohort size does not vary between rounds).
  """

  kind = "fixed"

  def __init__(self, num_clients: int, cohort_size: int, seed: int):
    self.num_clients = check_int("num_clients", num_clients, 1)
    self.cohort_size = check_int("cohort_size", cohort_size, 1)
    self.seed = check_int("seed", seed, 0)
    if self.cohort_size > self.num_clients:
      raise ValueError(
          f"cohort_size ({self.cohort_size}) cannot exceed num_clients "
          f"({self.num_clients}) when sampling without replacement.")

  def sample(self, round_index: int) -> np.ndarray:
    """``[cohort_size]`` int64 client positions, distinct, sorted ascending."""
    rng = _round_rng(self.seed, round_index, _UNIFORM_SALT)
    chosen = rng.choice(self.num_clients, size=self.cohort_size,
                        replace=False, shuffle=False)
    return np.sort(chosen).astype(np.int64)

  def __repr__(self) -> str:
    return (f"UniformSampler(num_clients={self.num_clients}, "
            f"cohort_size={self.cohort_size}, seed={self.seed})")


class PoissonSampler:
  """Each client joins a round independently with probability ``sampling_rate``.

  Attributes:
    num_clients: population size N; clients are positions ``0..N-1``.
    sampling_rate: inclusion probability q in ``(0, 1]``.
    seed: non-negative integer; with ``round_index`` it fixes the draw.
    kind: ``"poisson"`` (cohort size ~ Binomial(N, q), possibly 0).
  """

  kind = "poisson"

  def __init__(self, num_clients: int, sampling_rate: float, seed: int):
    self.num_clients = check_int("num_clients", num_clients, 1)
    self.seed = check_int("seed", seed, 0)
    if isinstance(sampling_rate, (bool, np.bool_)) or not isinstance(
        sampling_rate, (int, float, np.integer, np.floating)):
      raise TypeError(
          f"sampling_rate must be a number, got {sampling_rate!r}.")
    rate = float(sampling_rate)
    if not 0.0 < rate <= 1.0:  # Also rejects NaN.
      raise ValueError(
          f"sampling_rate must be in (0, 1], got {sampling_rate!r}.")
    self.sampling_rate = rate

  @property
  def expected_cohort_size(self) -> float:
    """Mean number of clients per round, ``num_clients * sampling_rate``."""
    return self.num_clients * self.sampling_rate

  def sample(self, round_index: int) -> np.ndarray:
    """Sorted int64 positions of the clients included in round ``round_index``.

    The length varies between rounds and can be 0.
    """
    # O(cohort), not O(N): the number of included clients of N independent
    # Bernoulli(q) draws is Binomial(N, q), and given that count every
    # subset of that size is equally likely; numpy draws a small subset of a
    # large population with Floyd's algorithm (a hash set of the chosen
    # positions), so a round costs O(cohort) at any population size.
    rng = _round_rng(self.seed, round_index, _POISSON_SALT)
    count = int(rng.binomial(self.num_clients, self.sampling_rate))
    chosen = rng.choice(self.num_clients, size=count, replace=False,
                        shuffle=False)
    return np.sort(chosen).astype(np.int64)

  def __repr__(self) -> str:
    return (f"PoissonSampler(num_clients={self.num_clients}, "
            f"sampling_rate={self.sampling_rate}, seed={self.seed})")


class ShuffledSampler(UniformSampler):
  """Epochs of shuffled, disjoint cohorts: each client at most once per epoch.

  Rounds are grouped in epochs of ``rounds_per_epoch = num_clients //
  cohort_size`` rounds. Epoch ``e`` draws a permutation of all clients from
  ``(seed, e)`` only, and its ``r``-th round takes the clients at positions
  ``r * cohort_size .. (r + 1) * cohort_size - 1`` of that permutation. The
  ``num_clients % cohort_size`` clients at the end of the permutation sit the
  epoch out. Like the other samplers, a cohort is a pure function of
  ``(seed, round_index)``.

  DP-FTRL (Kairouz et al., ICML 2021) needs every client in at most one round
  per tree; start trees at epoch boundaries with ``steps_per_tree`` equal to
  (or a divisor of) ``rounds_per_epoch``.

  Attributes:
    num_clients: population size N; clients are positions ``0..N-1``.
    cohort_size: number of clients per round (``<= num_clients``).
    seed: non-negative integer; with the epoch it fixes the permutation.
    rounds_per_epoch: ``num_clients // cohort_size``.
    kind: ``"shuffle"``.
  """

  kind = "shuffle"

  def __init__(self, num_clients: int, cohort_size: int, seed: int):
    super().__init__(num_clients, cohort_size, seed)  # same argument checks
    self.rounds_per_epoch = self.num_clients // self.cohort_size

  def epoch(self, round_index: int) -> int:
    """Index of the epoch that round ``round_index`` belongs to."""
    round_index = check_int("round_index", round_index, 0)
    return round_index // self.rounds_per_epoch

  def _permutation(self, epoch: int) -> np.ndarray:
    """Epoch ``epoch``'s permutation of the population, drawn once per
    epoch (O(N) per epoch, so O(cohort) per round amortised)."""
    cached = getattr(self, "_cached", None)
    if cached is None or cached[0] != epoch:
      rng = _round_rng(self.seed, epoch, _SHUFFLE_SALT)
      cached = (epoch, rng.permutation(self.num_clients))
      self._cached = cached
    return cached[1]

  def sample(self, round_index: int) -> np.ndarray:
    """``[cohort_size]`` int64 client positions, distinct, sorted ascending."""
    epoch = self.epoch(round_index)
    position = round_index % self.rounds_per_epoch
    permutation = self._permutation(epoch)
    start = position * self.cohort_size
    chosen = permutation[start:start + self.cohort_size]
    return np.sort(chosen).astype(np.int64)

  def __repr__(self) -> str:
    return (f"ShuffledSampler(num_clients={self.num_clients}, "
            f"cohort_size={self.cohort_size}, seed={self.seed})")


class ScheduleSampler:
  """Replays a given list of cohorts: round ``t`` trains ``cohorts[t]``.

  For reproducing another system's run or a hand-chosen schedule. The
  schedule is fixed before training, so it is a pure function of the round
  like the random samplers, and resume replays it exactly. It carries no
  privacy amplification (nothing about it is random), so a DP run refuses
  it.

  Attributes:
    num_clients: population size N; clients are positions ``0..N-1``.
    cohorts: one sorted ``int64`` array of distinct positions per round.
    kind: ``"schedule"``.
  """

  kind = "schedule"

  def __init__(self, num_clients: int, cohorts):
    self.num_clients = check_int("num_clients", num_clients, 1)
    checked = []
    for round_index, cohort in enumerate(cohorts):
      positions = np.asarray(cohort)
      if positions.ndim != 1 or (positions.size and not np.issubdtype(
          positions.dtype, np.integer)):
        raise ValueError(
            f"cohort of round {round_index} must be a 1-D list of client "
            f"positions, got {cohort!r}.")
      positions = np.sort(positions.astype(np.int64))
      if positions.size and (positions[0] < 0 or
                             positions[-1] >= self.num_clients):
        raise ValueError(
            f"cohort of round {round_index} names client positions outside "
            f"[0, {self.num_clients}): {positions.tolist()}.")
      if np.any(np.diff(positions) == 0):
        raise ValueError(
            f"cohort of round {round_index} repeats a client: "
            f"{positions.tolist()}.")
      checked.append(positions)
    if not checked:
      raise ValueError("a schedule needs at least one cohort.")
    self.cohorts = tuple(checked)

  @property
  def num_rounds(self) -> int:
    """How many rounds the schedule covers."""
    return len(self.cohorts)

  def sample(self, round_index: int) -> np.ndarray:
    """The scheduled cohort of round ``round_index`` (sorted int64)."""
    round_index = check_int("round_index", round_index, 0)
    if round_index >= len(self.cohorts):
      raise IndexError(
          f"the schedule has {len(self.cohorts)} cohorts; round "
          f"{round_index + 1} has none (run at most {len(self.cohorts)} "
          "rounds).")
    return self.cohorts[round_index].copy()

  def __repr__(self) -> str:
    return (f"ScheduleSampler(num_clients={self.num_clients}, "
            f"num_rounds={self.num_rounds})")


_KIND_ALIASES = {"fixed": "fixed", "uniform": "fixed", "poisson": "poisson",
                 "shuffle": "shuffle", "shuffled": "shuffle"}


def make_sampler(kind: str, num_clients: int, *,
                 cohort_size: int | None = None,
                 sampling_rate: float | None = None,
                 seed: int = 0
                 ) -> UniformSampler | PoissonSampler | ShuffledSampler:
  """Builds a sampler from config values.

  Args:
    kind: ``"fixed"`` (alias ``"uniform"``), ``"poisson"`` or ``"shuffle"``
      (alias ``"shuffled"``).
    num_clients: population size.
    cohort_size: clients per round; required for ``"fixed"`` and
      ``"shuffle"``, rejected for ``"poisson"``.
    sampling_rate: inclusion probability; required for ``"poisson"`` and
      rejected for ``"fixed"`` and ``"shuffle"``.
    seed: non-negative integer seed.

  Returns:
    A :class:`UniformSampler`, :class:`PoissonSampler` or
    :class:`ShuffledSampler`.
  """
  normalized = _KIND_ALIASES.get(str(kind).lower())
  if normalized is None:
    raise ValueError(
        f"unknown sampler kind {kind!r}; expected one of "
        f"{sorted(_KIND_ALIASES)}.")
  if normalized in ("fixed", "shuffle"):
    if cohort_size is None:
      raise ValueError(f"a {normalized!r} sampler needs cohort_size.")
    if sampling_rate is not None:
      raise ValueError(
          "sampling_rate is only meaningful for kind='poisson'; got "
          f"sampling_rate={sampling_rate!r} with kind={kind!r}.")
    if normalized == "shuffle":
      return ShuffledSampler(num_clients, cohort_size, seed)
    return UniformSampler(num_clients, cohort_size, seed)
  if sampling_rate is None:
    raise ValueError("a 'poisson' sampler needs sampling_rate.")
  if cohort_size is not None:
    raise ValueError(
        "cohort_size is only meaningful for kind='fixed' or 'shuffle'; a "
        "Poisson sampler's size is set by sampling_rate (got "
        f"cohort_size={cohort_size!r}).")
  return PoissonSampler(num_clients, sampling_rate, seed)
