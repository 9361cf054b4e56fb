"""scikit-learn's 8x8 handwritten digits, partitioned into clients.

``sklearn.datasets.load_digits()`` reads a file shipped with scikit-learn: the
UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin & Kaynak
1998), 1,797 images of 8x8 pixels with values 0..16. Clients are made by
:mod:`fedjax_lab.data.partition` (label-skewed Dirichlet, Hsu et al. 2019, or
IID). Tiny and fast: good for smoke tests and quick sweeps.
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
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise FileNotFoundError(
        "the digits dataset is the file digits.csv.gz shipped by the PyPI "
        "package 'scikit-learn', which is not installed: pip install "
        "scikit-learn") from None
  try:
    bunch = load_digits()
  except Exception as e:  # a missing or corrupt packaged file
    raise FileNotFoundError(
        "could not read scikit-learn's packaged digits file (sklearn/"
        f"datasets/data/digits.csv.gz: {type(e).__name__}: {e}); reinstall "
        "it with: pip install --force-reinstall scikit-learn") from None
  images = (np.asarray(bunch.images, np.float32) / 16.0)[..., None]
  labels = np.asarray(bunch.target, np.int32)
  images.setflags(write=False)  # Cached and shared: keep it immutable.
  labels.setflags(write=False)
  return images, labels


def centralized_arrays() -> dict[str, np.ndarray]:
  """All 1,797 examples: ``x`` float32 ``[1797, 8, 8, 1]`` in [0, 1], ``y`` int32."""
  images, labels = _read_arrays()
  return {"x": images, "y": labels}


def load(num_clients: int = 100, partition: str = "dirichlet",
         alpha: float = 0.3, seed: int = 0,
         test_fraction: float = 0.2) -> FederatedDataset:
  """8x8 digits as a federated dataset.

  Args:
    num_clients: number of clients.
    partition: ``"dirichlet"`` (label skew, concentration ``alpha``) or
      ``"iid"``.
    alpha: Dirichlet concentration; smaller means more skew.
    seed: makes the partition and the per-client split deterministic.
    test_fraction: fraction of each client's examples held out (same client
      ids in the test store).

  Returns:
    A :class:`FederatedDataset` with ``x`` float32 ``[N, 8, 8, 1]`` in
    ``[0, 1]`` and ``y`` int32 ``[N]``.
  """
  info = {
      "source": (f"scikit-learn {importlib.metadata.version('scikit-learn')} "
                 "load_digits(): file shipped with the package"),
      "provenance": ("UCI Optical Recognition of Handwritten Digits (test "
                     "part), 1,797 8x8 images, values 0..16; pixels / 16"),
  }
  return partition_lib.federate_labelled_arrays(
      "digits", centralized_arrays(), "y", NUM_CLASSES, num_clients, partition,
      alpha, seed, test_fraction, info)
