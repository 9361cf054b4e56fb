"""Tests for fedjax_lab.privacy.accounting.

Every expected value is computed by building the DpEvents by hand and
composing them into a fresh dp_accounting accountant (or from a closed form),
independently of the module's helpers.
"""

import dataclasses
import math
import time

import dp_accounting
from dp_accounting import pld
from dp_accounting import rdp
import numpy as np
import pytest

from fedjax_lab.privacy import accounting

Rel = dp_accounting.NeighboringRelation
DELTA = 1e-5


def _poisson(z=1.1, q=0.01, accountant="rdp"):
  return accounting.AccountingSpec(noise_multiplier=z, sampling="poisson",
                                   population=10_000, sampling_rate=q,
                                   accountant=accountant)


def _fixed(z=1.1, n=1000, m=10):
  return accounting.AccountingSpec(noise_multiplier=z, sampling="fixed",
                                   population=n, cohort_size=m)


def _tree(z=1.0, n=1000, m=10, period=25):
  return accounting.AccountingSpec(noise_multiplier=z, sampling="shuffle",
                                   population=n, cohort_size=m,
                                   mechanism="tree", rounds_per_tree=period)


def _local(z=10.0, accountant="rdp"):
  return accounting.AccountingSpec(noise_multiplier=z, sampling="fixed",
                                   population=100, cohort_size=10,
                                   mechanism="local", accountant=accountant)


def _rdp_eps(event, relation):
  return rdp.RdpAccountant(neighboring_relation=relation).compose(
      event).get_epsilon(DELTA)


def _pld_eps(event, relation):
  return pld.PLDAccountant(relation, value_discretization_interval=1e-4
                           ).compose(event).get_epsilon(DELTA)


# --- epsilon equals dp_accounting on hand-built events -----------------------


def test_poisson_rdp_and_pld_equal_hand_built_events():
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(
          1.1)), 500)
  assert accounting.epsilon(_poisson(), 500, DELTA) == _rdp_eps(
      event, Rel.ADD_OR_REMOVE_ONE)
  assert accounting.epsilon(_poisson(accountant="pld"), 500, DELTA) == (
      _pld_eps(event, Rel.ADD_OR_REMOVE_ONE))
  # PLD is the tighter of the two for the same mechanism.
  assert (accounting.epsilon(_poisson(accountant="pld"), 500, DELTA)
          < accounting.epsilon(_poisson(), 500, DELTA))


def test_fixed_cohort_is_sampling_without_replacement_with_half_the_noise():
  # Replace-one moves a sum of C-clipped updates by 2C: dp_accounting's noise
  # multiplier (std / sensitivity) is z / 2.
  spec = _fixed(z=1.1, n=1000, m=10)
  half = dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(
          1000, 10, dp_accounting.GaussianDpEvent(0.55)), 300)
  full = dp_accounting.SelfComposedDpEvent(
      dp_accounting.SampledWithoutReplacementDpEvent(
          1000, 10, dp_accounting.GaussianDpEvent(1.1)), 300)
  eps = accounting.epsilon(spec, 300, DELTA)
  assert eps == _rdp_eps(half, Rel.REPLACE_ONE)
  assert eps > 1.5 * _rdp_eps(full, Rel.REPLACE_ONE)
  assert accounting.neighboring_relation(spec) is Rel.REPLACE_ONE
  # At equal q, z, T the replace-one fixed cohort costs more than Poisson.
  assert eps > accounting.epsilon(_poisson(z=1.1, q=0.01), 300, DELTA)


@pytest.mark.parametrize("rounds,trees", [
    (250, [(2, [25] * 4), (1, [25, 25])]),
    (260, [(2, [25] * 4), (1, [25, 25, 10])]),
    (30, [(1, [25, 5])]),
    (100, [(1, [25] * 4)]),
    (300, [(3, [25] * 4)]),
])
def test_tree_partial_epochs_match_hand_built_events(rounds, trees):
  # N=1000, M=10: 100 rounds per epoch, a tree every 25 rounds.
  events = [dp_accounting.SingleEpochTreeAggregationDpEvent(1.0, steps)
            if count == 1 else dp_accounting.SelfComposedDpEvent(
                dp_accounting.SingleEpochTreeAggregationDpEvent(1.0, steps),
                count) for count, steps in trees]
  expected = _rdp_eps(dp_accounting.ComposedDpEvent(events),
                      Rel.REPLACE_SPECIAL)
  assert accounting.epsilon(_tree(), rounds, DELTA) == pytest.approx(
      expected, rel=1e-12)
  # Closed form (Kairouz et al. 2021, App. D): per epoch, RDP = alpha * depth
  # / (2 z^2), depth = ceil(log2(largest tree + 1)), one tree per client.
  depth = sum(count * math.ceil(math.log2(max(steps) + 1))
              for count, steps in trees)
  acc = accounting.make_accountant(_tree())
  acc.compose(accounting.dp_event(_tree(), rounds))
  np.testing.assert_allclose(acc.rdp, acc.orders * depth / 2, rtol=1e-12)


def test_tree_restart_period_defaults_to_one_epoch():
  spec = _tree(period=0)
  one_tree = dp_accounting.SelfComposedDpEvent(
      dp_accounting.SingleEpochTreeAggregationDpEvent(1.0, [100]), 3)
  assert accounting.epsilon(spec, 300, DELTA) == pytest.approx(
      _rdp_eps(one_tree, Rel.REPLACE_SPECIAL), rel=1e-12)
  assert spec.rounds_per_epoch == 100


def test_local_dp_is_a_gaussian_with_sensitivity_two_clip_norms():
  z, rounds = 10.0, 40
  exact = dp_accounting.get_epsilon_gaussian(z / (2 * math.sqrt(rounds)),
                                             DELTA)
  rdp_eps = accounting.epsilon(_local(z), rounds, DELTA)
  pld_eps = accounting.epsilon(_local(z, "pld"), rounds, DELTA)
  assert rdp_eps == _rdp_eps(dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(z / 2), rounds), Rel.REPLACE_ONE)
  # dp_accounting's PLD shifts replace-one neighbors by 2 sensitivities
  # itself, so its event has z, not z / 2 (z / 2 would double count); the
  # module reports the closed form that the accountant approximates from above.
  pld_event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.GaussianDpEvent(z), rounds)
  assert accounting.dp_event(_local(z, "pld"), rounds) == pld_event
  accountant_eps = _pld_eps(pld_event, Rel.REPLACE_ONE)
  assert pld_eps == exact
  assert exact <= accountant_eps <= exact * (1 + 1e-6)
  assert exact < rdp_eps < 1.3 * exact


def test_epsilon_edge_cases():
  assert accounting.epsilon(_poisson(), 0, DELTA) == 0.0
  assert accounting.epsilon(_poisson(z=0.0), 1, DELTA) == math.inf
  assert accounting.epsilon(_tree(z=0.0), 5, DELTA) == math.inf
  assert isinstance(accounting.dp_event(_poisson(), 0),
                    dp_accounting.NoOpDpEvent)
  assert _poisson(q=0.02).expected_cohort_size == pytest.approx(200)
  assert _fixed(m=10).expected_cohort_size == 10


def test_relations():
  assert accounting.neighboring_relation(_poisson()) is Rel.ADD_OR_REMOVE_ONE
  assert accounting.neighboring_relation(_tree()) is Rel.REPLACE_SPECIAL
  assert accounting.neighboring_relation(_local()) is Rel.REPLACE_ONE
  assert isinstance(accounting.make_accountant(_poisson(accountant="pld")),
                    pld.PLDAccountant)


# --- refusals ----------------------------------------------------------------


@pytest.mark.parametrize("fields,words", [
    (dict(sampling="shuffle", cohort_size=10), ["shuffl", "poisson", "tree"]),
    (dict(sampling="fixed", cohort_size=10, accountant="pld"),
     ["PLD", "accountant=rdp", "sampling=poisson"]),
    (dict(mechanism="tree", sampling_rate=0.01), ["sampling=shuffle"]),
    (dict(mechanism="tree", sampling="fixed", cohort_size=10),
     ["sampling=shuffle", "once per epoch"]),
    (dict(mechanism="tree", sampling="shuffle", cohort_size=10,
          accountant="pld"), ["accountant=rdp"]),
    (dict(mechanism="tree", sampling="shuffle", cohort_size=10,
          rounds_per_tree=30), ["divide", "100 rounds", "twice"]),
    (dict(mechanism="dp-sgd", sampling_rate=0.01), ["gaussian, tree, local"]),
    (dict(sampling="uniform"), ["poisson, fixed, shuffle"]),
    (dict(accountant="gdp", sampling_rate=0.01), ["rdp, pld"]),
    (dict(noise_multiplier=-1.0, sampling_rate=0.01), ["noise_multiplier"]),
    (dict(population=0, sampling_rate=0.01), ["population"]),
    (dict(sampling_rate=0.0), ["0 < sampling_rate <= 1"]),
    (dict(sampling_rate=1.5), ["0 < sampling_rate <= 1"]),
    (dict(sampling="fixed", cohort_size=1001), ["cohort_size <= population"]),
    (dict(sampling="fixed"), ["cohort_size"]),
])
def test_refused_combinations_say_what_to_change(fields, words):
  base = dict(noise_multiplier=1.0, sampling="poisson", population=1000)
  spec = accounting.AccountingSpec(**{**base, **fields})
  for call in (spec.validate, lambda: accounting.epsilon(spec, 10, DELTA),
               lambda: accounting.dp_event(spec, 10),
               lambda: accounting.RoundAccountant(spec, DELTA)):
    with pytest.raises(accounting.PrivacyError) as info:
      call()
    for word in words:
      assert word in str(info.value)
  assert issubclass(accounting.PrivacyError, ValueError)


def test_bad_delta_rounds_and_targets_are_refused():
  for delta in (0.0, 1.0, -1e-5):
    with pytest.raises(accounting.PrivacyError, match="delta"):
      accounting.epsilon(_poisson(), 10, delta)
  with pytest.raises(accounting.PrivacyError, match="rounds"):
    accounting.epsilon(_poisson(), -1, DELTA)
  with pytest.raises(accounting.PrivacyError, match="target_epsilon"):
    accounting.calibrate_noise_multiplier(_poisson(), 10, 0.0, DELTA)
  assert accounting.calibrate_noise_multiplier(_poisson(), 0, 1.0, DELTA) == 0


# --- calibration -------------------------------------------------------------


@pytest.mark.parametrize("spec,rounds,target", [
    (_poisson(), 1000, 2.0),
    (_poisson(q=0.1, accountant="pld"), 10, 1.0),
    (_fixed(), 200, 4.0),
    (_tree(), 250, 8.0),
    (_local(), 20, 5.0),
])
def test_calibration_round_trips(spec, rounds, target):
  z = accounting.calibrate_noise_multiplier(spec, rounds, target, DELTA)
  def eps(zz):
    return accounting.epsilon(dataclasses.replace(spec, noise_multiplier=zz),
                              rounds, DELTA)
  assert target - 1e-3 <= eps(z) <= target
  assert eps(0.98 * z) > target


# --- RoundAccountant ---------------------------------------------------------


@pytest.mark.parametrize("spec,rel", [
    (_poisson(), 0.0), (_fixed(), 0.0), (_tree(), 0.0), (_local(), 0.0),
    (_poisson(z=1.0, q=0.05, accountant="pld"), 1e-9),
    (_local(z=20.0, accountant="pld"), 0.0),
])
def test_round_accountant_equals_epsilon_and_is_monotone(spec, rel):
  acc = accounting.RoundAccountant(spec, DELTA)
  values = [acc.epsilon(t) for t in range(0, 41)]  # In order, as the loop.
  for t in (1, 26, 40, 60):  # 26: a partial tree; 60: a jump ahead.
    assert acc.epsilon(t) == pytest.approx(accounting.epsilon(spec, t, DELTA),
                                           rel=rel, abs=0)
  assert values[0] == 0.0
  assert all(a <= b for a, b in zip(values, values[1:]))
  assert values[1] < values[-1]


def test_max_rounds_within():
  acc = accounting.RoundAccountant(_poisson(z=0.9, q=0.02), DELTA)
  values = [acc.epsilon(t) for t in range(0, 301)]
  target = (values[123] + values[124]) / 2
  assert acc.max_rounds_within(target, 300) == 123
  assert acc.max_rounds_within(target, 100) == 100
  assert acc.max_rounds_within(values[124], 300) == 124
  assert acc.max_rounds_within(values[1] / 2, 300) == 0
  tree = accounting.RoundAccountant(_tree(), DELTA)
  target = tree.epsilon(150)  # Flat between tree boundaries: ties go right.
  best = max(t for t in range(301) if tree.epsilon(t) <= target)
  assert tree.max_rounds_within(target, 300) == best >= 150


def test_round_accountant_rdp_is_cheap():
  acc = accounting.RoundAccountant(_poisson(z=1.0, q=0.01), DELTA)
  acc.epsilon(1)  # Builds the one-round RDP vector.
  start = time.perf_counter()
  for t in range(2, 1002):
    acc.epsilon(t)
  assert (time.perf_counter() - start) / 1000 < 5e-3


# --- published reference: TF Privacy's DP-SGD MNIST tutorial -----------------

# tensorflow/privacy tutorials/README.md, "Select Parameters": MNIST, N=60000,
# batch 256, delta=1e-5; (noise multiplier, epochs, published epsilon). The
# tutorial's compute_epsilon used steps = epochs * (60000 // 256), these
# orders, and the classic conversion eps = min_a rdp(a) + log(1/delta)/(a-1)
# (Mironov 2017, Prop. 3).
TUTORIAL_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(12, 64))
TF_PRIVACY_TABLE = [(1.12, 60, 2.92), (0.6, 30, 9.74), (1.2, 10, 1.20)]


@pytest.mark.parametrize("z,epochs,published", TF_PRIVACY_TABLE)
def test_tf_privacy_mnist_table(z, epochs, published):
  q, steps = 256 / 60000, epochs * (60000 // 256)
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)),
      steps)
  acc = rdp.RdpAccountant(TUTORIAL_ORDERS).compose(event)
  classic = min(r + math.log(1 / DELTA) / (a - 1)
                for a, r in zip(TUTORIAL_ORDERS, acc.rdp))
  assert classic == pytest.approx(published, abs=0.05)
  # dp_accounting's own conversion (rdp_privacy_accountant.compute_epsilon:
  # Canonne, Kamath, Steinke 2020, arXiv:2004.00010 Prop. 12; also Asoodeh et
  # al. 2020, arXiv:2001.05990) is tighter on the same RDP curve.
  spec = _poisson(z=z, q=q)
  current = accounting.epsilon(spec, steps, DELTA)
  assert current == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)
  assert current < classic - 0.2
  assert accounting.epsilon(
      _poisson(z=z, q=q, accountant="pld"), steps, DELTA) < current
