"""Epsilon of two Gaussians and the one-shot empirical estimate."""

import math

import numpy as np
import pytest
from scipy import integrate, stats

from fedjax_lab.privacy import empirical_epsilon as epsilon_lib


@pytest.mark.parametrize("effect", [0.1, 0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("epsilon", [0.0, 0.5, 1.0, 3.0, 8.0])
def test_hockey_stick_equal_variances_is_closed_form(effect, epsilon):
  closed = epsilon_lib.gaussian_mechanism_delta(epsilon, effect)
  for scale, shift in [(1.0, 0.0), (0.03, 0.01)]:  # Affine invariance too.
    forward = epsilon_lib.hockey_stick_divergence(
        epsilon, shift + scale * effect, scale, shift, scale)
    backward = epsilon_lib.hockey_stick_divergence(
        epsilon, shift, scale, shift + scale * effect, scale)
    assert forward == pytest.approx(closed, rel=1e-8, abs=1e-15)
    assert backward == pytest.approx(closed, rel=1e-8, abs=1e-15)


@pytest.mark.parametrize("effect", [0.3, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-5, 1e-8])
def test_epsilon_equal_variances_inverts_closed_form(effect, delta):
  eps = epsilon_lib.gaussians_epsilon(delta, effect, 1.0, 0.0, 1.0)
  assert eps > 0
  assert epsilon_lib.gaussian_mechanism_delta(eps, effect) <= (
      delta * (1 + 1e-6))
  assert epsilon_lib.gaussian_mechanism_delta(
      eps * (1 - 1e-5) - 1e-9, effect) > delta


@pytest.mark.parametrize("mu_p,sigma_p", [(1.0, 1.5), (1.0, 0.7), (2.0, 0.3),
                                           (0.0, 1.2), (-0.5, 0.9)])
@pytest.mark.parametrize("epsilon", [0.0, 0.7, 2.0])
def test_hockey_stick_unequal_variances_matches_quadrature(mu_p, sigma_p,
                                                           epsilon):
  def integrand(x):
    return max(0.0, stats.norm.pdf(x, mu_p, sigma_p) -
               math.exp(epsilon) * stats.norm.pdf(x))

  lo, hi = min(mu_p - 15 * sigma_p, -15.0), max(mu_p + 15 * sigma_p, 15.0)
  expected, _ = integrate.quad(integrand, lo, hi, limit=500,
                               points=[mu_p, 0.0], epsabs=1e-13)
  got = epsilon_lib.hockey_stick_divergence(epsilon, mu_p, sigma_p, 0.0,
                                            1.0)
  assert got == pytest.approx(expected, rel=1e-6, abs=1e-11)


def test_epsilon_grows_with_effect_and_vanishes_for_identical():
  assert epsilon_lib.gaussians_epsilon(1e-6, 0.0, 1.0, 0.0, 1.0) == 0.0
  assert epsilon_lib.gaussians_epsilon(1e-6, 0.002, 0.01, 0.002,
                                       0.01) == 0.0
  tiny = epsilon_lib.gaussians_epsilon(1e-6, 1e-4, 1.0, 0.0, 1.0)
  assert tiny < 1e-3
  values = [epsilon_lib.gaussians_epsilon(1e-6, m, 1.0, 0.0, 1.0)
            for m in (0.25, 0.5, 1.0, 2.0, 4.0)]
  assert all(a < b for a, b in zip(values, values[1:]))
  # A narrower alternative is more distinguishable, not less.
  assert epsilon_lib.gaussians_epsilon(1e-6, 1.0, 0.5, 0.0, 1.0) > (
      values[2])


def test_empirical_epsilon_nulls():
  rng = np.random.default_rng(0)
  d = 10_000
  null = rng.normal(0, 1 / math.sqrt(d), size=5000)
  inserted = rng.normal(4 / math.sqrt(d), 1 / math.sqrt(d), size=5000)
  estimate = epsilon_lib.empirical_epsilon(inserted, 1e-5, dimension=d)
  # Close to the Gaussian mechanism with effect size 4.
  assert estimate.epsilon == pytest.approx(
      epsilon_lib.gaussians_epsilon(1e-5, 4.0, 1.0, 0.0, 1.0), rel=0.15)
  held = epsilon_lib.empirical_epsilon(inserted, 1e-5,
                                       held_out_cosines=null,
                                       null="held_out")
  assert held.epsilon == pytest.approx(estimate.epsilon, rel=0.15)
  assert held.null == "held_out" and held.null_sigma > 0
  no_signal = epsilon_lib.empirical_epsilon(null[:2500], 1e-5, dimension=d)
  assert no_signal.epsilon < 0.6
  with pytest.raises(ValueError):
    epsilon_lib.empirical_epsilon(inserted, 1e-5, null="held_out")
  with pytest.raises(ValueError):
    epsilon_lib.empirical_epsilon(inserted[:1], 1e-5, dimension=d)
