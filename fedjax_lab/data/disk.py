"""Federated datasets on disk: memory-mapped columns with a per-client index.

A dataset is written once (:func:`write_dataset`, from any source) as one
``.npy`` file per feature column plus the ``offsets`` index and the client
ids, per split::

  DIR/dataset.json                 name, classes, input shape, info, format
  DIR/train/offsets.npy            [num_clients + 1] int64
  DIR/train/client_ids.npy         [num_clients] str
  DIR/train/feature-<name>.npy     [total_examples, ...] one per feature
  DIR/test/...

:func:`open_dataset` maps the columns read-only (``numpy.load(...,
mmap_mode="r")``), so opening costs the index only and a cohort reads just
its clients' rows: building a round's batch touches O(cohort) data whatever
the population (``tests/data/test_disk.py`` measures it). The result is an
ordinary :class:`~fedjax_lab.data.federated.FederatedDataset`: every sampler,
the cohort builder and the runner use it unchanged. A written dataset is
registered as source ``"disk"`` (``--config.data.name=disk
--config.data.path=DIR``).

Writes go to a temporary sibling folder renamed into place at the end, so a
crash never leaves a half-written dataset under ``DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from fedjax_lab.data.federated import ClientStore, FederatedDataset

FORMAT = "fedjax_lab.columns"
FORMAT_VERSION = 1
META_FILE = "dataset.json"
SPLITS = ("train", "test")
_FEATURE_PREFIX = "feature-"


def _write_store(store: ClientStore, directory: str) -> dict[str, Any]:
  """Writes one split's columns; returns its description for the metadata."""
  os.makedirs(directory)
  np.save(os.path.join(directory, "offsets.npy"),
          np.asarray(store.offsets, np.int64))
  np.save(os.path.join(directory, "client_ids.npy"),
          np.asarray(store.client_ids).astype(str))
  features = {}
  for name, column in store.features.items():
    if not name or "/" in name or os.sep in name:
      raise ValueError(f"feature name {name!r} cannot be a file name.")
    column = np.asarray(column)
    np.save(os.path.join(directory, f"{_FEATURE_PREFIX}{name}.npy"), column)
    features[name] = {"dtype": column.dtype.str,
                      "shape": list(column.shape[1:])}
  return {"num_clients": store.num_clients,
          "num_examples": store.num_examples, "features": features}


def write_dataset(dataset: FederatedDataset, directory: str) -> str:
  """Writes ``dataset`` under ``directory`` (which must not exist yet).

  Returns:
    ``directory``.

  Raises:
    FileExistsError: ``directory`` exists (nothing is overwritten).
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory):
    raise FileExistsError(f"{directory} exists; write a dataset to a new "
                          "folder (nothing was changed).")
  staging = f"{directory}.partial"
  if os.path.exists(staging):
    shutil.rmtree(staging)
  os.makedirs(staging)
  try:
    splits = {split: _write_store(getattr(dataset, split),
                                  os.path.join(staging, split))
              for split in SPLITS}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "name": dataset.name, "num_classes": int(dataset.num_classes),
            "input_shape": [int(d) for d in dataset.input_shape],
            "info": json.loads(json.dumps(dict(dataset.info), default=str)),
            "splits": splits}
    with open(os.path.join(staging, META_FILE), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(staging, directory)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return directory


def _open_store(directory: str, description: dict[str, Any],
                mmap: bool) -> ClientStore:
  """One split's store with its columns mapped (or read, ``mmap=False``)."""
  mode = "r" if mmap else None
  offsets = np.load(os.path.join(directory, "offsets.npy"))
  client_ids = np.load(os.path.join(directory, "client_ids.npy"))
  features = {
      name: np.load(os.path.join(directory, f"{_FEATURE_PREFIX}{name}.npy"),
                    mmap_mode=mode)
      for name in description["features"]}
  return ClientStore(client_ids, offsets, features)


def open_dataset(directory: str, mmap: bool = True) -> FederatedDataset:
  """The dataset :func:`write_dataset` wrote under ``directory``.

  Args:
    directory: the folder written by :func:`write_dataset`.
    mmap: map the feature columns read-only (default; pages are read on
      demand) or load them into memory.

  Raises:
    FileNotFoundError: no dataset there (the message says how to write one).
    ValueError: the folder holds another format or version.
  """
  meta_path = os.path.join(directory, META_FILE)
  if not os.path.isfile(meta_path):
    raise FileNotFoundError(
        f"{directory} holds no dataset ({META_FILE} is missing); write one "
        "with fedjax_lab.data.disk.write_dataset(dataset, directory).")
  with open(meta_path) as f:
    meta = json.load(f)
  if (meta.get("format") != FORMAT or
      meta.get("format_version") != FORMAT_VERSION):
    raise ValueError(
        f"{meta_path} is format {meta.get('format')!r} version "
        f"{meta.get('format_version')!r}; this version reads {FORMAT!r} "
        f"version {FORMAT_VERSION}. Write the dataset again.")
  stores = {split: _open_store(os.path.join(directory, split),
                               meta["splits"][split], mmap)
            for split in SPLITS}
  return FederatedDataset(
      name=meta["name"], train=stores["train"], test=stores["test"],
      num_classes=meta["num_classes"],
      input_shape=tuple(meta["input_shape"]),
      info={**meta["info"], "on_disk": os.path.abspath(directory)})
