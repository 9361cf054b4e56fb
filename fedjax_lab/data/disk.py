"""Federated datasets on disk: memory-mapped columns with a per-client index.

A dataset is written once (:func:`write_dataset`, from any source, or a
:class:`DatasetWriter`, chunk by chunk, for populations larger than memory)
as one ``.npy`` file per feature column plus the ``offsets`` index and the
client ids, per split::

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

import io
import json
import mmap as mmap_lib
import os
import shutil
from typing import Any, Mapping, Sequence

import numpy as np

from fedjax_lab.data.federated import ClientStore, FederatedDataset

FORMAT = "fedjax_lab.columns"
FORMAT_VERSION = 1
META_FILE = "dataset.json"
SPLITS = ("train", "test")
_FEATURE_PREFIX = "feature-"


def _check_feature_name(name: str) -> None:
  """Raises unless ``name`` can be part of a file name."""
  if not name or "/" in name or os.sep in name:
    raise ValueError(f"feature name {name!r} cannot be a file name.")


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
  """The ``.npy`` (version 1.0) header ``numpy.save`` writes for an array of
  ``dtype`` and ``shape``. numpy pads it so the header of any first-axis
  length has the same size, which lets :class:`_GrowingColumn` rewrite it in
  place once the final length is known."""
  buffer = io.BytesIO()
  np.lib.format.write_array_header_1_0(
      buffer, {"descr": np.lib.format.dtype_to_descr(dtype),
               "fortran_order": False, "shape": shape})
  return buffer.getvalue()


class _GrowingColumn:
  """A ``.npy`` file grown by appending rows: its bytes equal ``numpy.save``
  of all the rows, but only one appended chunk is ever in memory."""

  def __init__(self, path: str, dtype: np.dtype, row_shape: tuple[int, ...]):
    if dtype.hasobject:
      raise ValueError(f"{path}: dtype {dtype} holds Python objects, which "
                       "cannot be memory-mapped; convert it to a numeric or "
                       "fixed-width string dtype.")
    self.dtype, self.row_shape, self.num_rows = dtype, row_shape, 0
    self._header_size = len(_npy_header(dtype, (0,) + row_shape))
    self._file = open(path, "wb")
    self._file.write(_npy_header(dtype, (0,) + row_shape))

  def append(self, rows: np.ndarray) -> None:
    """Appends ``rows`` (``[n, *row_shape]``, same dtype) to the file."""
    rows = np.asarray(rows)
    if rows.dtype != self.dtype or rows.shape[1:] != self.row_shape:
      raise ValueError(
          f"{self._file.name}: rows are {rows.dtype} {rows.shape[1:]}, the "
          f"column is {self.dtype} {self.row_shape}; every chunk must match "
          "the first.")
    np.ascontiguousarray(rows).tofile(self._file)
    self.num_rows += len(rows)

  def close(self) -> None:
    """Writes the header of the final length and closes the file."""
    header = _npy_header(self.dtype, (self.num_rows,) + self.row_shape)
    if len(header) != self._header_size:  # numpy's padding makes this rare.
      raise ValueError(f"{self._file.name}: the .npy header grew from "
                       f"{self._header_size} to {len(header)} bytes.")
    self._file.seek(0)
    self._file.write(header)
    self._file.close()

  def abandon(self) -> None:
    """Closes the file as it is (the caller deletes it)."""
    self._file.close()


class _SplitColumns:
  """The files of one split being written: offsets, client ids, features."""

  def __init__(self, directory: str):
    os.makedirs(directory)
    self.directory = directory
    self.offsets = _GrowingColumn(os.path.join(directory, "offsets.npy"),
                                  np.dtype(np.int64), ())
    self.offsets.append(np.zeros([1], np.int64))
    self.num_examples = 0
    self.features: dict[str, _GrowingColumn] = {}
    # Ids are kept in a scratch file until the widest one is known.
    self._ids_path = os.path.join(directory, "client_ids.chunks")
    self._ids_file = open(self._ids_path, "wb")
    self._id_chunks, self._id_width, self.num_clients = 0, 1, 0

  def add(self, client_ids: np.ndarray, features: Mapping[str, np.ndarray],
          sizes: np.ndarray) -> None:
    """Appends clients (see :meth:`DatasetWriter.add_clients`)."""
    ids = np.asarray(client_ids).astype(str)
    sizes = np.asarray(sizes, np.int64)
    if ids.ndim != 1 or sizes.shape != ids.shape:
      raise ValueError(f"client_ids {ids.shape} and sizes {sizes.shape} must "
                       "be 1-D and of the same length.")
    if np.any(sizes < 0):
      raise ValueError("sizes must be non-negative.")
    num_rows = int(sizes.sum())
    if not features or (self.features and set(features) != set(
        self.features)):
      raise ValueError(f"features {sorted(features)} must be non-empty and "
                       f"the same in every chunk ({sorted(self.features)}).")
    for name, column in features.items():
      if len(column) != num_rows:
        raise ValueError(f"feature {name!r} has {len(column)} rows; the "
                         f"sizes add up to {num_rows}.")
    for name, column in features.items():
      if name not in self.features:
        _check_feature_name(name)
        column = np.asarray(column)
        self.features[name] = _GrowingColumn(
            os.path.join(self.directory, f"{_FEATURE_PREFIX}{name}.npy"),
            column.dtype, column.shape[1:])
      self.features[name].append(column)
    self.offsets.append(self.num_examples + np.cumsum(sizes))
    self.num_examples += num_rows
    np.save(self._ids_file, ids)
    self._id_chunks += 1
    self._id_width = max(self._id_width, ids.dtype.itemsize // 4)
    self.num_clients += len(ids)

  def close(self) -> dict[str, Any]:
    """Finishes every file; returns the split's description."""
    if not self.features:
      raise ValueError(f"{self.directory}: no clients were added (call "
                       "add_clients, even with zero clients, for each split).")
    self._ids_file.close()
    ids = _GrowingColumn(os.path.join(self.directory, "client_ids.npy"),
                         np.dtype(f"<U{self._id_width}"), ())
    with open(self._ids_path, "rb") as f:
      for _ in range(self._id_chunks):
        ids.append(np.load(f).astype(ids.dtype))
    ids.close()
    os.remove(self._ids_path)
    self.offsets.close()
    for column in self.features.values():
      column.close()
    return {"num_clients": self.num_clients,
            "num_examples": self.num_examples,
            "features": {name: {"dtype": column.dtype.str,
                                "shape": list(column.row_shape)}
                         for name, column in self.features.items()}}

  def abandon(self) -> None:
    """Closes the open files (the staging folder is removed after)."""
    for column in (self.offsets, *self.features.values()):
      column.abandon()
    self._ids_file.close()


class DatasetWriter:
  """Writes a dataset chunk by chunk, in memory O(chunk) whatever its size.

  Use as a context manager::

    with DatasetWriter(directory, name="pop", num_classes=10,
                       input_shape=(60,)) as writer:
      for chunk in chunks:
        writer.add_clients("train", ids, {"x": x, "y": y}, sizes)
      writer.add_clients("test", ...)

  The files are byte for byte those :func:`write_dataset` (``numpy.save``)
  writes for the concatenated chunks. Everything goes to ``directory +
  ".partial"``, renamed to ``directory`` when the block ends without an
  exception; an exception (or a killed process) leaves nothing under
  ``directory``. ``writer.info`` may be updated inside the block (e.g. with
  totals known only at the end).
  """

  def __init__(self, directory: str, *, name: str, num_classes: int,
               input_shape: Sequence[int],
               info: Mapping[str, Any] | None = None):
    """Args: the folder (must not exist yet) and the dataset's metadata, as
    in :class:`~fedjax_lab.data.federated.FederatedDataset`.

    Raises:
      FileExistsError: ``directory`` exists (nothing is overwritten).
    """
    self.directory = os.path.abspath(directory)
    if os.path.exists(self.directory):
      raise FileExistsError(f"{self.directory} exists; write a dataset to a "
                            "new folder (nothing was changed).")
    self.name, self.num_classes = name, int(num_classes)
    self.input_shape = [int(d) for d in input_shape]
    self.info: dict[str, Any] = dict(info or {})
    self._staging = f"{self.directory}.partial"
    self._splits: dict[str, _SplitColumns] = {}

  def __enter__(self) -> "DatasetWriter":
    if os.path.exists(self._staging):
      shutil.rmtree(self._staging)
    os.makedirs(self._staging)
    return self

  def add_clients(self, split: str, client_ids: Sequence[str] | np.ndarray,
                  features: Mapping[str, np.ndarray],
                  sizes: Sequence[int] | np.ndarray) -> None:
    """Appends clients to ``split`` (``"train"`` or ``"test"``).

    Args:
      split: which store.
      client_ids: ``[K]`` ids of the clients, in order.
      features: name -> ``[sum(sizes), ...]`` rows of these clients, grouped
        by client in ``client_ids`` order; the same names, dtypes and row
        shapes in every call.
      sizes: ``[K]`` examples of each client.
    """
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    if split not in self._splits:
      self._splits[split] = _SplitColumns(os.path.join(self._staging, split))
    self._splits[split].add(np.asarray(client_ids), features, sizes)

  def _finish(self) -> None:
    """Closes every split, writes the metadata, renames into place."""
    missing = [s for s in SPLITS if s not in self._splits]
    if missing:
      raise ValueError(f"no clients were added to split(s) {missing}.")
    splits = {split: self._splits.pop(split).close() for split in SPLITS}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "name": self.name, "num_classes": self.num_classes,
            "input_shape": self.input_shape,
            "info": json.loads(json.dumps(self.info, default=str)),
            "splits": splits}
    with open(os.path.join(self._staging, META_FILE), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
    os.replace(self._staging, self.directory)

  def __exit__(self, exc_type, exc, traceback) -> None:
    try:
      if exc_type is None:
        self._finish()
    finally:
      if os.path.exists(self._staging):  # An error: remove every trace.
        for columns in self._splits.values():
          columns.abandon()
        shutil.rmtree(self._staging, ignore_errors=True)


def write_dataset(dataset: FederatedDataset, directory: str) -> str:
  """Writes ``dataset`` under ``directory`` (which must not exist yet).

  Returns:
    ``directory``.

  Raises:
    FileExistsError: ``directory`` exists (nothing is overwritten).
  """
  with DatasetWriter(directory, name=dataset.name,
                     num_classes=dataset.num_classes,
                     input_shape=dataset.input_shape,
                     info=dataset.info) as writer:
    for split in SPLITS:
      store = getattr(dataset, split)
      writer.add_clients(split, store.client_ids, store.features,
                         store.client_sizes)
  return writer.directory


def _open_store(directory: str, description: dict[str, Any],
                mmap: bool) -> ClientStore:
  """One split's store with its columns mapped (or read, ``mmap=False``)."""
  mode = "r" if mmap else None
  offsets = np.load(os.path.join(directory, "offsets.npy"))
  client_ids = np.load(os.path.join(directory, "client_ids.npy"))
  features = {
      name: _advise_random(np.load(
          os.path.join(directory, f"{_FEATURE_PREFIX}{name}.npy"),
          mmap_mode=mode))
      for name in description["features"]}
  return ClientStore(client_ids, offsets, features)


def _advise_random(column: np.ndarray) -> np.ndarray:
  """Tells the kernel a mapped column is read at scattered rows (a cohort's
  clients): no read-around of neighbouring pages on a fault. With the
  default read-around (8 MB on some disks) every client touched pulls in,
  and maps, far more than its rows: a 1,000-client cohort of a 10^6-client
  image population mapped ~300 MB per round instead of its ~50 MB."""
  handle = getattr(column, "_mmap", None)
  if handle is not None and hasattr(mmap_lib, "MADV_RANDOM"):
    handle.madvise(mmap_lib.MADV_RANDOM)
  return column


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
