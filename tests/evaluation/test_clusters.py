"""Cluster models scored as HypCluster does: each client with its best
cluster (FedJAX's hyp_cluster evaluation)."""

import jax
import numpy as np
import pytest

from fedjax_lab.algorithms import hypcluster
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.evaluation import clusters

from tests.engine.conftest import make_clients


def _store(per_client):
  return ClientStore.from_client_arrays(
      [f"c{i}" for i in range(len(per_client))],
      [{"x": x, "y": y} for x, y in per_client])


def _row(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


def test_evaluate_matches_a_per_client_loop(deterministic_model):
  cluster_params = hypcluster.random_init(deterministic_model, 3, jax.random.key(4))
  clients = make_clients(7, seed=5, min_size=2, max_size=9)
  train = _store([(x[:-1], y[:-1]) for x, y in clients])
  test = _store([(x[-1:], y[-1:]) for x, y in clients][::-1])  # other order
  test = ClientStore(test.client_ids[::-1].copy(), test.offsets,
                     test.features)  # ids now name the right clients
  assert list(test.client_ids) != list(train.client_ids)
  result = clusters.hypcluster_evaluate(
      deterministic_model, cluster_params, train, test, batch_size=4)

  def mean_loss(params, x, y):
    loss, _ = deterministic_model.example_loss(
        deterministic_model.apply(params, {"x": x}, None, False), {"y": y})
    return float(np.mean(loss))

  correct, counts = 0, np.zeros(3)
  for x, y in clients:
    losses = [mean_loss(_row(cluster_params, k), x[:-1], y[:-1]) for k in range(3)]
    k = int(np.argmin(losses))
    counts[k] += 1
    logits = deterministic_model.apply(_row(cluster_params, k), {"x": x[-1:]}, None,
                                       False)
    correct += int(np.argmax(logits[0]) == y[-1])
  assert result["accuracy"] == pytest.approx(correct / len(clients))
  for k in range(3):
    assert result[f"cluster_clients_{k}"] == counts[k]


def test_max_examples_scores_a_fixed_subset(deterministic_model):
  cluster_params = hypcluster.random_init(deterministic_model, 2,
                                          jax.random.key(0))
  clients = make_clients(6, seed=2, min_size=4, max_size=9)
  train = _store([(x[:-2], y[:-2]) for x, y in clients])
  test = _store([(x[-2:], y[-2:]) for x, y in clients])
  full = clusters.hypcluster_evaluate(deterministic_model, cluster_params,
                                      train, test, batch_size=4)
  everything = clusters.hypcluster_evaluate(
      deterministic_model, cluster_params, train, test, batch_size=4,
      max_examples=10**6)
  assert everything == pytest.approx(full)
  some = clusters.hypcluster_evaluate(deterministic_model, cluster_params,
                                      train, test, batch_size=4,
                                      max_examples=5)
  assert some == clusters.hypcluster_evaluate(
      deterministic_model, cluster_params, train, test, batch_size=4,
      max_examples=5)
  assert sum(some[f"cluster_clients_{k}"] for k in range(2)) <= 6
