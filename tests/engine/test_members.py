"""Sweep members as one vmapped program equal the members run one by one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg
from fedjax_lab.engine import members
from fedjax_lab.engine.round import build_round
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.privacy import aggregators

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(7)
NOISE_RNG = jax.random.key(11)
NUM_STEPS = 3  # make_clients' largest client (12 examples) at batch size 4


def _hparams(**values):
  """Per-member hyperparameters as ``[K]`` float32 arrays."""
  return {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}


def _member_hparams(hparams, k):
  """Member ``k``'s hyperparameters as Python floats (a one-by-one run)."""
  return {name: float(v[k]) for name, v in hparams.items()}


def _cohort(indices, pad_clients=0):
  clients = make_clients(8, seed=3)
  return build_cohort(clients, indices, batch_size=4, num_steps=NUM_STEPS,
                      pad_clients=pad_clients)


def _keys(base_key, size):
  return jax.random.split(base_key, size)


def _one_by_one(make_algorithm, hparams, params, cohorts, rngs,
                noise_rngs=None, strategy=Strategy(), rounds=2):
  """Every member through its own ``build_round``; stacked results."""
  states, metrics = [], []
  for k in range(members.num_members(hparams)):
    algorithm = make_algorithm(_member_hparams(hparams, k))
    round_fn = build_round(algorithm, strategy, donate=False)
    state = algorithm.server_init(params)
    cohort = cohorts[k]
    client_states = jnp.zeros(cohort["client_mask"].shape)
    noise_rng = None if noise_rngs is None else noise_rngs[k]
    for _ in range(rounds):
      # FedAvg keeps no client state (it returns ()); the store would keep
      # the zeros, so every round gets them.
      state, _, round_metrics = round_fn(state, cohort, client_states,
                                         rngs[k], noise_rng)
    states.append(state)
    metrics.append(round_metrics)
  return members.stack_members(states), members.stack_members(metrics)


def _together(make_algorithm, hparams, params, cohort, rngs, noise_rngs=None,
              strategy=Strategy(), shared_cohort=True, rounds=2):
  """All members in one member round; returns (states, metrics, fn)."""
  fn = members.build_member_round(make_algorithm, strategy,
                                  shared_cohort=shared_cohort)
  size = members.num_members(hparams)
  states = members.init_member_states(make_algorithm, hparams, params)
  num_clients = np.shape(cohort["client_mask"])[-1]
  client_states = jnp.zeros([size, num_clients])
  for _ in range(rounds):
    states, _, metrics = fn(hparams, states, cohort, client_states, rngs,
                            noise_rngs)
  return states, metrics, fn


def _assert_close(actual, expected, rtol=1e-6):
  """Each member's slice of each leaf within ``rtol`` of the leaf's scale:
  ``max|a - b| <= rtol * max|b|`` (norm-wise, per member: Adam divides by
  sqrt(v), so a coordinate with a near-zero gradient can move an element
  by more than ``rtol`` of itself while the leaf stays within it)."""
  actual_leaves = jax.tree.leaves(actual)
  expected_leaves = jax.tree.leaves(expected)
  assert len(actual_leaves) == len(expected_leaves)
  for a, b in zip(actual_leaves, expected_leaves):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    for k in range(a.shape[0]):
      scale = max(np.max(np.abs(b[k]), initial=0.0), 1e-30)
      error = np.max(np.abs(a[k] - b[k]), initial=0.0)
      assert error <= rtol * scale, (
          f"member {k}: max abs error {error} > {rtol} * {scale}")


def _assert_members_match(together_states, together_metrics, states,
                          metrics):
  _assert_close(together_states.params, states.params)
  _assert_close(together_states.opt_state, states.opt_state)
  assert sorted(together_metrics) == sorted(metrics)
  _assert_close(together_metrics, metrics)


def _fedavg_factory(model):
  return lambda h: fedavg.fedavg(model, optax.sgd(h["client_lr"]))


@pytest.mark.parametrize("strategy", [
    Strategy("vmap", "scan"),
    pytest.param(Strategy("chunked", "unroll", chunk_size=2),
                 marks=pytest.mark.slow)],
    ids=lambda s: s.label)
def test_fedavg_client_learning_rates(tiny_model, strategy):
  make_algorithm = _fedavg_factory(tiny_model)
  hparams = _hparams(client_lr=[0.01, 0.1, 0.3])
  params = tiny_model.init(jax.random.key(0))
  cohort = _cohort([0, 2, 3, 5], pad_clients=1)
  rngs = _keys(RNG, 3)
  states, metrics, fn = _together(make_algorithm, hparams, params, cohort,
                                  rngs, strategy=strategy)
  ref_states, ref_metrics = _one_by_one(make_algorithm, hparams, params,
                                        [cohort] * 3, rngs, strategy=strategy)
  _assert_members_match(states, metrics, ref_states, ref_metrics)
  assert fn.trace_count() == 1
  assert fn.metric_origins()["train_loss"] == "client"
  # The members really differ.
  assert len(set(np.asarray(metrics["train_loss"]).tolist())) == 3


def test_fedadam_server_hyperparameters(deterministic_model):
  def make_algorithm(h):
    return fedavg.fedopt(deterministic_model, optax.sgd(0.05),
                         optax.adam(h["server_lr"], b1=h["b1"]))

  hparams = _hparams(server_lr=[1e-3, 1e-2, 1e-1], b1=[0.9, 0.5, 0.0])
  params = deterministic_model.init(jax.random.key(1))
  cohort = _cohort([1, 4, 6])
  rngs = _keys(RNG, 3)
  states, metrics, _ = _together(make_algorithm, hparams, params, cohort,
                                 rngs, rounds=3)
  ref_states, ref_metrics = _one_by_one(make_algorithm, hparams, params,
                                        [cohort] * 3, rngs, rounds=3)
  _assert_members_match(states, metrics, ref_states, ref_metrics)


def _dp_factory(model, clip_norm=None, noise_multiplier=None):
  """DP-FedAvg (gaussian_sum, as privacy.mechanisms builds it for a
  ``gaussian`` plan); DP numbers from hparams unless given as floats."""
  def make_algorithm(h):
    aggregator = aggregators.gaussian_sum(
        h["clip_norm"] if clip_norm is None else clip_norm,
        h["noise_multiplier"] if noise_multiplier is None else
        noise_multiplier, expected_cohort_size=4.0)
    return fedavg.fedavg(model, optax.sgd(h["client_lr"]),
                         weighting="uniform", aggregator=aggregator)
  return make_algorithm


def _dp_members_match_one_by_one(model, hparams, **fixed):
  """DP-FedAvg members (``fixed`` DP numbers as Python floats, the rest in
  ``hparams``) with their own noise keys on one cohort equal the members run
  one by one; returns the members' server states."""
  make_algorithm = _dp_factory(model, **fixed)
  params = model.init(jax.random.key(0))
  cohort = _cohort([0, 1, 2, 3])
  rngs, noise_rngs = _keys(RNG, 3), _keys(NOISE_RNG, 3)
  states, metrics, _ = _together(make_algorithm, hparams, params, cohort,
                                 rngs, noise_rngs)
  ref_states, ref_metrics = _one_by_one(make_algorithm, hparams, params,
                                        [cohort] * 3, rngs, noise_rngs)
  _assert_members_match(states, metrics, ref_states, ref_metrics)
  return states


def test_dp_fedavg_members_with_their_own_noise_keys(tiny_model):
  """DP numbers fixed (Python floats), learning rates and noise keys per
  member: the DP link runs inside the member vmap."""
  states = _dp_members_match_one_by_one(
      tiny_model, _hparams(client_lr=[0.05, 0.05, 0.2]), clip_norm=0.5,
      noise_multiplier=0.7)
  # Same learning rate, different noise keys: different models.
  first, second = (members.member(states.params, k) for k in (0, 1))
  assert not all(np.allclose(a, b) for a, b in
                 zip(jax.tree.leaves(first), jax.tree.leaves(second)))


def test_dp_fedavg_noise_multipliers_and_clip_norms(tiny_model):
  _dp_members_match_one_by_one(
      tiny_model, _hparams(client_lr=[0.1, 0.1, 0.1],
                           clip_norm=[0.05, 0.5, 5.0],
                           noise_multiplier=[0.3, 1.0, 2.0]))


def test_members_with_their_own_cohorts(tiny_model):
  make_algorithm = _fedavg_factory(tiny_model)
  hparams = _hparams(client_lr=[0.1, 0.1, 0.2])
  params = tiny_model.init(jax.random.key(0))
  # Same padded shape [4 clients, 3 steps, 4 examples], different clients.
  cohorts = [_cohort([0, 2, 5], pad_clients=1), _cohort([1, 3, 4, 7]),
             _cohort([6, 0], pad_clients=2)]
  rngs = _keys(RNG, 3)
  states, metrics, fn = _together(
      make_algorithm, hparams, params, members.stack_members(cohorts), rngs,
      shared_cohort=False)
  ref_states, ref_metrics = _one_by_one(make_algorithm, hparams, params,
                                        cohorts, rngs)
  _assert_members_match(states, metrics, ref_states, ref_metrics)
  np.testing.assert_array_equal(metrics["num_clients"], [3.0, 4.0, 2.0])
  assert fn.trace_count() == 1


def test_a_diverging_member_leaves_the_others_alone(tiny_model):
  make_algorithm = _fedavg_factory(tiny_model)
  hparams = _hparams(client_lr=[0.1, 1e30, 0.2])
  params = tiny_model.init(jax.random.key(0))
  cohort = _cohort([0, 2, 3, 5])
  rngs = _keys(RNG, 3)
  states, metrics, _ = _together(make_algorithm, hparams, params, cohort,
                                 rngs, rounds=3)
  assert not all(np.all(np.isfinite(leaf[1]))
                 for leaf in jax.tree.leaves(states.params))
  np.testing.assert_array_equal(metrics["params_finite"], [1.0, 0.0, 1.0])
  healthy = [0, 2]
  healthy_hparams = jax.tree.map(lambda v: v[jnp.asarray(healthy)], hparams)
  ref_states, ref_metrics = _one_by_one(
      make_algorithm, healthy_hparams, params, [cohort] * 2, rngs[jnp.asarray(healthy)],
      rounds=3)
  pick = lambda tree: jax.tree.map(lambda v: v[jnp.asarray(healthy)], tree)
  _assert_members_match(pick(states), pick(metrics), ref_states, ref_metrics)


def test_compiles_once_for_k_members(deterministic_model):
  make_algorithm = _fedavg_factory(deterministic_model)
  fn = members.build_member_round(make_algorithm, Strategy())
  params = deterministic_model.init(jax.random.key(0))
  cohort = _cohort([0, 1, 2])
  for values in ([0.1, 0.2, 0.3, 0.4], [1e-3, 1e-2, 1e-1, 1.0]):
    hparams = _hparams(client_lr=values)
    states = members.init_member_states(make_algorithm, hparams, params)
    client_states = jnp.zeros([4, 3])
    for _ in range(3):
      states, _, _ = fn(hparams, states, cohort, client_states,
                        _keys(RNG, 4))
  assert fn.trace_count() == 1
  assert int(states.round[0]) == 3


def test_host_step_loop_is_refused(deterministic_model):
  with pytest.raises(ValueError, match="step_loop='host'"):
    members.build_member_round(_fedavg_factory(deterministic_model),
                               Strategy("vmap", "host"))


def test_member_axes_must_agree(deterministic_model):
  make_algorithm = _fedavg_factory(deterministic_model)
  fn = members.build_member_round(make_algorithm, Strategy())
  params = deterministic_model.init(jax.random.key(0))
  hparams = _hparams(client_lr=[0.1, 0.2, 0.3])
  states = members.init_member_states(make_algorithm, hparams, params)
  cohort = _cohort([0, 1])
  with pytest.raises(ValueError, match="leading member axis of 3"):
    fn(hparams, states, cohort, jnp.zeros([3, 2]), _keys(RNG, 2))
  with pytest.raises(ValueError, match="leading axes"):
    members.num_members({"a": jnp.zeros([3]), "b": jnp.zeros([2])})
