"""Federated datasets from FedJAX's SQLite files (a local copy).

FedJAX (``fedjax.core.sqlite_federated_data``) stores a split as one SQLite
file with the table::

  CREATE TABLE federated_data (
    client_id BLOB NOT NULL PRIMARY KEY,   -- the client id, bytes
    data BLOB NOT NULL,                    -- zlib(msgpack(examples))
    num_examples INTEGER NOT NULL);

read in ``rowid`` order. ``examples`` is a dict feature name -> numpy array
(first axis = the client's examples), msgpack-encoded with FedJAX's extension
types (``fedjax/core/serialization.py``):

* ext 1, a numeric ndarray: the payload is a msgpack array
  ``[shape, dtype name (e.g. "float32"), C-order bytes]``;
* ext 4, an ndarray of byte strings: ``[shape, [bytes, ...]]`` (flattened);
* ext 3, a numpy scalar: like ext 1 with shape ``[]``;
* ext 2, a complex number: ``[real, imag]``.

FedJAX's files (``federated_emnist_{train,test}.sqlite``,
``federated_emnist_digitsonly_{train,test}.sqlite``,
``shakespeare_{train,test}.sqlite``,
``stackoverflow_{train,held_out,test}.sqlite`` with the vocabulary file
``stackoverflow.word_count``, and ``federated_cifar100_{train,test}.sqlite``
that FedJAX writes from TFF's CIFAR-100) hold the same raw features as TFF's
HDF5 files: EMNIST ``pixels`` float32 ``[n, 28, 28]`` (1.0 = background) and
``label`` int32; Shakespeare ``snippets`` (byte strings); Stack Overflow
``tokens``, ``title``, ``tags``, ``creation_date``, ``type`` (byte strings)
and ``score`` int64; CIFAR-100 ``image`` uint8 ``[n, 32, 32, 3]``, ``label``
and ``coarse_label`` int64. They are converted exactly as TFF's HDF5 files
(:mod:`fedjax_lab.data.sources.tff_h5`) are, by
:mod:`fedjax_lab.data.sources.federated_files` (same ``x``/``y``,
tokenizers, options and vocabulary rules); see that module. Client ids are
the ``client_id`` bytes decoded as UTF-8.

Use it with ``data.name = "fedjax_sqlite"`` and ``data.path =
DIR_OR_TRAIN_FILE`` in the config.
"""

from __future__ import annotations

import sqlite3
import zlib
from typing import Any

import msgpack
import numpy as np

from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.data.sources import federated_files
from fedjax_lab.data.sources.federated_files import FileLayoutError

# kind -> (train, test) file names FedJAX downloads or writes.
CANONICAL_FILES = {
    "emnist": (("federated_emnist_train.sqlite",
                "federated_emnist_test.sqlite"),
               ("federated_emnist_digitsonly_train.sqlite",
                "federated_emnist_digitsonly_test.sqlite")),
    "shakespeare": (("shakespeare_train.sqlite", "shakespeare_test.sqlite"),),
    "stackoverflow": (("stackoverflow_train.sqlite",
                       "stackoverflow_test.sqlite"),),
    "cifar100": (("federated_cifar100_train.sqlite",
                  "federated_cifar100_test.sqlite"),),
}

SQLITE_LAYOUT = (
    "FedJAX's SQLite federated data: a table federated_data(client_id BLOB, "
    "data BLOB, num_examples INTEGER) whose data is zlib-compressed msgpack "
    "of a dict of arrays in FedJAX's encoding")

# FedJAX's msgpack extension type codes.
EXT_NDARRAY, EXT_COMPLEX, EXT_SCALAR, EXT_BYTES_NDARRAY = 1, 2, 3, 4


class _DecodeError(Exception):
  """A blob that is not FedJAX's encoding (turned into FileLayoutError)."""


def _numeric_array(payload: bytes) -> np.ndarray:
  shape, dtype_name, buffer = msgpack.unpackb(payload, raw=True)
  if isinstance(dtype_name, bytes):
    dtype_name = dtype_name.decode("ascii")
  try:
    dtype = np.dtype(dtype_name)
  except TypeError:
    raise _DecodeError(f"unknown array dtype {dtype_name!r}") from None
  return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code: int, payload: bytes) -> Any:
  if code == EXT_NDARRAY:
    return _numeric_array(payload)
  if code == EXT_SCALAR:
    return _numeric_array(payload)[()]
  if code == EXT_BYTES_NDARRAY:
    shape, flat = msgpack.unpackb(payload, raw=True)
    column = np.empty(len(flat), dtype=object)
    column[:] = flat
    return column.reshape(shape)
  if code == EXT_COMPLEX:
    real, imag = msgpack.unpackb(payload)
    return complex(real, imag)
  raise _DecodeError(f"unknown msgpack extension type {code}")


def decode_examples(blob: bytes) -> dict[str, np.ndarray]:
  """A ``data`` blob -> its dict of arrays (FedJAX's encoding, above).

  Raises:
    ValueError: the blob is not zlib-compressed msgpack of a dict.
  """
  try:
    examples = msgpack.unpackb(zlib.decompress(blob), ext_hook=_ext_hook,
                               raw=False)
  except (zlib.error, ValueError, TypeError, _DecodeError,
          msgpack.exceptions.UnpackException) as e:
    raise ValueError(f"{type(e).__name__}: {e}") from None
  if not isinstance(examples, dict):
    raise ValueError(f"decoded a {type(examples).__name__}, not a dict of "
                     "arrays")
  return examples


def _client_id(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


class _SQLiteSplit(federated_files.SplitReader):
  """One FedJAX SQLite file, opened read-only."""

  def __init__(self, path: str, max_clients: int):
    self.path = path
    self._limit = max_clients if max_clients else -1
    self._connection = federated_files.open_sqlite(path, SQLITE_LAYOUT)
    try:
      columns = {row[1] for row in self._connection.execute(
          "PRAGMA table_info(federated_data)")}
    except sqlite3.DatabaseError as e:
      self._connection.close()
      raise FileLayoutError(f"{path} is not an SQLite database ({e}); "
                            f"expected {SQLITE_LAYOUT}.") from None
    if not columns:
      self._connection.close()
      raise FileLayoutError(f"{path} has no table federated_data; expected "
                            f"{SQLITE_LAYOUT}.")
    if not {"client_id", "data", "num_examples"} <= columns:
      self._connection.close()
      raise FileLayoutError(
          f"{path}: table federated_data has columns {sorted(columns)}; "
          f"expected {SQLITE_LAYOUT}.")

  def _rows(self):
    return self._connection.execute(
        "SELECT client_id, data, num_examples FROM federated_data "
        "ORDER BY rowid LIMIT ?", (self._limit,))

  def _decode(self, client_id: str, blob: Any) -> dict[str, np.ndarray]:
    if not isinstance(blob, bytes):
      raise FileLayoutError(
          f"{self.path}: client {client_id!r}: data is "
          f"{type(blob).__name__}, not a BLOB; expected {SQLITE_LAYOUT}.")
    try:
      return decode_examples(blob)
    except ValueError as e:
      raise FileLayoutError(
          f"{self.path}: client {client_id!r}: cannot decode data ({e}); "
          f"expected {SQLITE_LAYOUT}.") from None

  def feature_names(self) -> set[str]:
    row = self._rows().fetchone()
    if row is None:
      raise FileLayoutError(f"{self.path}: table federated_data is empty.")
    return set(self._decode(_client_id(row[0]), row[1]))

  def clients(self, names):
    for raw_id, blob, num_examples in self._rows():
      client_id = _client_id(raw_id)
      examples = self._decode(client_id, blob)
      missing = [n for n in names if n not in examples]
      if missing:
        raise FileLayoutError(
            f"{self.path}: client {client_id!r} has features "
            f"{sorted(examples)}, lacking {missing}; every client of this "
            f"dataset needs {list(names)} ({SQLITE_LAYOUT}).")
      raw = {n: np.asarray(examples[n]) for n in names}
      lengths = {n: (len(a) if a.ndim else None) for n, a in raw.items()}
      if set(lengths.values()) != {num_examples}:
        raise FileLayoutError(
            f"{self.path}: client {client_id!r} has num_examples="
            f"{num_examples} but features of lengths {lengths}.")
      yield client_id, raw

  def close(self) -> None:
    self._connection.close()


def load(path: str = "", test_path: str = "", kind: str = "",
         max_clients: int = 0, sequence_length: int = 0,
         vocab_size: int = federated_files.DEFAULT_VOCAB_SIZE,
         word_count_path: str = "",
         max_examples_per_client: int = (
             federated_files.DEFAULT_MAX_EXAMPLES_PER_CLIENT),
         invert_pixels: bool = True) -> FederatedDataset:
  """A FedJAX SQLite dataset; options as :func:`tff_h5.load`'s.

  Args:
    path: a folder holding FedJAX's files under their usual names (e.g.
      ``federated_emnist_train.sqlite`` and ``federated_emnist_test.sqlite``),
      or the train file.
    test_path: the test file (default: the folder's, or the train file's
      name with ``_train`` replaced by ``_test``); e.g.
      ``stackoverflow_held_out.sqlite``.
    kind, max_clients, sequence_length, vocab_size, word_count_path,
    max_examples_per_client, invert_pixels: as in
      :func:`fedjax_lab.data.sources.tff_h5.load`; ``max_clients`` takes the
      first clients in ``rowid`` order.

  Raises:
    FileNotFoundError: a file does not exist.
    FileLayoutError: a file is not laid out as FedJAX's (the message says
      how).
    ValueError: no ``path``, an unknown ``kind`` or an invalid option.
  """
  return federated_files.load_split_files(
      _SQLiteSplit, source="fedjax_sqlite", prefix="fedjax",
      layout=SQLITE_LAYOUT, canonical=CANONICAL_FILES,
      info={"source": "FedJAX SQLite federated data (local files)"},
      path=path, test_path=test_path, kind=kind, max_clients=max_clients,
      sequence_length=sequence_length, vocab_size=vocab_size,
      word_count_path=word_count_path,
      max_examples_per_client=max_examples_per_client,
      invert_pixels=invert_pixels)
