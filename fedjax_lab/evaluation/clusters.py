"""Evaluation of cluster models: every client scored with its best cluster.

HypCluster (Mansour, Mohri, Ro & Suresh 2020, Section 3) trains ``K`` models
stacked on a leading axis; FedJAX evaluates them by assigning each client to
the model with the lowest mean loss on its training examples and scoring the
client's test examples with that model. :func:`hypcluster_evaluate` does this
for any stacked cluster params and a pair of train/test stores.

The per-client best-cluster math itself (``build_hypcluster_evaluator`` and
the losses behind it) lives with the algorithm, in
:mod:`fedjax_lab.algorithms.hypcluster_eval`: HypCluster's k-means-like
initialisation needs the losses, its recipe declares the evaluator a run
records, and an algorithm may not import this (higher) layer.
"""

from __future__ import annotations

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms.hypcluster_eval import build_hypcluster_evaluator
from fedjax_lab.algorithms.hypcluster_eval import client_batches
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.models import base as model_base


def hypcluster_evaluate(model: model_base.Model, cluster_params: base.PyTree,
                        train_store: ClientStore, test_store: ClientStore,
                        batch_size: int,
                        max_examples: int | None = None) -> dict[str, float]:
  """Scores ``cluster_params`` (stacked ``[K, ...]``) as HypCluster does.

  Every client of ``train_store`` takes the cluster with the lowest mean loss
  on its training examples; each example of ``test_store`` (clients matched
  by id) is scored with its client's cluster.

  Args:
    model: the model the ``K`` clusters share.
    cluster_params: the cluster models, stacked on a leading axis.
    train_store: the examples that choose each client's cluster.
    test_store: the examples scored.
    batch_size: examples per evaluation batch.
    max_examples: score a fixed random subset of this many examples of each
      store (None: all).

  Returns:
    ``{metric: value}`` over the test examples (``loss``, ``accuracy``, ...)
    and ``cluster_clients_<k>``, the training clients (with examples) that
    chose cluster ``k``. Compiles on every call: to evaluate repeatedly,
    build ``hypcluster_eval.build_hypcluster_evaluator(model)`` once.
  """
  evaluate = build_hypcluster_evaluator(model)
  train_batches = client_batches(train_store, batch_size,
                                 max_examples=max_examples)
  test_batches = client_batches(test_store, batch_size, reference=train_store,
                                max_examples=max_examples)
  return evaluate(cluster_params, train_batches, test_batches)
