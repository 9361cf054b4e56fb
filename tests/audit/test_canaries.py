"""Canary directions, canary clients in the round and in experiments."""

import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import base, fedavg
from fedjax_lab.audit import canaries as canaries_lib
from fedjax_lab.audit import one_shot
from fedjax_lab.engine.round import build_round
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.models import base as model_base
from fedjax_lab.privacy import clipping
from fedjax_lab.training import setup

from tests.engine.conftest import TinySoftmax, build_cohort, make_clients

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RNG = jax.random.key(3)


def noisy_sum(clip_norm, noise_multiplier, expected_cohort_size):
  """Clip each client to ``clip_norm`` (weight 1), then add N(0, (zC)^2) to the
  sum and divide by the expected cohort size: DP-FedAvg's aggregator."""

  def client_transform(delta, weight, state, rng):
    del state, rng
    clipped, _ = clipping.clip_to_norm(delta, clip_norm)
    return clipped, jnp.ones_like(weight), {}

  def finalize(weighted_sum, total_weight, num_clients, state, rng):
    del total_weight, num_clients
    leaves, treedef = jax.tree.flatten(weighted_sum)
    keys = jax.random.split(rng, len(leaves))
    noised = [(s + noise_multiplier * clip_norm *
               jax.random.normal(k, s.shape, s.dtype)) / expected_cohort_size
              for s, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noised), state, {}

  return base.Aggregator(init=lambda: (), client_transform=client_transform,
                         finalize=finalize)


# ---------------------------------------------------------------- canaries


def test_canary_directions_unit_norm_deterministic_distinct():
  like = {"w": jnp.zeros([7, 5]), "b": jnp.zeros([5]),
          "inner": {"k": jnp.zeros([3, 2, 2])}}
  d = clipping.num_parameters(like)
  assert d == 52
  vectors = []
  traced_direction = jax.jit(
      lambda i: canaries_lib.canary_direction(like, i, 11))
  for i in range(4):
    u = canaries_lib.canary_direction(like, i, seed=11)
    assert jax.tree.structure(u) == jax.tree.structure(like)
    flat = np.concatenate([np.ravel(x) for x in jax.tree.leaves(u)])
    assert np.linalg.norm(flat) == pytest.approx(1.0, abs=1e-6)
    again = canaries_lib.canary_direction(like, i, seed=11)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(again)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A traced index (as inside the round) gives the same direction (up to
    # the compiler's rounding of the normalisation).
    traced = traced_direction(jnp.int32(i))
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(traced)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                                 atol=1e-7)
    vectors.append(flat)
  vectors = np.stack(vectors)
  gram = vectors @ vectors.T
  assert np.max(np.abs(gram - np.diag(np.diag(gram)))) < 0.6
  other_seed = canaries_lib.canary_direction(like, 0, seed=12)
  assert not np.allclose(
      np.asarray(other_seed["w"]),
      np.asarray(canaries_lib.canary_direction(like, 0, 11)["w"]))


def test_canary_cosines_of_a_known_delta():
  like = {"w": jnp.zeros([40, 30]), "b": jnp.zeros([30])}
  u3 = canaries_lib.canary_direction(like, 3, seed=5)
  delta = jax.tree.map(lambda u: 2.5 * u, u3)
  cos = canaries_lib.canary_cosines(delta, np.arange(70), seed=5)  # > one chunk
  assert cos.shape == (70,)
  assert cos[3] == pytest.approx(1.0, abs=1e-5)
  others = np.delete(cos, 3)
  assert np.std(others) == pytest.approx(1 / math.sqrt(1230), rel=0.3)


@pytest.fixture
def deterministic_model():
  return model_base.from_flax(TinySoftmax(), jnp.zeros([2, 8]))


@pytest.fixture
def uniform_fedavg(deterministic_model):
  return fedavg.fedopt(deterministic_model, optax.sgd(0.1), optax.sgd(1.0),
                       weighting="uniform")


def _client_outputs(algorithm, params, cohort, client_states):
  """Every client's ``ClientUpdate`` of one round, run like the engine does."""
  round_rng = jax.random.fold_in(RNG, 0)

  def one(state, features, mask, num_examples, index):
    carry = algorithm.client_init(params, state,
                                  jax.random.fold_in(round_rng, index))
    for s in range(mask.shape[0]):
      batch = jax.tree.map(lambda a: a[s], features)
      new = algorithm.client_step(carry, batch, mask[s])
      carry = jax.tree.map(lambda n, o: jnp.where(jnp.any(mask[s] > 0), n, o),
                           new, carry)
    return algorithm.client_final(params, carry, num_examples)

  return jax.jit(jax.vmap(one))(
      client_states, cohort["features"], cohort["example_mask"],
      cohort["num_examples"], cohort["client_indices"])


def test_wrapped_algorithm_canaries_send_c_times_u(deterministic_model,
                                                   uniform_fedavg):
  params = deterministic_model.init(jax.random.key(0))
  clients = make_clients(6, seed=1)
  indices = [0, 1, 2, 3, 4, 5]
  cohort = build_cohort(clients, indices, batch_size=4)
  clip, seed = 0.7, 9
  wrapped = canaries_lib.with_canaries(uniform_fedavg, clip, seed)
  ids = jnp.asarray([-1, 0, -1, 2, -1, -1], jnp.int32)
  plain = _client_outputs(uniform_fedavg, params, cohort, jnp.zeros([6]))
  canaried = _client_outputs(wrapped, params, cohort, (jnp.zeros([6]), ids))
  for slot, canary_id in enumerate(np.asarray(ids)):
    got = jax.tree.map(lambda a: np.asarray(a[slot]), canaried.delta)
    if canary_id < 0:  # Real clients: bit-identical to the plain algorithm.
      want = jax.tree.map(lambda a: np.asarray(a[slot]), plain.delta)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(a, b)
    else:
      u = canaries_lib.canary_direction(params, int(canary_id), seed)
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(u)):
        np.testing.assert_allclose(a, clip * np.asarray(b), rtol=1e-6,
                                   atol=1e-7)
      assert float(clipping.global_norm(got)) == pytest.approx(clip, rel=1e-5)
  np.testing.assert_array_equal(np.asarray(canaried.client_state[1]),
                                np.asarray(ids))
  np.testing.assert_array_equal(np.asarray(canaried.weight),
                                np.asarray(plain.weight))
  # Canaries do not count in the training loss.
  value, weight = canaried.metrics["train_loss"]
  assert np.all(np.asarray(weight)[np.asarray(ids) >= 0] == 0)
  np.testing.assert_array_equal(np.asarray(value)[np.asarray(ids) < 0],
                                np.asarray(plain.metrics["train_loss"][0])[
                                    np.asarray(ids) < 0])


def test_round_with_canaries(deterministic_model, uniform_fedavg):
  strategy = Strategy("vmap", "scan")
  params = deterministic_model.init(jax.random.key(0))
  clients = make_clients(8, seed=2)
  clip, seed = 0.5, 4
  wrapped = canaries_lib.with_canaries(uniform_fedavg, clip, seed)

  def run(algorithm, cohort, states):
    fn = build_round(algorithm, strategy, donate=False)
    state, new_states, metrics = fn(algorithm.server_init(params), cohort,
                                    states, RNG)
    return state, new_states, metrics

  # A cohort of real clients only: the same round, bit for bit.
  real = build_cohort(clients, [0, 3, 5], batch_size=4, pad_clients=1)
  plain_state, _, plain_metrics = run(uniform_fedavg, real, jnp.zeros([4]))
  wrapped_state, _, wrapped_metrics = run(
      wrapped, real, (jnp.zeros([4]), -jnp.ones([4], jnp.int32)))
  for a, b in zip(jax.tree.leaves(plain_state.params),
                  jax.tree.leaves(wrapped_state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(wrapped_metrics["train_loss"]) == float(
      plain_metrics["train_loss"])

  # Clients 6 and 7 are canaries 0 and 1: uniform mean of 2 real deltas and
  # C * u_0, C * u_1 (server SGD with lr 1 adds the mean).
  mixed = build_cohort(clients, [1, 6, 2, 7], batch_size=4)
  ids = jnp.asarray([-1, 0, -1, 1], jnp.int32)
  state, new_states, metrics = run(wrapped, mixed, (jnp.zeros([4]), ids))
  np.testing.assert_array_equal(np.asarray(new_states[1]), np.asarray(ids))
  assert float(metrics["canary_fraction"]) == pytest.approx(0.5)
  only_real = build_cohort(clients, [1, 2], batch_size=4)
  real_state, _, real_metrics = run(uniform_fedavg, only_real, jnp.zeros([2]))
  assert float(metrics["train_loss"]) == pytest.approx(
      float(real_metrics["train_loss"]), rel=1e-6)
  u0 = canaries_lib.canary_direction(params, 0, seed)
  u1 = canaries_lib.canary_direction(params, 1, seed)
  expected = jax.tree.map(
      lambda p, r, a, b: p + (2 * (r - p) + clip * a + clip * b) / 4, params,
      real_state.params, u0, u1)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=1e-6)


def test_canary_passes_clipping_unchanged(deterministic_model):
  params = deterministic_model.init(jax.random.key(0))
  clip = 0.3
  algorithm = fedavg.fedavg(deterministic_model, optax.sgd(0.1),
                            aggregator=noisy_sum(clip, 0.0, 1.0))
  wrapped = canaries_lib.with_canaries(algorithm, clip, seed=2)
  clients = make_clients(3, seed=4)
  cohort = build_cohort(clients, [2], batch_size=4)
  fn = build_round(wrapped, Strategy(), donate=False)
  state, _, _ = fn(wrapped.server_init(params), cohort,
                   (jnp.zeros([1]), jnp.asarray([5], jnp.int32)), RNG)
  u = canaries_lib.canary_direction(params, 5, seed=2)
  for new, old, direction in zip(jax.tree.leaves(state.params),
                                 jax.tree.leaves(params), jax.tree.leaves(u)):
    np.testing.assert_allclose(np.asarray(new) - np.asarray(old),
                               clip * np.asarray(direction), rtol=1e-5,
                               atol=1e-7)


# ---------------------------------------------------------- experiments


def small_config(num_rounds=8, num_clients=20, cohort_size=10):
  sys.path.insert(0, ROOT)
  from configs import synthetic_logreg_fedavg  # pylint: disable=g-import-not-at-top
  config = synthetic_logreg_fedavg.get_config("")
  config.num_rounds = num_rounds
  config.cohort_size = cohort_size
  config.eval_every = 0
  config.eval_max_examples = 64
  config.data.num_clients = num_clients
  config.client.update({"num_epochs": 1, "max_steps": 2, "batch_size": 10,
                        "learning_rate": 0.01})
  return config



def test_add_canaries_appends_and_keeps_real_clients():
  experiment = setup.build_experiment(small_config())
  train = experiment.dataset.train
  audited, canaries = canaries_lib.add_canaries(experiment, num_canaries=7,
                                                num_held_out=11, seed=3,
                                                clip_norm=0.5)
  new = audited.dataset.train
  n = train.num_clients
  assert new.num_clients == n + 7
  assert canaries.num_real_clients == n
  np.testing.assert_array_equal(canaries.canary_rows, np.arange(n, n + 7))
  np.testing.assert_array_equal(canaries.held_out_ids, np.arange(7, 18))
  np.testing.assert_array_equal(new.client_ids[:n], train.client_ids)
  np.testing.assert_array_equal(new.offsets[:n + 1], train.offsets)
  for i in range(n):
    for name, column in train.client(i).items():
      np.testing.assert_array_equal(new.client(i)[name], column)
  source = train.client(canaries.source_client)
  for row in canaries.canary_rows:
    for name, column in source.items():
      np.testing.assert_array_equal(new.client(int(row))[name], column)
  # The original experiment is untouched.
  assert experiment.dataset.train.num_clients == n
  assert experiment.sampler.num_clients == n
  # Same kind of sampler over the new population.
  assert audited.sampler.kind == experiment.sampler.kind
  assert audited.sampler.num_clients == n + 7
  assert audited.sampler.cohort_size == experiment.sampler.cohort_size
  assert audited.algorithm.name.endswith("+canaries")
  params = audited.model.init(jax.random.key(0))
  inner, ids = audited.client_states_init(params, n + 7)
  np.testing.assert_array_equal(ids, np.r_[-np.ones(n), np.arange(7)])
  assert ids.dtype == np.int32
  # The clip norm defaults to the config's privacy.clip_norm ...
  config = small_config()
  config.privacy.clip_norm = 0.25
  _, from_config = canaries_lib.add_canaries(setup.build_experiment(config),
                                             3, 0, seed=0)
  assert from_config.clip_norm == 0.25
  # ... and must be given when there is none.
  del config.privacy
  with pytest.raises(ValueError, match="clip_norm"):
    canaries_lib.add_canaries(setup.build_experiment(config), 3, 0, seed=0)


def test_add_canaries_poisson_sampler():
  config = small_config()
  config.sampling = "poisson"
  config.sampling_rate = 0.3
  experiment = setup.build_experiment(config)
  audited, _ = canaries_lib.add_canaries(experiment, 5, 0, seed=0,
                                         clip_norm=1.0)
  assert audited.sampler.kind == "poisson"
  assert audited.sampler.sampling_rate == 0.3
  assert audited.sampler.num_clients == experiment.sampler.num_clients + 5


def test_clip_norm_and_delta_come_from_the_privacy_plan():
  config = small_config()
  config.weighting = "uniform"
  config.privacy.update({"mechanism": "gaussian", "clip_norm": 0.3,
                         "noise_multiplier": 1.0, "delta": 0.0})
  experiment = setup.build_experiment(config)
  assert experiment.privacy is not None
  assert canaries_lib.resolve_clip_norm(experiment) == pytest.approx(0.3)
  assert canaries_lib.resolve_clip_norm(experiment, 2.0) == 2.0
  assert canaries_lib.resolve_delta(experiment) == pytest.approx(
      experiment.privacy.delta)
  assert canaries_lib.resolve_delta(experiment) == pytest.approx(1 / 20**1.1)
  assert canaries_lib.resolve_delta(experiment, 1e-7) == 1e-7
  _, canaries = canaries_lib.add_canaries(experiment, 4, 4, seed=0)
  assert canaries.clip_norm == pytest.approx(0.3)



def test_canaries_run_with_an_error_feedback_compression_chain(tmp_path):
  # Error feedback keeps per-client state in the aggregation chain
  # (base.ClientStates pairs); the canary ids must join the algorithm half.
  config = small_config(num_rounds=2)
  config.weighting = "uniform"
  config.metrics_sinks = ""
  config.privacy.update({"mechanism": "gaussian", "clip_norm": 0.5,
                         "noise_multiplier": 1.0, "noise_seed": 0})
  config.compression.update({"method": "top_k", "fraction": 0.2,
                             "error_feedback": True})
  experiment = setup.build_experiment(config)
  report = one_shot.run_audit(experiment, str(tmp_path), num_canaries=4,
                              num_held_out=4, seed=0)
  assert report["algorithm"].endswith("topk0.2-ef+canaries")
  audited, _ = canaries_lib.add_canaries(experiment, 4, 4, seed=0)
  states = audited.client_states_init(
      audited.model.init(jax.random.key(0)), 24)
  assert isinstance(states, base.ClientStates)
  _, ids = states.algorithm
  np.testing.assert_array_equal(ids, np.r_[-np.ones(20), np.arange(4)])
