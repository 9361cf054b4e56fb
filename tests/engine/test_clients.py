"""The round's client side with aggregation chains: a chain's keys and
states, per-client aggregation state through the engine, and the refusal of
per-example weights under a DP sum."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import base, compression, fedavg
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.privacy import aggregators, clipping, tree

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(11)
NOISE_RNG = jax.random.key(12)


def _run(algorithm, params, cohort, strategy=Strategy(), client_states=None,
         state=None):
  """One round; client states default to the algorithm's initial ones."""
  if client_states is None:
    template = algorithm.client_state_init(params)
    client_states = jax.tree.map(
        lambda a: np.repeat(np.asarray(a)[None], len(cohort["client_mask"]),
                            axis=0), template)
  fn = round_lib.build_round(algorithm, strategy, donate=False)
  return fn(state or algorithm.server_init(params), cohort, client_states,
            RNG, NOISE_RNG)


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(name="setup")
def _setup(deterministic_model):
  params = deterministic_model.init(jax.random.key(0))
  cohort = build_cohort(make_clients(6, seed=2), [0, 1, 3, 4], batch_size=4,
                        pad_clients=2, extra_steps=1)
  factory = functools.partial(fedavg.fedavg, deterministic_model,
                              optax.sgd(0.1), weighting="uniform")
  return params, cohort, factory


def test_chain_of_one_link_is_the_link():
  link = aggregators.gaussian_sum(1.0, 1.0, 4.0)
  assert base.chain(link) is link


def test_chain_needs_a_link():
  with pytest.raises(ValueError, match="at least one"):
    base.chain()


@pytest.mark.parametrize("make_dp", [
    lambda: aggregators.gaussian_sum(0.05, 1.0, 4.0),
    lambda: aggregators.adaptive_clipping(0.05, 1.0, 4.0),
    lambda: tree.tree_aggregator(0.05, 1.0, 4.0, 3),
    lambda: aggregators.local_gaussian(0.05, 1.0),
])
def test_exact_links_before_a_dp_link_change_nothing(setup, make_dp):
  """chain(clip(inf-like), compress(identity), dp) is bit-equal to dp alone:
  the last link gets the round's keys unchanged, exact links are identities."""
  params, cohort, factory = setup
  dp = make_dp()
  ref_state, _, ref_metrics = _run(factory(aggregator=dp), params, cohort)
  chained = base.pair_client_states(factory(aggregator=base.chain(
      clipping.clip(1e30), compression.compress(compression.identity()), dp)))
  state, new_states, metrics = _run(chained, params, cohort)
  _assert_trees_equal(state.params, ref_state.params)
  _assert_trees_equal(state.aggregator_state[-1], ref_state.aggregator_state)
  for name, value in ref_metrics.items():
    np.testing.assert_array_equal(np.asarray(metrics[name]),
                                  np.asarray(value), err_msg=name)
  assert isinstance(new_states, base.ClientStates)


def test_noiseless_unclipped_chain_is_weighted_mean_fedavg(setup):
  """Zero noise, infinite clip, denominator = the real cohort: FedAvg with
  uniform weights."""
  params, cohort, factory = setup
  real_clients = float(np.sum(cohort["client_mask"]))
  ref_state, _, _ = _run(factory(), params, cohort)
  dp_state, _, _ = _run(factory(aggregator=base.chain(
      aggregators.gaussian_sum(math.inf, 0.0, real_clients))), params, cohort)
  for a, b in zip(jax.tree.leaves(dp_state.params),
                  jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6,
                               atol=1e-7)


def test_chain_states_and_metrics_per_link(setup):
  params, cohort, factory = setup
  chained = base.pair_client_states(factory(aggregator=base.chain(
      compression.compress(compression.top_k(k=5)),
      aggregators.adaptive_clipping(0.05, 1.0, 4.0))))
  state, new_states, metrics = _run(chained, params, cohort)
  compress_state, adaptive_state = state.aggregator_state
  assert compress_state == ()
  assert float(adaptive_state) != 0.05  # the clip norm moved
  residuals, dp_client_state = new_states.aggregation
  assert dp_client_state == ()
  assert jax.tree.structure(residuals[0]) == jax.tree.structure(
      jax.tree.map(lambda p: p[None], params))
  for name in ("bits_uploaded", "compression_error_norm", "clip_norm",
               "unclipped_fraction_noisy", "update_norm"):
    assert name in metrics
  assert round_lib.build_round(chained, Strategy()) is not None


@pytest.mark.parametrize("strategy", [Strategy("vmap", "scan"),
                                      Strategy("map", "unroll"),
                                      Strategy("vmap", "host")])
def test_padding_clients_leave_aggregation_state_untouched(setup, strategy):
  """Per-client error feedback through every strategy: the real clients'
  residuals change, a padding slot's output is never scattered back."""
  params, cohort, factory = setup
  chained = base.pair_client_states(factory(aggregator=base.chain(
      compression.compress(compression.top_k(k=3)), base.weighted_mean())))
  population = 6
  store = round_lib.stack_client_states(chained.client_state_init(params),
                                        population)
  marker = jax.tree.map(lambda a: np.full_like(a, 7.0), store)
  gathered = round_lib.gather_client_states(marker, cohort["client_indices"])
  _, new_states, _ = _run(chained, params, cohort, strategy, gathered)
  updated = round_lib.scatter_client_states(marker, cohort["client_indices"],
                                            new_states)
  real = [0, 1, 3, 4]
  for k in range(population):
    rows = [np.asarray(a[k]) for a in jax.tree.leaves(updated)]
    if k in real:
      assert any(np.any(r != 7.0) for r in rows)
    else:
      assert all(np.all(r == 7.0) for r in rows)


def test_pairing_twice_changes_nothing(setup):
  params, _, factory = setup
  paired = base.pair_client_states(factory(aggregator=base.chain(
      compression.compress(compression.top_k(k=3)), base.weighted_mean())))
  assert base.pair_client_states(paired) is paired
  state = paired.client_state_init(params)
  assert isinstance(state, base.ClientStates) and state.algorithm == ()


def test_stateful_chain_needs_paired_client_states(setup):
  params, cohort, factory = setup
  unpaired = factory(aggregator=base.chain(
      compression.compress(compression.top_k(k=3)), base.weighted_mean()))
  states = {"w": np.zeros([len(cohort["client_mask"])], np.float32)}
  with pytest.raises(TypeError, match="pair_client_states"):
    _run(unpaired, params, cohort, client_states=states)


@pytest.mark.parametrize("make_aggregator", [
    lambda: aggregators.gaussian_sum(1.0, 1.0, 4.0),
    lambda: tree.tree_aggregator(1.0, 1.0, 4.0, 2),
    lambda: base.chain(compression.compress(compression.identity()),
                       aggregators.local_gaussian(1.0, 1.0)),
])
def test_dp_sum_refuses_per_example_weights(setup, make_aggregator,
                                            deterministic_model):
  """The direct API: weighting='num_examples' under a DP sum is an error
  with the refusal table's reason, never silently ignored."""
  params, cohort, _ = setup
  algorithm = base.pair_client_states(fedavg.fedavg(
      deterministic_model, optax.sgd(0.1), weighting="num_examples",
      aggregator=make_aggregator()))
  with pytest.raises(ValueError, match="weighting='num_examples'.*weight 1"):
    _run(algorithm, params, cohort)


def test_uniform_weights_pass_and_plain_mean_keeps_example_weights(
    setup, deterministic_model):
  params, cohort, factory = setup
  _run(factory(aggregator=aggregators.gaussian_sum(1.0, 1.0, 4.0)), params,
       cohort)
  _run(fedavg.fedavg(deterministic_model, optax.sgd(0.1),
                     weighting="num_examples"), params, cohort)
  assert aggregators.gaussian_sum(1.0, 1.0, 4.0).uniform_weights_only
  assert not base.weighted_mean().uniform_weights_only
  assert base.chain(compression.compress(compression.identity()),
                    aggregators.gaussian_sum(1.0, 1.0, 4.0)
                    ).uniform_weights_only


def test_as_transform_passes_the_noise_key():
  seen = []

  def client_transform(delta, weight, state, rng):
    seen.append(rng)
    return delta, weight, {}

  link = base.as_transform(base.Aggregator(
      init=lambda: (), client_transform=client_transform,
      finalize=lambda *a: a[:1] + a[3:4] + ({},)))
  keys = base.ClientKeys(noise=jax.random.key(1), public=jax.random.key(2))
  _, _, client_state, _ = link.client_transform(jnp.ones(2), 1.0, (), (),
                                                keys)
  assert seen == [keys.noise] and client_state == ()
  assert base.as_transform(link) is link
  with pytest.raises(TypeError):
    base.as_transform(object())
