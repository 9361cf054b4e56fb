"""The empirical epsilon of the one-shot privacy audit.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy
Estimation for Federated Learning", ICLR 2024 (arXiv:2302.03098).

The empirical epsilon is the epsilon of telling apart two Gaussians: the fit
``N(mu, sigma^2)`` of the inserted canaries' cosines (sample mean and std) and
the null ``N(0, 1/d)`` (or, as an option, the fit of the held-out cosines):
the smallest ``eps >= 0`` with ``max(H_eps(P||Q), H_eps(Q||P)) <= delta``,
``H_eps`` the hockey-stick divergence. For equal variances this is the
Gaussian mechanism with sensitivity/noise ratio ``|mu| / sigma``.

The sample std of ``k`` inserted cosines misses the null's ``1/sqrt(d)`` by
``~1/sqrt(2k)`` relatively even without any signal, and unequal variances
alone give a positive epsilon (e.g. ``k = 100``, ``delta = 1e-6``: median
~1.2 for pure-null cosines; ``k = 1000``: ~0.3).

The pieces: :func:`hockey_stick_divergence`, :func:`gaussians_epsilon`,
:func:`gaussian_mechanism_delta` and :func:`empirical_epsilon`.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import special

NULLS = ("theoretical", "held_out")


def _log1mexp(x: float) -> float:
  """``log(1 - exp(x))`` for ``x <= 0``, accurate near 0 and for x << 0."""
  if x >= 0:
    return -math.inf
  if x > -math.log(2.0):
    return math.log(-math.expm1(x))
  return math.log1p(-math.exp(x))


def _log_std_normal_mass(lo: float, hi: float) -> float:
  """``log P(lo < Z < hi)`` for ``Z ~ N(0, 1)``, accurate in both tails."""
  if not lo < hi:
    return -math.inf
  if lo > 0:  # Both in the upper tail: reflect into the lower one.
    lo, hi = -hi, -lo
  log_hi = float(special.log_ndtr(hi))
  log_lo = float(special.log_ndtr(lo))
  return log_hi + _log1mexp(log_lo - log_hi)


def _log_mass(intervals: list[tuple[float, float]], mu: float,
              sigma: float) -> float:
  """``log N(mu, sigma^2)(union of disjoint intervals)``."""
  logs = [_log_std_normal_mass((lo - mu) / sigma, (hi - mu) / sigma)
          for lo, hi in intervals]
  logs = [v for v in logs if v > -math.inf]
  if not logs:
    return -math.inf
  return float(special.logsumexp(logs))


def _privacy_loss_region(epsilon: float, m: float,
                         s: float) -> list[tuple[float, float]]:
  """``{x : log p(x) - log q(x) > epsilon}`` for ``p = N(m, s^2)``, ``q = N(0,1)``.

  ``log p - log q = a x^2 + b x + c`` with ``a = (1 - 1/s^2) / 2``,
  ``b = m / s^2``, ``c = -m^2 / (2 s^2) - log s``: the region is a half-line
  (``a = 0``), an interval (``a < 0``) or the complement of one (``a > 0``),
  from the roots of ``a x^2 + b x + (c - epsilon)`` (computed in the
  cancellation-free form).
  """
  a = 0.5 * (1.0 - 1.0 / (s * s))
  b = m / (s * s)
  c = -m * m / (2.0 * s * s) - math.log(s) - epsilon
  inf = math.inf
  if a == 0.0:
    if b == 0.0:
      return [(-inf, inf)] if c > 0 else []
    root = -c / b
    return [(root, inf)] if b > 0 else [(-inf, root)]
  disc = b * b - 4.0 * a * c
  if disc <= 0.0:
    return [(-inf, inf)] if a > 0 else []
  q = -0.5 * (b + math.copysign(math.sqrt(disc), b))
  with np.errstate(over="ignore", divide="ignore"):
    roots = sorted([float(np.float64(q) / np.float64(a)),
                    float(np.float64(c) / np.float64(q))])
  if a > 0:
    return [(-inf, roots[0]), (roots[1], inf)]
  return [(roots[0], roots[1])]


def hockey_stick_divergence(epsilon: float, mu_p: float, sigma_p: float,
                            mu_q: float, sigma_q: float) -> float:
  """``H_eps(P || Q) = sup_A P(A) - e^eps Q(A)`` for 1-D Gaussians P and Q.

  The supremum is attained on ``A = {x : log p(x)/q(x) > eps}``, which for two
  Gaussians is a half-line, an interval or the complement of an interval
  (see ``_privacy_loss_region``); its P and Q masses are normal CDF
  differences. Everything is done in log space after standardising Q to
  ``N(0, 1)`` (the divergence is invariant under the same affine map of both),
  so tiny ``delta`` and large ``epsilon`` keep their precision:
  ``H = P(A) * (1 - exp(eps + log Q(A) - log P(A)))``.

  Args:
    epsilon: ``eps >= 0`` (any real works).
    mu_p: mean of P.
    sigma_p: standard deviation of P (> 0).
    mu_q: mean of Q.
    sigma_q: standard deviation of Q (> 0).

  Returns:
    The divergence, in ``[0, 1]``.
  """
  if not (sigma_p > 0 and sigma_q > 0):
    raise ValueError(f"standard deviations must be > 0, got {sigma_p}, "
                     f"{sigma_q}.")
  m = (mu_p - mu_q) / sigma_q
  s = sigma_p / sigma_q
  region = _privacy_loss_region(float(epsilon), m, s)
  log_p = _log_mass(region, m, s)
  if log_p == -math.inf:
    return 0.0
  log_q = _log_mass(region, 0.0, 1.0)
  gap = float(epsilon) + log_q - log_p
  if gap >= 0.0:  # Only rounding can get here: p > e^eps q on A.
    return 0.0
  return max(0.0, math.exp(log_p + _log1mexp(gap)))


def gaussian_mechanism_delta(epsilon: float, effect_size: float) -> float:
  """Closed-form ``delta(eps)`` of ``N(m, 1)`` vs ``N(0, 1)`` (m = effect size).

  ``delta = Phi(-eps/m + m/2) - e^eps Phi(-eps/m - m/2)`` (Balle & Wang,
  ICML 2018), the tight curve of the Gaussian mechanism with sensitivity over
  noise std ``m``; symmetric in the two directions. ``m = 0`` gives 0.
  """
  m = abs(float(effect_size))
  if m == 0.0:
    return 0.0
  log_first = float(special.log_ndtr(-epsilon / m + m / 2))
  log_second = float(epsilon + special.log_ndtr(-epsilon / m - m / 2))
  if log_second >= log_first:  # Only rounding can get here.
    return 0.0
  return math.exp(log_first + _log1mexp(log_second - log_first))


def gaussians_epsilon(delta: float, mu_p: float, sigma_p: float, mu_q: float,
                      sigma_q: float, tolerance: float = 1e-9,
                      max_epsilon: float = 1e4) -> float:
  """Smallest ``eps >= 0`` with ``max(H_eps(P||Q), H_eps(Q||P)) <= delta``.

  Both divergences fall as ``eps`` grows, so a doubling search brackets the
  answer and bisection narrows it to ``tolerance`` (relative to ``max(1,
  eps)``); the upper end of the final bracket is returned (it satisfies the
  inequality). Returns ``inf`` if even ``max_epsilon`` does not (e.g. a P far
  narrower than Q: the privacy loss of unequal variances is unbounded).

  Args:
    delta: target ``delta`` in ``(0, 1)``.
    mu_p: mean of P.
    sigma_p: standard deviation of P.
    mu_q: mean of Q.
    sigma_q: standard deviation of Q.
    tolerance: bisection stopping width.
    max_epsilon: give up (return ``inf``) above this.
  """
  if not 0.0 < delta < 1.0:
    raise ValueError(f"delta must be in (0, 1), got {delta}.")

  def worst(eps):
    return max(hockey_stick_divergence(eps, mu_p, sigma_p, mu_q, sigma_q),
               hockey_stick_divergence(eps, mu_q, sigma_q, mu_p, sigma_p))

  if worst(0.0) <= delta:
    return 0.0
  lo, hi = 0.0, 1.0
  while worst(hi) > delta:
    lo, hi = hi, 2.0 * hi
    if hi > max_epsilon:
      return math.inf
  while hi - lo > tolerance * max(1.0, hi):
    mid = 0.5 * (lo + hi)
    if worst(mid) > delta:
      lo = mid
    else:
      hi = mid
  return hi


@dataclasses.dataclass(frozen=True)
class EpsilonEstimate:
  """The empirical epsilon and the two Gaussians it separates.

  Attributes:
    epsilon: the estimate (``inf`` if the search gave up).
    delta: the ``delta`` it holds at.
    mu: mean of the inserted cosines.
    sigma: sample standard deviation of the inserted cosines.
    null_mu: mean of the null (0 for the theoretical null).
    null_sigma: std of the null (``1/sqrt(d)`` for the theoretical null).
    null: ``"theoretical"`` or ``"held_out"``.
  """

  epsilon: float
  delta: float
  mu: float
  sigma: float
  null_mu: float
  null_sigma: float
  null: str


def _fit(values: np.ndarray, name: str) -> tuple[float, float]:
  values = np.asarray(values, np.float64)
  if len(values) < 2:
    raise ValueError(f"need at least 2 {name} cosines to fit a Gaussian, got "
                     f"{len(values)}.")
  mean, std = float(np.mean(values)), float(np.std(values, ddof=1))
  # All-equal cosines: a point mass, floored so the search stays defined.
  return mean, max(std, 1e-12 * max(1.0, abs(mean)))


def empirical_epsilon(inserted_cosines: np.ndarray, delta: float,
                      dimension: int | None = None,
                      held_out_cosines: np.ndarray | None = None,
                      null: str = "theoretical") -> EpsilonEstimate:
  """The one-shot estimate: epsilon between the inserted fit and the null.

  Args:
    inserted_cosines: ``cos(Delta, u_i)`` of the inserted canaries.
    delta: the ``delta`` to report epsilon at.
    dimension: ``d``, the number of model parameters; the theoretical null is
      ``N(0, 1/d)`` (the cosine of a random direction with a fixed vector).
    held_out_cosines: cosines of never-inserted directions; the
      ``"held_out"`` null is ``N(mean, std^2)`` fitted to them.
    null: ``"theoretical"`` (the paper's choice) or ``"held_out"``.

  Returns:
    An :class:`EpsilonEstimate`.
  """
  if null not in NULLS:
    raise ValueError(f"null must be one of {NULLS}, got {null!r}.")
  mu, sigma = _fit(inserted_cosines, "inserted")
  if null == "theoretical":
    if not dimension or dimension < 1:
      raise ValueError("the theoretical null needs dimension (d >= 1).")
    null_mu, null_sigma = 0.0, 1.0 / math.sqrt(dimension)
  else:
    if held_out_cosines is None:
      raise ValueError("null='held_out' needs held_out_cosines.")
    null_mu, null_sigma = _fit(held_out_cosines, "held-out")
  epsilon = gaussians_epsilon(delta, mu, sigma, null_mu, null_sigma)
  return EpsilonEstimate(epsilon=epsilon, delta=float(delta), mu=mu,
                         sigma=sigma, null_mu=null_mu, null_sigma=null_sigma,
                         null=null)
