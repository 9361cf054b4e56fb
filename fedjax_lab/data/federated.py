"""Columnar federated datasets: every client's examples in one array per feature.

A :class:`ClientStore` holds all examples of all clients contiguously, one numpy
array per feature (``x``, ``y``, ...), grouped by client, with an ``offsets``
vector so client ``i`` owns rows ``offsets[i]:offsets[i + 1]``. Reading a client
is a slice (no copy, no Python object per example), which keeps cohort batching
cheap even with thousands of clients.

A :class:`FederatedDataset` pairs a train and a test store with the metadata a
model and an evaluator need (number of classes, input shape, vocabulary, ...).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ClientStore:
  """All examples of a set of clients, stored column-wise.

  Attributes:
    client_ids: ``[num_clients]`` array of client identifiers (str).
    offsets: ``[num_clients + 1]`` int64; client ``i`` owns rows
      ``offsets[i]:offsets[i+1]`` of every feature array.
    features: feature name -> array ``[total_examples, ...]``.
  """

  client_ids: np.ndarray
  offsets: np.ndarray
  features: Mapping[str, np.ndarray]

  def __post_init__(self):
    offsets = np.asarray(self.offsets, dtype=np.int64)
    object.__setattr__(self, "offsets", offsets)
    object.__setattr__(self, "client_ids", np.asarray(self.client_ids))
    if offsets.ndim != 1 or len(offsets) != len(self.client_ids) + 1:
      raise ValueError(
          f"offsets must have num_clients + 1 = {len(self.client_ids) + 1} "
          f"entries, got shape {offsets.shape}.")
    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
      raise ValueError("offsets must start at 0 and be non-decreasing.")
    if not self.features:
      raise ValueError("a ClientStore needs at least one feature.")
    for name, column in self.features.items():
      if len(column) != offsets[-1]:
        raise ValueError(
            f"feature {name!r} has {len(column)} rows but offsets end at "
            f"{offsets[-1]}.")

  @classmethod
  def from_client_arrays(
      cls, client_ids: Sequence[str],
      per_client: Sequence[Mapping[str, np.ndarray]]) -> "ClientStore":
    """Builds a store from one feature dict per client (same keys for all)."""
    if len(client_ids) != len(per_client):
      raise ValueError("client_ids and per_client must have the same length.")
    if not per_client:
      raise ValueError("cannot build a ClientStore with no clients.")
    names = list(per_client[0].keys())
    sizes = [len(next(iter(c.values()))) for c in per_client]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    features = {n: np.concatenate([np.asarray(c[n]) for c in per_client])
                for n in names}
    return cls(np.asarray(client_ids), offsets, features)

  @classmethod
  def from_partition(cls, features: Mapping[str, np.ndarray],
                     client_rows: Sequence[np.ndarray],
                     client_ids: Sequence[str] | None = None) -> "ClientStore":
    """Builds a store from centralized arrays and one row-index array per client."""
    order = np.concatenate([np.asarray(r, dtype=np.int64) for r in client_rows])
    sizes = [len(r) for r in client_rows]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if client_ids is None:
      client_ids = [str(i) for i in range(len(client_rows))]
    return cls(np.asarray(client_ids), offsets,
               {n: np.asarray(a)[order] for n, a in features.items()})

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  @property
  def client_sizes(self) -> np.ndarray:
    """``[num_clients]`` number of examples of each client."""
    return np.diff(self.offsets)

  def sizes_of(self, indices: np.ndarray) -> np.ndarray:
    """Example counts of the clients at ``indices``: O(len(indices)), unlike
    ``client_sizes[indices]`` (which first builds all N counts)."""
    indices = np.asarray(indices, dtype=np.int64)
    return self.offsets[indices + 1] - self.offsets[indices]

  @property
  def num_examples(self) -> int:
    return int(self.offsets[-1])

  @property
  def feature_names(self) -> tuple[str, ...]:
    return tuple(self.features)

  def client(self, index: int) -> dict[str, np.ndarray]:
    """Feature arrays of the client at position ``index`` (views, no copy)."""
    start, stop = self.offsets[index], self.offsets[index + 1]
    return {n: a[start:stop] for n, a in self.features.items()}

  def index_of(self, client_id: str) -> int:
    """Position of ``client_id`` in this store."""
    hits = np.flatnonzero(self.client_ids == client_id)
    if len(hits) == 0:
      raise KeyError(f"unknown client id {client_id!r}")
    return int(hits[0])

  def subset(self, indices: Sequence[int]) -> "ClientStore":
    """A new store with only the clients at ``indices`` (in that order)."""
    indices = np.asarray(indices, dtype=np.int64)
    rows = [np.arange(self.offsets[i], self.offsets[i + 1]) for i in indices]
    order = np.concatenate(rows) if rows else np.zeros([0], np.int64)
    sizes = self.client_sizes[indices]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return ClientStore(self.client_ids[indices], offsets,
                       {n: a[order] for n, a in self.features.items()})

  def all_examples(self) -> dict[str, np.ndarray]:
    """Every example of every client, concatenated (e.g. for central eval)."""
    return dict(self.features)


@dataclasses.dataclass(frozen=True)
class FederatedDataset:
  """A federated train/test split plus what models and metrics need to know.

  Attributes:
    name: short dataset name (``"shakespeare"``, ``"mnist"``, ...).
    train: clients used for training.
    test: held-out clients (or held-out examples of the same clients) for
      evaluation.
    num_classes: size of the output space (vocabulary size for characters).
    input_shape: shape of one example's ``x`` (without the batch axis).
    info: free-form provenance/metadata (source, split, vocabulary, ...).
  """

  name: str
  train: ClientStore
  test: ClientStore
  num_classes: int
  input_shape: tuple[int, ...]
  info: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def from_client_arrays(
      cls, train: Mapping[str, Mapping[str, np.ndarray]],
      test: Mapping[str, Mapping[str, np.ndarray]], *, name: str = "custom",
      num_classes: int | None = None,
      info: Mapping[str, Any] | None = None) -> "FederatedDataset":
    """A dataset from a user's own arrays: ``{client_id: {"x": [n, ...],
    "y": [n]}}`` for the training clients and for the test clients (the
    test side may be the same users' held-out examples or other users).

    ``num_classes`` defaults to ``max(y) + 1`` over both splits (pass it when
    some class never occurs); ``input_shape`` is read from ``x``.
    """
    stores = {}
    for split, clients in (("train", train), ("test", test)):
      if not clients:
        raise ValueError(f"{split} has no clients.")
      for client_id, arrays in clients.items():
        missing = {"x", "y"} - set(arrays)
        if missing:
          raise ValueError(
              f"{split} client {client_id!r} lacks feature(s) "
              f"{sorted(missing)}; every client needs 'x' and 'y' arrays.")
        lengths = {k: len(v) for k, v in arrays.items()}
        if len(set(lengths.values())) != 1:
          raise ValueError(
              f"{split} client {client_id!r} has features of different "
              f"lengths {lengths}.")
      ids = list(clients)
      stores[split] = ClientStore.from_client_arrays(
          ids, [clients[i] for i in ids])
    labels = np.concatenate([stores["train"].features["y"].ravel(),
                             stores["test"].features["y"].ravel()])
    if num_classes is None:
      if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError("y is not integer; pass num_classes explicitly.")
      num_classes = int(labels.max(initial=0)) + 1
    return cls(name=name, train=stores["train"], test=stores["test"],
               num_classes=int(num_classes),
               input_shape=tuple(stores["train"].features["x"].shape[1:]),
               info=dict(info or {"source": "user arrays"}))

  def summary(self) -> dict[str, Any]:
    """Sizes that a researcher checks first, as plain Python values."""
    sizes = self.train.client_sizes
    return {
        "name": self.name,
        "train_clients": self.train.num_clients,
        "train_examples": self.train.num_examples,
        "test_clients": self.test.num_clients,
        "test_examples": self.test.num_examples,
        "examples_per_client_mean": float(sizes.mean()),
        "examples_per_client_median": float(np.median(sizes)),
        "num_classes": self.num_classes,
    }
