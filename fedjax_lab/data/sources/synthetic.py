"""FedProx Synthetic(alpha, beta) and Synthetic-IID federated datasets.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith 2020, "Federated Optimization in
Heterogeneous Networks" (FedProx), Section 5.1 and their data generator: each
client ``k`` has its own softmax-regression model and its own input
distribution:

  * size ``n_k = int(lognormal(mean=4, sigma=2)) + 50``;
  * ``u_k ~ N(0, alpha^2)``; ``W_k [60, 10] ~ N(u_k, 1)``, ``b_k [10] ~ N(u_k, 1)``
    (``alpha`` controls how much the models differ);
  * ``B_k ~ N(0, beta^2)``; ``v_k [60] ~ N(B_k, 1)`` (``beta`` controls how much
    the inputs differ);
  * ``x ~ N(v_k, Sigma)``, ``Sigma`` diagonal with ``Sigma_jj = (j + 1)^-1.2``;
  * ``y = argmax(softmax(W_k^T x + b_k))``.

``alpha`` and ``beta`` are standard deviations. Synthetic-IID uses one global
``W, b ~ N(0, 1)`` and ``x ~ N(0, Sigma)`` for every client.

The lognormal(4, 2) sizes are heavy-tailed, exactly as in the FedProx code.
For ``seed=0`` and 30 clients they are 50..889 examples (median 91.5, 5,385 in
total; the two largest hold 31%). Other seeds can be far larger: over seeds
0..999 the largest client has median ~3,000 and 99th percentile ~43,500
examples, and the total reaches ~106,000.
The random draws here use ``numpy.random.default_rng(seed)``, so the numbers are
not those of the FedProx JSON files, only the same distribution.
"""

from __future__ import annotations

import numpy as np

from fedjax_lab.data import partition
from fedjax_lab.data.federated import ClientStore, FederatedDataset

NUM_FEATURES = 60
NUM_CLASSES = 10


def client_sizes(num_clients: int, rng: np.random.Generator) -> np.ndarray:
  """FedProx client sizes ``int(lognormal(4, 2)) + 50`` (``int64 [num_clients]``)."""
  return rng.lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50


def feature_variances() -> np.ndarray:
  """Diagonal of ``Sigma``: ``(j + 1)^-1.2`` for ``j = 0..59`` (``float64 [60]``)."""
  return np.power(np.arange(1, NUM_FEATURES + 1, dtype=np.float64), -1.2)


def generate_clients(alpha: float, beta: float, iid: bool, num_clients: int,
                     seed: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Samples every client's examples.

  Draw order (fixed, so a seed always gives the same data): sizes, then
  ``u``, ``B`` and ``v`` for all clients (drawn even for IID), then the
  global model (IID only), then per client ``W_k``, ``b_k`` (non-IID only) and
  ``x``.

  Args:
    alpha: std of the per-client model means ``u_k`` (ignored if ``iid``).
    beta: std of the per-client input means ``B_k`` (ignored if ``iid``).
    iid: Synthetic-IID instead of Synthetic(alpha, beta).
    num_clients: number of clients.
    seed: seed of ``numpy.random.default_rng``.

  Returns:
    ``(xs, ys)``: per client ``float32 [n_k, 60]`` inputs and ``int32 [n_k]``
    labels.
  """
  if num_clients < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}.")
  if alpha < 0 or beta < 0:
    raise ValueError(f"alpha and beta are standard deviations (>= 0), got "
                     f"alpha={alpha}, beta={beta}.")
  rng = np.random.default_rng(seed)
  sizes = client_sizes(num_clients, rng)
  model_means = rng.normal(0.0, alpha, num_clients)
  input_mean_centers = rng.normal(0.0, beta, num_clients)
  input_means = rng.normal(input_mean_centers[:, None], 1.0,
                           (num_clients, NUM_FEATURES))
  if iid:
    input_means = np.zeros((num_clients, NUM_FEATURES))
    global_w = rng.normal(0.0, 1.0, (NUM_FEATURES, NUM_CLASSES))
    global_b = rng.normal(0.0, 1.0, NUM_CLASSES)
  feature_std = np.sqrt(feature_variances())
  xs, ys = [], []
  for k in range(num_clients):
    if iid:
      w, b = global_w, global_b
    else:
      w = rng.normal(model_means[k], 1.0, (NUM_FEATURES, NUM_CLASSES))
      b = rng.normal(model_means[k], 1.0, NUM_CLASSES)
    x = input_means[k] + feature_std * rng.standard_normal(
        (int(sizes[k]), NUM_FEATURES))
    # argmax of softmax == argmax of the logits.
    y = np.argmax(x @ w + b, axis=1)
    xs.append(x.astype(np.float32))
    ys.append(y.astype(np.int32))
  return xs, ys


def load(alpha: float = 1.0, beta: float = 1.0, iid: bool = False,
         num_clients: int = 30, seed: int = 0,
         test_fraction: float = 0.2) -> FederatedDataset:
  """FedProx Synthetic(alpha, beta) (or Synthetic-IID) as a federated dataset.

  Each client's examples are split at random into train and test
  (:func:`fedjax_lab.data.partition.train_test_split_per_client`); both
  stores hold the same client ids ``"0" .. str(num_clients - 1)``.

  Args:
    alpha: model heterogeneity (std of ``u_k``).
    beta: input heterogeneity (std of ``B_k``).
    iid: generate Synthetic-IID instead.
    num_clients: number of clients (FedProx uses 30).
    seed: makes the whole dataset deterministic.
    test_fraction: fraction of each client's examples held out.

  Returns:
    A :class:`FederatedDataset` with ``x`` ``float32 [N, 60]`` and ``y``
    ``int32 [N]`` (10 classes).
  """
  xs, ys = generate_clients(alpha, beta, iid, num_clients, seed)
  sizes = np.array([len(y) for y in ys])
  starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
  client_rows = [np.arange(s, s + n) for s, n in zip(starts, sizes)]
  split_rng = np.random.default_rng([seed, 1])
  train_rows, test_rows = partition.train_test_split_per_client(
      client_rows, test_fraction, split_rng)
  features = {"x": np.concatenate(xs), "y": np.concatenate(ys)}
  client_ids = [str(k) for k in range(num_clients)]
  train = ClientStore.from_partition(features, train_rows, client_ids)
  test = ClientStore.from_partition(features, test_rows, client_ids)
  info = {
      "source": ("generated (no files): FedProx Synthetic-IID" if iid else
               f"generated (no files): FedProx Synthetic({alpha:g}, {beta:g})"),
      "provenance": ("Li et al. 2020, 'Federated Optimization in Heterogeneous "
                     "Networks' (FedProx), synthetic data; own implementation "
                     "with numpy.random.default_rng"),
      "alpha": alpha, "beta": beta, "iid": iid, "seed": seed,
      "num_clients": num_clients, "test_fraction": test_fraction,
      "client_sizes": sizes.tolist(),
  }
  return FederatedDataset(name="synthetic", train=train, test=test,
                          num_classes=NUM_CLASSES,
                          input_shape=(NUM_FEATURES,), info=info)
