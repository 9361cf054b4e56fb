"""HypCluster (Mansour et al. 2020, as in FedJAX) through the engine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, hypcluster
from fedjax_lab.data.cohort import make_round_cohort
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.models import get_model
from fedjax_lab.privacy import aggregators

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(9)


@pytest.fixture(autouse=True)
def _float32_matmuls():
  """Full float32 matrix products (GPUs default to TF32), so the comparisons
  of differently batched computations hold to float32 rounding everywhere."""
  with jax.default_matmul_precision("highest"):
    yield


@functools.lru_cache(maxsize=None)
def _round_fn(algorithm, strategy=Strategy()):
  return round_lib.build_round(algorithm, strategy, donate=False)


def _run(algorithm, state, cohort, rounds=1, strategy=Strategy()):
  fn = _round_fn(algorithm, strategy)
  num = cohort["client_mask"].shape[0]
  for _ in range(rounds):
    state, _, metrics = fn(state, cohort, jnp.zeros([num]), RNG)
  return state, {k: float(v) for k, v in metrics.items()}


def _stack(*trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def _row(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


def _assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _biased(params, bias):
  """``params`` with the output bias replaced (favours one class)."""
  out = jax.tree.map(jnp.array, params)
  out["Dense_0"]["bias"] = jnp.asarray(bias, jnp.float32)
  return out


def _one_label_clients(labels, seed=0, size=7):
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=[size, 8]).astype(np.float32),
           np.full([size], label, np.int32)) for label in labels]


def test_invalid_arguments(deterministic_model):
  with pytest.raises(ValueError, match="num_clusters"):
    hypcluster.hypcluster(deterministic_model, optax.sgd(0.1), optax.sgd(1.0),
                          0)
  alg = hypcluster.hypcluster(deterministic_model, optax.sgd(0.1),
                              optax.sgd(1.0), 2)
  with pytest.raises(ValueError, match="2 stacked cluster models"):
    alg.server_init(hypcluster.random_init(deterministic_model, 3,
                                           jax.random.key(0)))


@pytest.mark.parametrize("weighting,model_name",
                         [("num_examples", "tiny_model"),
                          ("uniform", "deterministic_model")])
def test_one_cluster_is_fedavg(request, weighting, model_name):
  model = request.getfixturevalue(model_name)  # dropout in the first
  params = model.init(jax.random.key(0))
  clients = make_clients(6, seed=1)
  cohort = build_cohort(clients, [0, 2, 3, 5], batch_size=4, pad_clients=1,
                        extra_steps=1)
  # A stateful server optimizer without Adam's 1/sqrt(v), which magnifies
  # rounding differences in near-zero coordinates.
  server = optax.sgd(0.5, momentum=0.9)
  alg = hypcluster.hypcluster(model, optax.sgd(0.05), server, 1,
                              weighting=weighting)
  ref = fedavg.fedopt(model, optax.sgd(0.05), server, weighting=weighting)
  state, metrics = _run(alg, alg.server_init(_stack(params)), cohort, 2)
  ref_state, ref_metrics = _run(ref, ref.server_init(params), cohort, 2)
  # Equal up to float32 rounding: the server divides by the cluster's weight
  # share, here sum(w) * (1 / sum(w)), which can be 1 - 2^-24.
  _assert_trees_close(_row(state.params, 0), ref_state.params, rtol=1e-6,
                      atol=5e-7)
  assert metrics["train_loss"] == ref_metrics["train_loss"]
  assert metrics["cluster_fraction_0"] == 1.0


def test_clients_train_the_cluster_with_the_lowest_loss(deterministic_model):
  """Clients labelled 0 pick the cluster biased to class 0, clients labelled
  2 the other; each cluster then equals FedAvg over its own clients only."""
  base_params = deterministic_model.init(jax.random.key(1))
  clusters = _stack(_biased(base_params, [4.0, 0.0, 0.0]),
                    _biased(base_params, [0.0, 0.0, 4.0]))
  clients = _one_label_clients([0, 2, 0], seed=2)
  clients[2] = (clients[2][0][:5], clients[2][1][:5])
  alg = hypcluster.hypcluster(deterministic_model, optax.sgd(0.1),
                              optax.sgd(1.0), 2)
  cohort = build_cohort(clients, [0, 1, 2], batch_size=3, pad_clients=1)
  state, metrics = _run(alg, alg.server_init(clusters), cohort)
  assert metrics["cluster_fraction_0"] == pytest.approx(2 / 3)
  assert metrics["cluster_fraction_1"] == pytest.approx(1 / 3)
  assert metrics["clusters_updated"] == 2.0

  ref = fedavg.fedavg(deterministic_model, optax.sgd(0.1))
  for k, members in ((0, [0, 2]), (1, [1])):
    sub = build_cohort(clients, members, batch_size=3)
    expected, _ = _run(ref, ref.server_init(_row(clusters, k)), sub)
    _assert_trees_close(_row(state.params, k), expected.params, rtol=1e-5,
                        atol=1e-6)


@pytest.mark.parametrize("strategy", [Strategy(), Strategy("chunked", "scan",
                                                           2)], ids=str)
def test_a_cluster_nobody_chooses_is_unchanged(deterministic_model, strategy):
  base_params = deterministic_model.init(jax.random.key(2))
  clusters = _stack(_biased(base_params, [4.0, 0.0, 0.0]),
                    _biased(base_params, [0.0, 0.0, 4.0]),
                    _biased(base_params, [-9.0, 9.0, -9.0]))
  clients = _one_label_clients([0, 2, 2, 0], seed=3)
  alg = hypcluster.hypcluster(deterministic_model, optax.sgd(0.1),
                              optax.adam(0.1), 3)
  start = alg.server_init(clusters)
  cohort = build_cohort(clients, [0, 1, 2, 3], batch_size=4, pad_clients=1)
  state, metrics = _run(alg, start, cohort, rounds=2, strategy=strategy)
  assert metrics["cluster_fraction_2"] == 0.0
  assert metrics["clusters_updated"] == 2.0
  for new, old in zip(jax.tree.leaves((state.params, state.opt_state)),
                      jax.tree.leaves((start.params, start.opt_state))):
    np.testing.assert_array_equal(np.asarray(new)[2], np.asarray(old)[2])
    assert not np.array_equal(np.asarray(new)[:2], np.asarray(old)[:2])


def test_dp_aggregator_clips_the_pair_and_keeps_per_cluster_means(
    deterministic_model):
  """gaussian_sum (noise 0, no clipping) sums every client's pair with weight
  1: each cluster's update is the plain mean of its clients' deltas; the
  clipped norm covers the delta and the scaled one-hot together."""
  base_params = deterministic_model.init(jax.random.key(3))
  clusters = _stack(_biased(base_params, [4.0, 0.0, 0.0]),
                    _biased(base_params, [0.0, 0.0, 4.0]))
  clients = _one_label_clients([0, 2, 0], seed=4)
  scale = 0.25
  dp = aggregators.gaussian_sum(clip_norm=1e6, noise_multiplier=0.0,
                                expected_cohort_size=3.0)
  alg = hypcluster.hypcluster(deterministic_model, optax.sgd(0.1),
                              optax.sgd(1.0), 2, weighting="uniform",
                              aggregator=dp, stats_scale=scale)
  cohort = build_cohort(clients, [0, 1, 2], batch_size=4)
  state, metrics = _run(alg, alg.server_init(clusters), cohort)
  ref = fedavg.fedavg(deterministic_model, optax.sgd(0.1), weighting="uniform")
  norms = []
  for k, members in ((0, [0, 2]), (1, [1])):
    expected, _ = _run(ref, ref.server_init(_row(clusters, k)),
                       build_cohort(clients, members, batch_size=4))
    _assert_trees_close(_row(state.params, k), expected.params, rtol=1e-5,
                        atol=1e-6)
    for i in members:
      single, _ = _run(ref, ref.server_init(_row(clusters, k)),
                       build_cohort(clients, [i], batch_size=4))
      sq = sum(float(np.sum(np.square(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves(single.params),
                               jax.tree.leaves(_row(clusters, k))))
      norms.append(np.sqrt(sq + scale**2))
  assert metrics["update_norm"] == pytest.approx(np.mean(norms), rel=1e-5)


def _two_group_synthetic(num_clients=20):
  """Synthetic-IID where the odd clients' labels are rotated by 3 classes."""
  data = load_dataset("synthetic", alpha=0.0, beta=0.0, iid=True,
                      num_clients=num_clients, seed=1)
  rotate = np.roll(np.arange(10), 3)

  def relabel(store):
    owner = np.repeat(np.arange(store.num_clients), store.client_sizes)
    y = np.where(owner % 2 == 1, rotate[store.features["y"]],
                 store.features["y"]).astype(np.int32)
    return ClientStore(store.client_ids, store.offsets,
                       {"x": store.features["x"], "y": y})

  return relabel(data.train), relabel(data.test), data


def test_two_clusters_beat_one_on_two_client_groups():
  """8 rounds of 8 clients: K=2 (k-means++-like init) separates the groups
  by parity and beats K=1 (FedAvg) in HypCluster evaluation accuracy."""
  train, test, data = _two_group_synthetic()
  model = get_model("logistic", input_shape=data.input_shape,
                    num_classes=data.num_classes)
  evaluate = hypcluster.build_hypcluster_evaluator(model)
  train_batches = hypcluster.client_batches(train, 64)
  test_batches = hypcluster.client_batches(test, 64, reference=train)
  accuracy = {}
  for num_clusters in (1, 2):
    if num_clusters == 1:
      init = hypcluster.random_init(model, 1, jax.random.key(0))
    else:
      init = hypcluster.kmeans_init(model, optax.sgd(0.1), train,
                                    np.arange(8), 2, jax.random.key(0),
                                    batch_size=10)
    alg = hypcluster.hypcluster(model, optax.sgd(0.1), optax.sgd(1.0),
                                num_clusters)
    fn = round_lib.build_round(alg, Strategy(), donate=False)
    state = alg.server_init(init)
    for r in range(8):
      indices = np.random.default_rng([2, r]).choice(20, 8, replace=False)
      cohort = round_lib.cohort_arrays(make_round_cohort(
          train, indices, batch_size=10, num_epochs=1, max_steps=10, seed=0,
          round_index=r, fixed_cohort_size=8))
      state, _, _ = fn(state, cohort, jnp.zeros([8]), RNG)
    result = evaluate(state.params, train_batches, test_batches)
    accuracy[num_clusters] = result["accuracy"]
  assignment = np.argmin(hypcluster.build_cluster_losses(model)(
      state.params, train_batches), axis=1)
  parity = np.arange(20) % 2
  assert np.array_equal(assignment, parity) or np.array_equal(assignment,
                                                              1 - parity)
  assert result["cluster_clients_0"] == result["cluster_clients_1"] == 10
  print(f"hypcluster accuracy: K=1 {accuracy[1]:.3f}, K=2 {accuracy[2]:.3f}")
  assert accuracy[2] > accuracy[1] + 0.1
