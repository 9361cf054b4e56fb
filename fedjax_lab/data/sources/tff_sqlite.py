"""Federated datasets from TensorFlow Federated's SQLite files (a local copy).

Newer ``tff.simulation.datasets`` releases download EMNIST, Shakespeare,
Stack Overflow and CIFAR-100 as one LZMA-compressed SQLite database per
dataset (every split in it), read by TFF's ``SqlClientData``. Train on such a
file with ``data.name = "tff_sqlite"`` and ``data.path = DIR_OR_FILE``; no
TensorFlow is needed and nothing is downloaded.

Checked in google-parfait/tensorflow-federated,
``tensorflow_federated/python/simulation/datasets/``:

* ``sql_client_data.py``: tables ``examples(split_name TEXT, client_id TEXT,
  serialized_example_proto BLOB)``, one row per example holding a serialized
  ``tf.train.Example``, and ``client_metadata(client_id, split_name,
  num_examples)``. A split's clients: ``SELECT DISTINCT client_id FROM
  client_metadata WHERE split_name = ...``, sorted; a client's examples: its
  ``examples`` rows of that split, unordered (SQLite's rowid order).
  ``sql_client_data_utils.py`` writes the same tables.
* ``download.py``: ``<name>.sqlite.lzma`` is decompressed
  (``lzma.LZMADecompressor``) to ``<name>.sqlite`` (in ``~/.tff``).
* the file, split names and ``tf.io.parse_example`` spec of each dataset:
  ``emnist.py``: ``emnist_all.sqlite``, ``all_train`` / ``all_test`` (62
  classes) and ``digits_only_train`` / ``digits_only_test`` (10); ``pixels``
  float [28, 28], ``label`` int64 [] cast to int32. ``shakespeare.py``:
  ``shakespeare.sqlite``, ``train`` / ``test``; ``snippets`` string [].
  ``stackoverflow.py``: ``stackoverflow.sqlite``, ``train`` / ``heldout`` /
  ``test``; ``tokens``, ``title``, ``tags``, ``creation_date``, ``type``
  string [], ``score`` int64 []. ``cifar100.py``: ``cifar100.sqlite``,
  ``train`` / ``test``; ``image`` int64 [32, 32, 3] cast to uint8, ``label``,
  ``coarse_label`` int64 [].
* tensorflow/tensorflow ``tensorflow/core/example/{example,feature}.proto``:
  ``Example{Features features = 1}``, ``Features{map<string, Feature> feature
  = 1}``, ``Feature{oneof kind {BytesList bytes_list = 1; FloatList
  float_list = 2; Int64List int64_list = 3}}``, each list ``repeated ...
  value = 1`` (float and int64 packed).

The Examples are parsed with ``protobuf`` (message classes built here from
those field numbers); each feature is stacked over a client's examples with
TFF's shape and dtype, i.e. as TFF's HDF5 files held it, so
:mod:`fedjax_lab.data.sources.federated_files` converts it exactly as for
:mod:`fedjax_lab.data.sources.tff_h5` (same ``x``/``y``, options). Clients
come in ``ORDER BY client_id`` order (UTF-8 byte order = Python's
``sorted``, as TFF), examples in rowid order. A ``.sqlite.lzma`` file is
decompressed once, beside it, to the ``.sqlite`` name TFF uses.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import lzma
import os
import shutil
import sqlite3
from typing import Any, Sequence

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message
from google.protobuf import message_factory

from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.data.sources import federated_files
from fedjax_lab.data.sources.federated_files import FileLayoutError

# kind -> the database TFF downloads (as <name>.lzma) and decompresses.
CANONICAL_FILES = {"emnist": "emnist_all.sqlite",
                   "shakespeare": "shakespeare.sqlite",
                   "stackoverflow": "stackoverflow.sqlite",
                   "cifar100": "cifar100.sqlite"}
# kind -> the default (train, test) split names (EMNIST: all 62 classes).
DEFAULT_SPLITS = {"emnist": ("all_train", "all_test"),
                  "shakespeare": ("train", "test"),
                  "stackoverflow": ("train", "test"),
                  "cifar100": ("train", "test")}

SQL_LAYOUT = (
    "TFF's SQLite client data: a table examples(split_name TEXT, client_id "
    "TEXT, serialized_example_proto BLOB) with one serialized tf.train.Example "
    "per row, and a table client_metadata(client_id TEXT, split_name TEXT, "
    "num_examples INTEGER) listing each split's clients")

_BYTES, _FLOAT, _INT64 = "bytes_list", "float_list", "int64_list"
_SO_TEXT = ("tokens", "title", "tags", "creation_date", "type")
# kind -> feature -> (Feature list, shape of one example, dtype), as TFF's
# parse specs (module docstring).
PARSE_SPECS = {
    "emnist": {"pixels": (_FLOAT, (28, 28), np.float32),
               "label": (_INT64, (), np.int32)},
    "shakespeare": {"snippets": (_BYTES, (), object)},
    "stackoverflow": {**{name: (_BYTES, (), object) for name in _SO_TEXT},
                      "score": (_INT64, (), np.int64)},
    "cifar100": {"image": (_INT64, (32, 32, 3), np.uint8),
                 "label": (_INT64, (), np.int64),
                 "coarse_label": (_INT64, (), np.int64)},
}


@functools.lru_cache(maxsize=None)
def example_class() -> type:
  """The ``tensorflow.Example`` message class (in a private pool)."""
  f = descriptor_pb2.FieldDescriptorProto
  rep, opt, msg = f.LABEL_REPEATED, f.LABEL_OPTIONAL, f.TYPE_MESSAGE
  proto = descriptor_pb2.FileDescriptorProto(
      name="fedjax_lab/tff_sqlite/example.proto", package="tensorflow",
      syntax="proto3")
  lists = (("BytesList", _BYTES, f.TYPE_BYTES),
           ("FloatList", _FLOAT, f.TYPE_FLOAT),
           ("Int64List", _INT64, f.TYPE_INT64))
  feature = proto.message_type.add(name="Feature")
  feature.oneof_decl.add(name="kind")
  for number, (message_name, field_name, type_) in enumerate(lists, 1):
    value = proto.message_type.add(name=message_name).field.add(
        name="value", number=1, type=type_, label=rep)
    if type_ != f.TYPE_BYTES:
      value.options.packed = True
    feature.field.add(name=field_name, number=number, type=msg, label=opt,
                      type_name=f".tensorflow.{message_name}", oneof_index=0)
  features = proto.message_type.add(name="Features")
  features.field.add(name="feature", number=1, type=msg, label=rep,
                     type_name=".tensorflow.Features.FeatureEntry")
  entry = features.nested_type.add(name="FeatureEntry")
  entry.options.map_entry = True
  entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=opt)
  entry.field.add(name="value", number=2, type=msg, label=opt,
                  type_name=".tensorflow.Feature")
  proto.message_type.add(name="Example").field.add(
      name="features", number=1, type=msg, label=opt,
      type_name=".tensorflow.Features")
  pool = descriptor_pool.DescriptorPool()
  pool.Add(proto)
  return message_factory.GetMessageClass(
      pool.FindMessageTypeByName("tensorflow.Example"))


def _decompressed(path: str) -> str:
  """``x.sqlite`` beside ``x.sqlite.lzma``, decompressed there if absent."""
  target = path[:-len(".lzma")]
  if os.path.isfile(target):
    return target
  logging.getLogger(__name__).info("decompressing %s to %s", path, target)
  partial = target + ".partial"
  try:
    with lzma.open(path) as source, open(partial, "wb") as sink:
      shutil.copyfileobj(source, sink, 1 << 20)
  except BaseException as e:
    if os.path.exists(partial):
      os.remove(partial)
    if isinstance(e, (lzma.LZMAError, EOFError)):
      raise FileLayoutError(
          f"{path} is not a whole LZMA/xz file ({e}); expected {SQL_LAYOUT}, "
          "LZMA-compressed; or decompress it yourself (unxz -k).") from None
    raise
  os.replace(partial, target)
  return target


def resolve_file(path: str, kind: str) -> str:
  """The database ``path`` names: the file, or TFF's file in that folder;
  ``.sqlite.lzma`` is decompressed (module docstring)."""
  if not path:
    raise ValueError("data.name='tff_sqlite' needs data.path: a folder "
                     "holding TFF's database or the .sqlite file "
                     f"({SQL_LAYOUT}).")
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    names = [CANONICAL_FILES[k] for k in ([kind] if kind else CANONICAL_FILES)]
    found = [os.path.join(path, name + suffix) for name in names
             for suffix in ("", ".lzma")
             if os.path.isfile(os.path.join(path, name + suffix))]
    found = [f for f in found if not f.endswith(".lzma") or f[:-5] not in found]
    if not found:
      raise FileNotFoundError(
          f"{path} holds none of the files {names} (or their .lzma); set "
          "data.path to the database file itself.")
    if len(found) > 1:
      raise ValueError(f"{path} holds several datasets "
                       f"({[os.path.basename(f) for f in found]}); set "
                       "data.path to the file you want.")
    path = found[0]
  elif not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist ({SQL_LAYOUT}).")
  return _decompressed(path) if path.endswith(".lzma") else path


class _SqlSplit(federated_files.SplitReader):
  """One split of a TFF SQLite database, opened read-only; :meth:`select`
  picks the split."""

  def __init__(self, path: str):
    self.path, self.split, self.client_ids = path, "", []
    self._connection = federated_files.open_sqlite(path, SQL_LAYOUT)
    try:
      self.splits = self._check_tables()
    except Exception:
      self._connection.close()
      raise

  def _check_tables(self) -> list[str]:
    required = {"examples": {"split_name", "client_id",
                             "serialized_example_proto"},
                "client_metadata": {"client_id", "split_name"}}
    for table, needed in required.items():
      try:
        columns = {row[1] for row in self._connection.execute(
            f"PRAGMA table_info({table})")}
      except sqlite3.DatabaseError as e:
        raise FileLayoutError(f"{self.path} is not an SQLite database ({e}); "
                              f"expected {SQL_LAYOUT}.") from None
      if not columns:
        raise FileLayoutError(f"{self.path} has no table {table}; expected "
                              f"{SQL_LAYOUT}.")
      if not needed <= columns:
        raise FileLayoutError(
            f"{self.path}: table {table} has columns {sorted(columns)}, "
            f"lacking {sorted(needed - columns)}; expected {SQL_LAYOUT}.")
    return [row[0] for row in self._connection.execute(
        "SELECT DISTINCT split_name FROM client_metadata ORDER BY split_name")]

  def select(self, split: str, max_clients: int) -> None:
    """Reads the client ids of ``split`` (the first ``max_clients``; 0 =
    all)."""
    if split not in self.splits:
      raise FileLayoutError(
          f"{self.path} has no split {split!r}; its splits (client_metadata."
          f"split_name) are {self.splits}; set data.train_split / "
          "data.test_split.")
    self.split = split
    self.client_ids = [row[0] for row in self._connection.execute(
        "SELECT DISTINCT client_id FROM client_metadata WHERE split_name = ? "
        "ORDER BY client_id LIMIT ?", (split, max_clients or -1))]

  def _where(self, client_id: Any) -> str:
    return f"{self.path} (split {self.split!r}): client {client_id!r}"

  def _parse(self, client_id: str, blob: Any) -> Any:
    try:
      if not isinstance(blob, bytes):
        raise message.DecodeError(f"a {type(blob).__name__}, not a BLOB")
      return example_class().FromString(blob)
    except message.DecodeError as e:
      raise FileLayoutError(
          f"{self._where(client_id)}: serialized_example_proto is not a "
          f"tf.train.Example ({e}); expected {SQL_LAYOUT}.") from None

  def feature_names(self) -> set[str]:
    row = self._connection.execute(
        "SELECT client_id, serialized_example_proto FROM examples WHERE "
        "split_name = ? ORDER BY client_id, rowid LIMIT 1",
        (self.split,)).fetchone()
    if row is None:
      raise FileLayoutError(f"{self.path}: split {self.split!r} has no "
                            "examples.")
    return set(self._parse(row[0], row[1]).features.feature)

  def _stack(self, client_id: str, examples: Sequence[Any], name: str,
             spec: tuple[str, tuple[int, ...], Any]) -> np.ndarray:
    """Feature ``name`` of every example, ``[n, *shape]`` of ``dtype``."""
    kind, shape, dtype = spec
    size = int(np.prod(shape))
    values = []
    for index, example in enumerate(examples):
      features = example.features.feature
      if name not in features:
        raise FileLayoutError(
            f"{self._where(client_id)}: example {index} has features "
            f"{sorted(features)}, lacking {name!r}; every example of this "
            f"dataset needs {name!r} ({SQL_LAYOUT}).")
      feature = features[name]
      got = feature.WhichOneof("kind")
      items = getattr(feature, got).value if got else ()
      if got != kind or len(items) != size:
        raise FileLayoutError(
            f"{self._where(client_id)}: example {index}: feature {name!r} "
            f"is a {got} of {len(items)} values; expected a {kind} of "
            f"{size} (shape {list(shape)}, as TFF parses it).")
      values.append(items)
    if dtype is object:
      column = np.empty(len(values), dtype=object)
      column[:] = [items[0] for items in values]
      return column
    # One asarray per example: ~6x faster than list() of upb's containers.
    raw = np.float32 if kind == _FLOAT else np.int64
    array = np.empty((len(values), size), dtype=raw)
    for row, items in zip(array, values):
      row[:] = np.asarray(items, dtype=raw)
    return array.reshape((len(values), *shape)).astype(dtype, copy=False)

  def clients(self, names):
    if not self.client_ids:
      return
    specs = PARSE_SPECS[federated_files.detect_kind(names, self.path)]

    def arrays(client_id, examples):
      return {n: self._stack(client_id, examples, n, specs[n]) for n in names}

    rows = self._connection.execute(
        "SELECT client_id, serialized_example_proto FROM examples WHERE "
        "split_name = ? AND client_id <= ? ORDER BY client_id, rowid",
        (self.split, self.client_ids[-1]))
    wanted = set(self.client_ids)
    pending = iter(self.client_ids)
    for client_id, group in itertools.groupby(rows, key=lambda row: row[0]):
      if client_id not in wanted:  # no client_metadata row: TFF skips it
        continue
      for earlier in pending:  # clients listed without examples: empty
        if earlier == client_id:
          break
        yield earlier, arrays(earlier, [])
      examples = [self._parse(client_id, blob) for _, blob in group]
      yield client_id, arrays(client_id, examples)
    for earlier in pending:
      yield earlier, arrays(earlier, [])

  def close(self) -> None:
    self._connection.close()


def _split_names(reader: _SqlSplit, kind: str, train_split: str,
                 test_split: str) -> tuple[str, str]:
  """The (train, test) splits: given, else TFF's defaults for ``kind`` (or
  those present); ``test_split`` defaults to ``train_split`` with its last
  ``train`` replaced by ``test``."""
  if not train_split:
    candidates = [DEFAULT_SPLITS[kind]] if kind else list(
        dict.fromkeys(DEFAULT_SPLITS.values()))
    present = [pair for pair in candidates if pair[0] in reader.splits]
    train_split, default_test = (present or candidates)[0]
  else:
    stem, marker, rest = train_split.rpartition("train")
    default_test = f"{stem}test{rest}" if marker else ""
  return train_split, test_split or default_test


def load(path: str = "", test_path: str = "", kind: str = "",
         train_split: str = "", test_split: str = "", max_clients: int = 0,
         sequence_length: int = 0,
         vocab_size: int = federated_files.DEFAULT_VOCAB_SIZE,
         word_count_path: str = "",
         max_examples_per_client: int = (
             federated_files.DEFAULT_MAX_EXAMPLES_PER_CLIENT),
         invert_pixels: bool = True) -> FederatedDataset:
  """A TFF SQLite dataset (layout: the module docstring); options as
  :func:`fedjax_lab.data.sources.tff_h5.load`'s.

  Args:
    path: a folder holding TFF's database under its name (e.g.
      ``emnist_all.sqlite``, or ``emnist_all.sqlite.lzma``, decompressed
      beside it once), or the database file.
    test_path: the database holding the test split (default: ``path``'s).
    kind: ``"emnist"``, ``"shakespeare"``, ``"stackoverflow"`` or
      ``"cifar100"``; empty: detected from the features.
    train_split: the training split's ``split_name`` (default ``train``;
      EMNIST: ``all_train``, 62 classes, as FedJAX's default, where TFF's
      ``load_data`` defaults to ``digits_only_train``, 10 classes).
    test_split: the test split's (default: ``train_split`` with ``train``
      replaced by ``test``; ``heldout`` for Stack Overflow's held-out
      clients).
    max_clients, sequence_length, vocab_size, word_count_path,
    max_examples_per_client, invert_pixels: as in
      :func:`fedjax_lab.data.sources.tff_h5.load`; ``max_clients`` takes the
      first clients in sorted id order.

  Raises:
    FileNotFoundError: a file does not exist.
    FileLayoutError: a file is not laid out as TFF's, or lacks a split (the
      message says how).
    ValueError: no ``path``, an unknown ``kind`` or an invalid option.
  """
  federated_files.check_kind(kind)
  if max_clients < 0:
    raise ValueError(f"data.max_clients must be >= 0, got {max_clients}.")
  train_file = resolve_file(path, kind)
  test_file = resolve_file(test_path, "") if test_path else train_file
  with contextlib.ExitStack() as opened:
    train = _SqlSplit(train_file)
    opened.callback(train.close)
    test = _SqlSplit(test_file)
    opened.callback(test.close)
    train_split, test_split = _split_names(train, kind, train_split,
                                           test_split)
    train.select(train_split, max_clients)
    test.select(test_split, max_clients)
    return federated_files.build_dataset(
        "tff", kind, train, test, sequence_length=sequence_length,
        vocab_size=vocab_size, word_count_path=word_count_path,
        max_examples_per_client=max_examples_per_client,
        invert_pixels=invert_pixels,
        info={"source": "TensorFlow Federated SQLite client data (local "
                        "file)", "max_clients": max_clients,
              "train_split": train_split, "test_split": test_split})
