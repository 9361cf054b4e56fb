"""A dataset written to disk by :func:`fedjax_lab.data.disk.write_dataset`.

``--config.data.name=disk --config.data.path=DIR`` trains on it with its
feature columns memory-mapped (:mod:`fedjax_lab.data.disk`).
"""

from __future__ import annotations

from fedjax_lab.data import disk
from fedjax_lab.data.federated import FederatedDataset


def load(path: str = "", mmap: bool = True) -> FederatedDataset:
  """Opens the dataset written under ``path``.

  Raises:
    ValueError: no ``path`` given.
    FileNotFoundError: nothing was written there.
  """
  if not path:
    raise ValueError("data.name='disk' needs data.path, the folder "
                     "fedjax_lab.data.disk.write_dataset wrote.")
  return disk.open_dataset(path, mmap=mmap)
