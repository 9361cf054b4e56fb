"""Agnostic FedAvg (Mohri et al. 2019, as in FedJAX) through the engine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import agnostic, fedavg
from fedjax_lab.data.federated import ClientStore, FederatedDataset
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.privacy import aggregators

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(5)


@functools.lru_cache(maxsize=None)
def _round_fn(algorithm, strategy=Strategy()):
  return round_lib.build_round(algorithm, strategy, donate=False)


def _round(algorithm, state, cohort, states, strategy=Strategy()):
  fn = _round_fn(algorithm, strategy)
  gathered = round_lib.gather_client_states(states, cohort["client_indices"])
  return fn(state, cohort, gathered, RNG)


def _fedavg_round(algorithm, params, cohort):
  fn = _round_fn(algorithm)
  num = cohort["client_mask"].shape[0]
  return fn(algorithm.server_init(params), cohort, jnp.zeros([num]), RNG)


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _hand_mean_losses(params, clients):
  """Each client's mean softmax cross-entropy under a linear model (float64)."""
  w = np.asarray(params["Dense_0"]["kernel"], np.float64)
  b = np.asarray(params["Dense_0"]["bias"], np.float64)
  out = []
  for x, y in clients:
    logits = x.astype(np.float64) @ w + b
    shifted = logits - logits.max(1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    out.append(-log_probs[np.arange(len(y)), y].mean())
  return np.asarray(out)


def test_invalid_arguments(deterministic_model):
  make = lambda **kw: agnostic.agnostic_fedavg(
      deterministic_model, optax.sgd(0.1), optax.sgd(1.0),
      **{"num_domains": 2, "domain_learning_rate": 0.1, **kw})
  with pytest.raises(ValueError, match="sum to 1"):
    make(init_domain_weights=[0.5, 0.6])
  with pytest.raises(ValueError, match="num_domains=2 entries"):
    make(init_domain_window=[1.0])
  with pytest.raises(ValueError, match="domain_learning_rate"):
    make(domain_learning_rate=-1.0)
  with pytest.raises(ValueError, match="weighting"):
    make(weighting="x")
  with pytest.raises(ValueError, match="num_domains"):
    agnostic.client_domain_states([0, 2], num_domains=2)


@pytest.mark.parametrize("weighting,model_name",
                         [("num_examples", "tiny_model"),
                          ("uniform", "deterministic_model")])
def test_one_domain_is_fedavg(request, weighting, model_name):
  model = request.getfixturevalue(model_name)  # dropout in the first
  params = model.init(jax.random.key(0))
  clients = make_clients(6, seed=1)
  cohort = build_cohort(clients, [0, 2, 3, 5], batch_size=4, pad_clients=1,
                        extra_steps=1)
  alg = agnostic.agnostic_fedavg(model, optax.sgd(0.05), optax.adam(0.1),
                                 num_domains=1, domain_learning_rate=0.5,
                                 weighting=weighting)
  ref = fedavg.fedopt(model, optax.sgd(0.05), optax.adam(0.1),
                      weighting=weighting)
  states = agnostic.client_domain_states(np.zeros(6, np.int64))
  state = alg.server_init(params)
  ref_state = ref.server_init(params)
  fn = _round_fn(ref)
  for _ in range(2):
    state, _, metrics = _round(alg, state, cohort, states)
    ref_state, _, ref_metrics = fn(ref_state, cohort, jnp.zeros([5]), RNG)
  _assert_trees_close(state.params, ref_state.params)
  assert float(metrics["train_loss"]) == float(ref_metrics["train_loss"])
  assert float(metrics["domain_weight_0"]) == 1.0


def test_fixed_weights_proportional_to_data_is_fedavg(deterministic_model):
  """eta = 0 and lambda = window = the domains' shares: alpha is 1 for every
  domain, so the round is FedAvg's; a full-population cohort keeps it so."""
  params = deterministic_model.init(jax.random.key(1))
  clients = make_clients(6, seed=2)
  domain_ids = np.array([0, 2, 1, 0, 2, 2])
  sizes = [len(y) for _, y in clients]
  shares = agnostic.domain_fractions(domain_ids, 3, sizes)
  alg = agnostic.agnostic_fedavg(deterministic_model, optax.sgd(0.05),
                                 optax.sgd(1.0),
                                 num_domains=3, domain_learning_rate=0.0,
                                 init_domain_weights=shares,
                                 init_domain_window=shares)
  ref = fedavg.fedavg(deterministic_model, optax.sgd(0.05))
  cohort = build_cohort(clients, list(range(6)), batch_size=4)
  states = agnostic.client_domain_states(domain_ids)
  state, ref_state = alg.server_init(params), ref.server_init(params)
  fn = _round_fn(ref)
  for _ in range(2):
    state, _, metrics = _round(alg, state, cohort, states)
    ref_state, _, _ = fn(ref_state, cohort, jnp.zeros([6]), RNG)
  _assert_trees_close(state.params, ref_state.params, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.extra.domain_weights, shares, rtol=1e-6)
  for d in range(3):
    assert float(metrics[f"domain_share_{d}"]) == pytest.approx(shares[d])


def test_update_is_the_domain_weighted_mean_of_client_deltas(
    deterministic_model):
  """x+ - x = sum_k beta_k delta_k / sum_k beta_k, beta_k = alpha_dk n_k,
  alpha_d = lambda_d / max(mean window share, floor); the window then drops
  its oldest row and appends the cohort's example shares."""
  params = deterministic_model.init(jax.random.key(2))
  clients = make_clients(5, seed=3)
  cohort_indices = [0, 1, 3, 4]
  domain_ids = np.array([0, 1, 2, 1, 0])  # domain 2 (client 2) not sampled
  lam = np.array([0.5, 0.2, 0.3])
  window = np.array([[0.6, 0.4, 0.0], [0.4, 0.6, 0.0]])
  floor = 0.05
  alg = agnostic.agnostic_fedavg(deterministic_model, optax.sgd(0.1),
                                 optax.sgd(1.0), num_domains=3,
                                 domain_learning_rate=0.0,
                                 init_domain_weights=lam, window_size=2,
                                 min_window_fraction=floor)
  state = alg.server_init(params)
  state = state._replace(extra=state.extra._replace(
      domain_window=jnp.asarray(window, jnp.float32)))
  cohort = build_cohort(clients, cohort_indices, batch_size=3, pad_clients=2)
  new_state, _, _ = _round(alg, state, cohort,
                           agnostic.client_domain_states(domain_ids))

  alpha = lam / np.maximum(window.mean(0), floor)
  ref = fedavg.fedavg(deterministic_model, optax.sgd(0.1))
  expected = jax.tree.map(lambda p: np.zeros(p.shape), params)
  total, counts = 0.0, np.zeros(3)
  for k in cohort_indices:
    single = build_cohort(clients, [k], batch_size=3, num_steps=4)
    delta = jax.tree.map(np.subtract, _fedavg_round(ref, params, single)[0]
                         .params, params)
    beta = alpha[domain_ids[k]] * len(clients[k][1])
    expected = jax.tree.map(lambda e, d: e + beta * np.asarray(d), expected,
                            delta)
    total += beta
    counts[domain_ids[k]] += len(clients[k][1])
  got = jax.tree.map(np.subtract, new_state.params, params)
  _assert_trees_close(got, jax.tree.map(lambda e: e / total, expected),
                      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(new_state.extra.domain_window,
                             np.stack([window[1], counts / counts.sum()]),
                             rtol=1e-6)


def test_domain_weights_exponentiated_gradient_by_hand(deterministic_model):
  """lambda+ = lambda exp(eta L) / Z with L_d the example-weighted mean loss
  of the round's starting model on domain d (0 for an unseen domain)."""
  params = deterministic_model.init(jax.random.key(4))
  params = jax.tree.map(lambda p: 3.0 * p, params)  # spread the losses
  clients = make_clients(6, seed=5, min_size=4, max_size=15)
  domain_ids = np.array([0, 0, 1, 1, 2, 3])
  cohort_indices = [0, 1, 2, 3, 4]  # domain 3 unseen
  lam = np.array([0.1, 0.2, 0.3, 0.4])
  eta = 0.7
  alg = agnostic.agnostic_fedavg(deterministic_model, optax.sgd(0.2),
                                 optax.sgd(1.0), num_domains=4,
                                 domain_learning_rate=eta,
                                 init_domain_weights=lam)
  cohort = build_cohort(clients, cohort_indices, batch_size=4, pad_clients=1)
  new_state, new_states, metrics = _round(
      alg, alg.server_init(params), cohort,
      agnostic.client_domain_states(domain_ids))

  client_loss = _hand_mean_losses(params, [clients[k] for k in cohort_indices])
  sizes = np.array([len(clients[k][1]) for k in cohort_indices], np.float64)
  cohort_domains = domain_ids[cohort_indices]
  losses = np.zeros(4)
  for d in range(3):
    here = cohort_domains == d
    losses[d] = (sizes[here] * client_loss[here]).sum() / sizes[here].sum()
  expected = lam * np.exp(eta * losses)
  expected /= expected.sum()
  weights = np.asarray(new_state.extra.domain_weights, np.float64)
  np.testing.assert_allclose(weights, expected, rtol=1e-5)
  for d in range(4):
    assert float(metrics[f"domain_loss_{d}"]) == pytest.approx(losses[d],
                                                               rel=1e-5)
  assert weights.min() >= 0 and weights.sum() == pytest.approx(1.0, abs=1e-6)
  ratio = weights / lam
  assert np.argmax(ratio) == np.argmax(losses)
  assert ratio[np.argmax(losses)] > 1 > ratio[np.argmin(losses)]
  # The domain id is the client's state and comes back unchanged.
  np.testing.assert_array_equal(np.asarray(new_states)[:5],
                                domain_ids[cohort_indices])


def test_chunked_strategy_agrees_and_states_round_trip(deterministic_model):
  """Chunking pads client states with -1, which selects no domain."""
  strategy = Strategy("chunked", "scan", 2)
  params = deterministic_model.init(jax.random.key(3))
  clients = make_clients(7, seed=6)
  domain_ids = np.array([1, 0, 2, 2, 1, 0, 1])
  states = agnostic.client_domain_states(domain_ids)
  alg = agnostic.agnostic_fedavg(deterministic_model, optax.sgd(0.05),
                                 optax.sgd(1.0),
                                 num_domains=3, domain_learning_rate=1.0)
  cohort = build_cohort(clients, [6, 1, 3], batch_size=4, pad_clients=2)
  ref_state, _, ref_metrics = _round(alg, alg.server_init(params), cohort,
                                     states)
  state, new_states, metrics = _round(alg, alg.server_init(params), cohort,
                                      states, strategy)
  _assert_trees_close(state, ref_state, rtol=1e-5, atol=1e-6)
  assert float(metrics["domain_weight_2"]) == pytest.approx(
      float(ref_metrics["domain_weight_2"]), rel=1e-6)
  scattered = round_lib.scatter_client_states(
      states, cohort["client_indices"], new_states)
  np.testing.assert_array_equal(scattered, states)


def test_dp_aggregator_clips_model_delta_and_domain_statistics_jointly(
    deterministic_model):
  """With a DP aggregator (noise 0 here) the aggregate is the fixed-
  denominator sum of alpha-scaled deltas; the clipped norm covers the
  scaled delta and the scaled (loss, count) statistics together."""
  params = deterministic_model.init(jax.random.key(6))
  clients = make_clients(3, seed=7)
  scale = 0.5
  dp = aggregators.gaussian_sum(clip_norm=1e6, noise_multiplier=0.0,
                                expected_cohort_size=4.0)
  alg = agnostic.agnostic_fedavg(deterministic_model, optax.sgd(0.1),
                                 optax.sgd(1.0), num_domains=1,
                                 domain_learning_rate=0.1, weighting="uniform",
                                 aggregator=dp, self_normalize=False,
                                 stats_scale=scale)
  ref = fedavg.fedavg(deterministic_model, optax.sgd(0.1), weighting="uniform",
                      aggregator=dp)
  states = agnostic.client_domain_states(np.zeros(3, np.int64))
  cohort = build_cohort(clients, [0, 1, 2], batch_size=4)
  state, _, metrics = _round(alg, alg.server_init(params), cohort, states)
  ref_state, _, _ = _fedavg_round(ref, params, cohort)
  _assert_trees_close(state.params, ref_state.params)

  single = build_cohort(clients, [1], batch_size=4)
  _, _, metrics = _round(alg, alg.server_init(params), single, states)
  delta = jax.tree.map(np.subtract, _fedavg_round(ref, params, single)[0]
                       .params, params)
  delta_sq = sum(float(np.sum(np.square(4.0 * d)))  # gaussian_sum's /4
                 for d in jax.tree.leaves(delta))
  loss = _hand_mean_losses(params, [clients[1]])[0]
  expected = np.sqrt(delta_sq + scale**2 * (loss**2 + 1.0))
  assert float(metrics["update_norm"]) == pytest.approx(expected, rel=1e-5)


def test_dp_noise_keeps_domain_weights_on_the_simplex(deterministic_model):
  params = deterministic_model.init(jax.random.key(7))
  clients = make_clients(8, seed=8)
  domain_ids = np.array([0, 1, 2, 0, 1, 2, 0, 1])
  dp = aggregators.gaussian_sum(clip_norm=0.5, noise_multiplier=2.0,
                                expected_cohort_size=4.0)
  alg = agnostic.agnostic_fedavg(deterministic_model, optax.sgd(0.05),
                                 optax.sgd(1.0),
                                 num_domains=3, domain_learning_rate=1.0,
                                 weighting="uniform", aggregator=dp,
                                 self_normalize=False, loss_bound=5.0,
                                 stats_scale=0.1)
  states = agnostic.client_domain_states(domain_ids)
  state = alg.server_init(params)
  fn = _round_fn(alg)
  for r in range(4):
    indices = [(2 * r + j) % 8 for j in range(4)]
    cohort = build_cohort(clients, indices, batch_size=4, num_steps=3)
    gathered = round_lib.gather_client_states(states,
                                              cohort["client_indices"])
    state, _, metrics = fn(state, cohort, gathered, jax.random.key(r))
    weights = np.asarray(state.extra.domain_weights)
    assert np.all(weights >= 0) and weights.sum() == pytest.approx(1, abs=1e-5)
    assert all(0 <= float(metrics[f"domain_loss_{d}"]) <= 5 for d in range(3))
    assert float(metrics["params_finite"]) == 1.0
    np.testing.assert_allclose(np.asarray(state.extra.domain_window).sum(1),
                               1.0, rtol=1e-5)


def test_domain_ids_from_client_ids_and_majority_labels():
  ids = ["hamlet/HAMLET", "lear/LEAR", "hamlet/OPHELIA", "tempest/ARIEL"]
  store = ClientStore.from_client_arrays(
      ids, [{"x": np.zeros([2, 3]), "y": np.zeros([2, 3], np.int32)}] * 4)
  plays = FederatedDataset("shakespeare", store, store, 5, (3,))
  domain_ids, names = agnostic.domain_ids_from(plays, "play")
  assert names == ("hamlet", "lear", "tempest")
  np.testing.assert_array_equal(domain_ids, [0, 1, 0, 2])
  prefix_ids, prefix_names = agnostic.domain_ids_from(plays, "client_id_prefix",
                                                      separator="m")
  assert prefix_names == ("ha", "lear/LEAR", "te")
  np.testing.assert_array_equal(prefix_ids, [0, 1, 0, 2])
  with pytest.raises(ValueError, match="integer class labels"):
    agnostic.domain_ids_from(plays, "majority_label")
  with pytest.raises(ValueError, match="kind must be one of"):
    agnostic.domain_ids_from(plays, "speaker")

  data = load_dataset("synthetic", alpha=1.0, beta=1.0, iid=False,
                      num_clients=12, seed=0)
  domain_ids, names = agnostic.domain_ids_from(data, "majority_label")
  majority = [int(np.argmax(np.bincount(data.train.client(k)["y"],
                                        minlength=10)))
              for k in range(12)]
  assert [names[d] for d in domain_ids] == [f"label_{m}" for m in majority]
  assert list(names) == [f"label_{m}" for m in sorted(set(majority))]
  shares = agnostic.domain_fractions(domain_ids, len(names),
                                     data.train.client_sizes)
  assert shares.sum() == pytest.approx(1.0)
  for d in range(len(names)):
    assert shares[d] == pytest.approx(
        data.train.client_sizes[domain_ids == d].sum()
        / data.train.num_examples)
