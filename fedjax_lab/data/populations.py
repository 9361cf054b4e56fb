"""Simulated populations of up to millions of clients, written straight to disk.

Each generator draws clients chunk by chunk and appends them to a
:class:`~fedjax_lab.data.disk.DatasetWriter`, so memory stays O(chunk)
whatever ``num_clients``; the result opens with
:func:`~fedjax_lab.data.disk.open_dataset` and trains with
``--config.data.name=disk --config.data.path=DIR``.

Randomness is per client: client ``k`` of split ``s`` (0 train, 1 test) draws
everything from its own ``numpy.random.default_rng([seed, s, k])``, in the
fixed order each ``*_client`` function documents. A client's data therefore
depends only on ``(seed, s, k)`` and the generator's parameters, never on the
chunk size or on the other clients. The per-client Python work is only
creating that generator and a few draws into preallocated rows; the rest is
vectorised over the chunk.

* :func:`write_synthetic_population`: FedProx Synthetic(alpha, beta)
  clients (:mod:`fedjax_lab.data.sources.synthetic`) with uniform sizes.
* :func:`fedjax_lab.data.image_population.write_image_population`: a
  MNIST-derived *simulated* image population (real digits, simulated users)
  with label skew and a per-client writer style.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from fedjax_lab.data import disk
from fedjax_lab.data.sources import synthetic

TRAIN, TEST = 0, 1  # The ``s`` of ``default_rng([seed, s, k])``.
DEFAULT_CHUNK_CLIENTS = 2_000
SCHEME_VERSION = 1  # Bump when a client's draws change.

# Synthetic: per client, 2 mean draws, W [60, 10], b [10], v [60].
_NUM_FEATURES, _NUM_CLASSES = synthetic.NUM_FEATURES, synthetic.NUM_CLASSES
_W_END = 2 + _NUM_FEATURES * _NUM_CLASSES
_B_END = _W_END + _NUM_CLASSES
_MODEL_DRAWS = _B_END + _NUM_FEATURES


ProgressFn = Callable[[str, int, int], None]  # (split, done, clients)


def uniform_integers(uniforms: np.ndarray | float, low: np.ndarray | int,
                     high: np.ndarray | int) -> np.ndarray:
  """Integers uniform in ``[low, high]`` from uniforms in ``[0, 1)``:
  ``low + floor(u * (high - low + 1))`` (int64; faster per client than
  ``Generator.integers``)."""
  low, high = np.asarray(low, np.int64), np.asarray(high, np.int64)
  drawn = low + np.floor(np.asarray(uniforms) * (high - low + 1)).astype(
      np.int64)
  return np.minimum(drawn, high)


def uniform_integer(uniform: float, low: int, high: int) -> int:
  """:func:`uniform_integers` of one Python float (no numpy overhead)."""
  return min(low + int(uniform * (high - low + 1)), high)


def check_sizes(num_clients: int, min_examples: int, max_examples: int,
                chunk_clients: int) -> None:
  """Raises unless the population's sizes make sense."""
  if num_clients < 1 or chunk_clients < 1:
    raise ValueError(f"num_clients and chunk_clients must be >= 1, got "
                     f"{num_clients}, {chunk_clients}.")
  if not 1 <= min_examples <= max_examples:
    raise ValueError(f"need 1 <= min_examples <= max_examples, got "
                     f"{min_examples}, {max_examples}.")


# ----------------------------------------------------------------------------
# FedProx Synthetic(alpha, beta)


def synthetic_test_count(num_train: int, test_fraction: float) -> int:
  """Held-out examples of a client with ``num_train`` training examples:
  ``ceil(test_fraction * num_train)``."""
  return int(math.ceil(test_fraction * num_train - 1e-9))


def synthetic_client(seed: int, index: int, alpha: float, beta: float,
                     min_examples: int, max_examples: int,
                     test_fraction: float) -> dict[str, np.ndarray]:
  """One Synthetic client, drawn alone (the reference for the chunked path).

  Draws from ``default_rng([seed, 0, index])``, in order: ``n`` (training
  examples) uniform in ``[min_examples, max_examples]``
  (:func:`uniform_integers` of one ``random()``); then one
  ``standard_normal`` vector ``z`` of ``672 + (n + t) * 60`` values,
  ``t = synthetic_test_count(n)``, read as ``u = alpha z0``, ``B = beta z1``,
  ``W [60, 10] = u + z[2:602]``, ``b [10] = u + z[602:612]``, ``v [60] = B +
  z[612:672]`` and ``x [n + t, 60] = v + sqrt(Sigma) z[672:]``; ``y =
  argmax(x W + b)``. The first ``n`` rows are training, the last ``t`` test.

  Returns:
    ``w`` ``[60, 10]``, ``b`` ``[10]``, ``v`` ``[60]`` (float64), ``x_train``
    ``float32 [n, 60]``, ``y_train`` ``int32 [n]``, ``x_test``, ``y_test``.
  """
  rng = np.random.default_rng([seed, TRAIN, index])
  num_train = int(uniform_integers(rng.random(), min_examples, max_examples))
  num_rows = num_train + synthetic_test_count(num_train, test_fraction)
  z = rng.standard_normal(_MODEL_DRAWS + num_rows * _NUM_FEATURES)
  w = alpha * z[0] + z[2:_W_END].reshape(_NUM_FEATURES, _NUM_CLASSES)
  b = alpha * z[0] + z[_W_END:_B_END]
  v = beta * z[1] + z[_B_END:_MODEL_DRAWS]
  x = v + np.sqrt(synthetic.feature_variances()) * z[_MODEL_DRAWS:].reshape(
      num_rows, _NUM_FEATURES)
  y = np.argmax(x @ w + b, axis=1).astype(np.int32)
  x = x.astype(np.float32)
  return {"w": w, "b": b, "v": v, "x_train": x[:num_train],
          "y_train": y[:num_train], "x_test": x[num_train:],
          "y_test": y[num_train:]}


def _synthetic_chunk(indices: np.ndarray, seed: int, alpha: float,
                     beta: float, min_examples: int, max_examples: int,
                     test_fraction: float) -> dict[str, Any]:
  """:func:`synthetic_client` for each of ``indices``, vectorised: each
  client's draws fill one zero-padded row, so shapes (hence every float
  operation) do not depend on the chunk."""
  max_rows = max_examples + synthetic_test_count(max_examples, test_fraction)
  draws = np.zeros((len(indices), _MODEL_DRAWS + max_rows * _NUM_FEATURES))
  num_train = np.empty(len(indices), np.int64)
  num_test = np.empty(len(indices), np.int64)
  test_counts = {n: synthetic_test_count(n, test_fraction)
                 for n in range(min_examples, max_examples + 1)}
  for row, index in enumerate(indices):
    rng = np.random.default_rng([seed, TRAIN, int(index)])
    size = uniform_integer(rng.random(), min_examples, max_examples)
    num_train[row], num_test[row] = size, test_counts[size]
    rng.standard_normal(out=draws[row, :_MODEL_DRAWS + (
        size + test_counts[size]) * _NUM_FEATURES])
  model_means = alpha * draws[:, 0]
  w = model_means[:, None, None] + draws[:, 2:_W_END].reshape(
      -1, _NUM_FEATURES, _NUM_CLASSES)
  b = model_means[:, None] + draws[:, _W_END:_B_END]
  v = beta * draws[:, 1:2] + draws[:, _B_END:_MODEL_DRAWS]
  x = v[:, None, :] + np.sqrt(synthetic.feature_variances()) * draws[
      :, _MODEL_DRAWS:].reshape(-1, max_rows, _NUM_FEATURES)
  y = np.argmax(np.matmul(x, w) + b[:, None, :], axis=2).astype(np.int32)
  position = np.arange(max_rows)
  train_rows = position < num_train[:, None]
  test_rows = ~train_rows & (position < (num_train + num_test)[:, None])
  return {
      "train": ({"x": x[train_rows].astype(np.float32), "y": y[train_rows]},
                num_train),
      "test": ({"x": x[test_rows].astype(np.float32), "y": y[test_rows]},
               num_test)}


def write_synthetic_population(
    directory: str, num_clients: int, alpha: float = 1.0, beta: float = 1.0,
    min_examples: int = 10, max_examples: int = 50, seed: int = 0,
    test_fraction: float = 0.2,
    chunk_clients: int = DEFAULT_CHUNK_CLIENTS,
    progress: ProgressFn | None = None) -> str:
  """Writes ``num_clients`` FedProx Synthetic(alpha, beta) clients.

  The model (per-client ``W_k``, ``b_k``, ``v_k``; 60 features, 10 classes)
  is that of :mod:`fedjax_lab.data.sources.synthetic`; sizes differ: each
  client holds ``n_k`` training examples, uniform in ``[min_examples,
  max_examples]``, plus ``ceil(test_fraction * n_k)`` held-out examples of
  the same distribution in the test store (same client ids). Draws follow
  :func:`synthetic_client`.

  Args:
    directory: new folder (must not exist).
    num_clients: clients (e.g. up to 1,000,000).
    alpha: std of the per-client model means ``u_k``.
    beta: std of the per-client input means ``B_k``.
    min_examples: fewest training examples of a client.
    max_examples: most training examples of a client.
    seed: fixes every draw.
    test_fraction: held-out examples per training example.
    chunk_clients: clients drawn and written at a time (memory, not data).
    progress: called ``(split, clients done, clients)`` after each chunk.

  Returns:
    ``directory``: ``x`` ``float32 [*, 60]``, ``y`` ``int32 [*]``.
  """
  check_sizes(num_clients, min_examples, max_examples, chunk_clients)
  if alpha < 0 or beta < 0 or test_fraction <= 0:
    raise ValueError(f"need alpha, beta >= 0 and test_fraction > 0, got "
                     f"{alpha}, {beta}, {test_fraction}.")
  params = {"num_clients": num_clients, "alpha": alpha, "beta": beta,
            "min_examples": min_examples, "max_examples": max_examples,
            "seed": seed, "test_fraction": test_fraction}
  info = {
      "source": f"generated: FedProx Synthetic({alpha:g}, {beta:g}) "
                f"population of {num_clients} clients",
      "provenance": ("Li et al. 2020 (FedProx) synthetic model with sizes "
                     "uniform in [min_examples, max_examples]; client k "
                     "draws from numpy default_rng([seed, 0, k])"),
      "generator": "fedjax_lab.data.populations.write_synthetic_population",
      "scheme_version": SCHEME_VERSION, **params}
  with disk.DatasetWriter(directory, name="synthetic_population",
                          num_classes=_NUM_CLASSES,
                          input_shape=(_NUM_FEATURES,), info=info) as writer:
    for start in range(0, num_clients, chunk_clients):
      indices = np.arange(start, min(start + chunk_clients, num_clients))
      chunk = _synthetic_chunk(indices, seed, alpha, beta, min_examples,
                               max_examples, test_fraction)
      for split in disk.SPLITS:  # Same clients (and ids) in both splits.
        features, sizes = chunk[split]
        writer.add_clients(split, [str(k) for k in indices], features, sizes)
      if progress is not None:
        progress("train", int(indices[-1]) + 1, num_clients)
  return writer.directory
