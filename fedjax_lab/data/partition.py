"""Partitioners that turn a centralized labelled dataset into federated clients.

Every function returns row indices into the centralized arrays (one ``int64``
array per client), so callers build a store with
:meth:`fedjax_lab.data.federated.ClientStore.from_partition`. All randomness
comes from the ``numpy.random.Generator`` passed in: same generator state, same
partition.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from fedjax_lab.data.federated import ClientStore, FederatedDataset

# How many Dirichlet draws to try before declaring a minimum size unreachable.
_MAX_DIRICHLET_ATTEMPTS = 1000


def iid_partition(num_examples: int, num_clients: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
  """Shuffles ``num_examples`` rows and deals them to ``num_clients`` clients.

  Args:
    num_examples: number of rows in the centralized dataset.
    num_clients: number of clients to create (``1 <= num_clients <=
      num_examples``).
    rng: source of randomness.

  Returns:
    ``num_clients`` sorted ``int64`` arrays of row indices; together they cover
    ``range(num_examples)`` exactly once and their sizes differ by at most 1.
  """
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  if num_examples < num_clients:
    raise ValueError(
        f"cannot give each of {num_clients} clients an example: only "
        f"{num_examples} examples.")
  order = rng.permutation(num_examples).astype(np.int64)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_label_partition(
    labels: np.ndarray, num_clients: int, alpha: float,
    rng: np.random.Generator,
    min_examples_per_client: int = 2) -> list[np.ndarray]:
  """Label-skewed partition: per class, client shares drawn from Dir(alpha).

  Hsu, Qi & Brown 2019, "Measuring the effects of non-identical data
  distribution for federated visual classification": for each class ``c`` draw
  ``p_c ~ Dir(alpha * 1_K)`` over the ``K`` clients and give client ``k`` a
  fraction ``p_c[k]`` of the (shuffled) rows of class ``c``. Small ``alpha``
  (e.g. 0.1) gives each client few classes; large ``alpha`` (e.g. 100)
  approaches an IID split. The whole draw is repeated until every client has at
  least ``min_examples_per_client`` rows.

  Args:
    labels: ``[num_examples]`` integer class labels.
    num_clients: number of clients ``K``.
    alpha: Dirichlet concentration (> 0).
    rng: source of randomness.
    min_examples_per_client: smallest client size accepted.

  Returns:
    ``num_clients`` sorted ``int64`` arrays of row indices covering every row
    exactly once.

  Raises:
    ValueError: bad arguments, or no draw met the minimum size after
      ``_MAX_DIRICHLET_ATTEMPTS`` tries.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  if not alpha > 0:
    raise ValueError(f"alpha must be > 0, got {alpha}.")
  if min_examples_per_client < 0:
    raise ValueError("min_examples_per_client must be >= 0.")
  needed = num_clients * min_examples_per_client
  if needed > len(labels):
    raise ValueError(
        f"impossible: {num_clients} clients x {min_examples_per_client} "
        f"examples = {needed} > {len(labels)} examples. Use fewer clients or "
        f"a smaller min_examples_per_client.")
  class_rows = [np.flatnonzero(labels == c) for c in np.unique(labels)]
  for _ in range(_MAX_DIRICHLET_ATTEMPTS):
    client_parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for rows in class_rows:
      proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(proportions)[:-1] * len(rows)).astype(np.int64)
      for k, part in enumerate(np.split(rng.permutation(rows), cuts)):
        client_parts[k].append(part)
    sizes = [sum(len(p) for p in parts) for parts in client_parts]
    if min(sizes) >= min_examples_per_client:
      return [np.sort(np.concatenate(parts)).astype(np.int64)
              for parts in client_parts]
  raise ValueError(
      f"no Dirichlet(alpha={alpha}) draw gave all {num_clients} clients >= "
      f"{min_examples_per_client} examples in {_MAX_DIRICHLET_ATTEMPTS} "
      f"attempts ({len(labels)} examples). Increase alpha, use fewer clients, "
      f"or lower min_examples_per_client.")


def train_test_split_per_client(
    client_rows: Sequence[np.ndarray], test_fraction: float,
    rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Holds out a random ``test_fraction`` of each client's rows.

  A client with ``n`` rows gets ``round(n * test_fraction)`` test rows, clipped
  so that it keeps at least one train row and, when ``n >= 2`` and
  ``test_fraction > 0``, has at least one test row (so every client can be
  evaluated; tiny clients therefore hold out more than ``test_fraction``).

  Args:
    client_rows: one array of row indices per client (e.g. from a partitioner).
    test_fraction: fraction in ``[0, 1)`` of each client's rows to hold out.
    rng: source of randomness.

  Returns:
    ``(train_rows, test_rows)``: two lists aligned with ``client_rows``, each
    entry a sorted ``int64`` array; per client they are disjoint and their
    union is that client's rows.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}.")
  train_rows, test_rows = [], []
  for k, rows in enumerate(client_rows):
    rows = np.asarray(rows, dtype=np.int64)
    n = len(rows)
    if n < 1:
      raise ValueError(f"client {k} has no rows; cannot keep a train example.")
    num_test = int(round(n * test_fraction))
    if test_fraction > 0 and n >= 2:
      num_test = max(num_test, 1)
    num_test = min(num_test, n - 1)
    shuffled = rng.permutation(rows)
    test_rows.append(np.sort(shuffled[:num_test]))
    train_rows.append(np.sort(shuffled[num_test:]))
  return train_rows, test_rows


def partition_labelled(
    labels: np.ndarray, num_clients: int, scheme: str, alpha: float,
    rng: np.random.Generator, test_fraction: float,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Partitions a labelled dataset into clients, then splits each client.

  Args:
    labels: ``[num_examples]`` integer labels.
    num_clients: number of clients.
    scheme: ``"iid"`` (:func:`iid_partition`) or ``"dirichlet"``
      (:func:`dirichlet_label_partition` with ``alpha``, at least 2 examples
      per client so that each keeps a train and a test example).
    alpha: Dirichlet concentration (only used by ``"dirichlet"``).
    rng: source of randomness (partition first, then the split).
    test_fraction: see :func:`train_test_split_per_client`.

  Returns:
    ``(train_rows, test_rows)``, one array of row indices per client each.
  """
  if scheme == "iid":
    client_rows = iid_partition(len(labels), num_clients, rng)
  elif scheme == "dirichlet":
    client_rows = dirichlet_label_partition(
        labels, num_clients, alpha, rng, min_examples_per_client=2)
  else:
    raise ValueError(
        f"unknown partition {scheme!r}; expected 'iid' or 'dirichlet'.")
  return train_test_split_per_client(client_rows, test_fraction, rng)


def federate_labelled_arrays(
    name: str, features: Mapping[str, np.ndarray], label_feature: str,
    num_classes: int, num_clients: int, scheme: str, alpha: float, seed: int,
    test_fraction: float, info: Mapping[str, Any]) -> FederatedDataset:
  """Turns centralized labelled arrays into a :class:`FederatedDataset`.

  Partitions with :func:`partition_labelled` using
  ``numpy.random.default_rng(seed)``; the test store holds each client's
  held-out rows under the same client ids (``"0"``, ``"1"``, ...) as train.

  Args:
    name: dataset name.
    features: feature name -> ``[num_examples, ...]`` array.
    label_feature: which feature holds the integer labels (e.g. ``"y"``).
    num_classes: number of classes.
    num_clients: number of clients.
    scheme: ``"iid"`` or ``"dirichlet"``.
    alpha: Dirichlet concentration (``"dirichlet"`` only).
    seed: seed of the partition and split.
    test_fraction: fraction of each client's rows held out.
    info: provenance metadata; partition parameters are added to it.

  Returns:
    The federated dataset; ``input_shape`` is that of ``features["x"]`` rows.
  """
  labels = np.asarray(features[label_feature])
  rng = np.random.default_rng(seed)
  train_rows, test_rows = partition_labelled(
      labels, num_clients, scheme, alpha, rng, test_fraction)
  client_ids = [str(k) for k in range(num_clients)]
  train = ClientStore.from_partition(features, train_rows, client_ids)
  test = ClientStore.from_partition(features, test_rows, client_ids)
  full_info = dict(info)
  full_info.update(
      partition=scheme, alpha=alpha if scheme == "dirichlet" else None,
      seed=seed, num_clients=num_clients, test_fraction=test_fraction,
      label_counts=np.bincount(labels, minlength=num_classes).tolist())
  return FederatedDataset(
      name=name, train=train, test=test, num_classes=num_classes,
      input_shape=tuple(np.shape(features["x"])[1:]), info=full_info)
