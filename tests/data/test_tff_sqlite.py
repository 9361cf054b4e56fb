"""TFF SQLite client data: miniature databases in TFF's layout whose
tf.train.Example blobs are written by a hand-made protobuf wire encoder
(independent of the reader's descriptors), read back exactly and compared
with the same data read from TFF's HDF5 layout."""

import copy
import importlib
import lzma
import sqlite3
import struct

import numpy as np
import pytest

from fedjax_lab.data.sources import load_dataset, tff_h5, tff_sqlite
from fedjax_lab.data.sources.federated_files import FileLayoutError
from tests.data.test_tff_h5 import (BYTES, cifar100_clients, emnist_clients,
                                   write_h5)

# ------------------------------------------------- protobuf wire encoding


def varint(value):
  value &= (1 << 64) - 1  # negative int64: ten bytes, two's complement
  out = bytearray()
  while True:
    low, value = value & 0x7F, value >> 7
    out.append(low | (0x80 if value else 0))
    if not value:
      return bytes(out)


def field(number, payload):
  """A length-delimited field (wire type 2)."""
  return varint(number << 3 | 2) + varint(len(payload)) + payload


def feature(values, packed=True):
  """tensorflow.Feature: bytes_list = 1, float_list = 2, int64_list = 3."""
  values = list(np.asarray(values, dtype=object).ravel()) if not isinstance(
      values, bytes) else [values]
  if isinstance(values[0], bytes):
    return field(1, b"".join(field(1, v) for v in values))
  if isinstance(values[0], (float, np.floating)):
    return field(2, field(1, struct.pack(f"<{len(values)}f", *values)))
  if packed:
    return field(3, field(1, b"".join(varint(int(v)) for v in values)))
  return field(3, b"".join(varint(1 << 3) + varint(int(v)) for v in values))


def example(features, packed=True):
  """tensorflow.Example{features = 1: Features{map feature = 1}}."""
  entries = b"".join(field(1, field(1, name.encode()) +
                           field(2, feature(values, packed)))
                     for name, values in features.items())
  return field(1, entries)


def write_db(path, splits, index=True, extra_rows=()):
  """``{split: {client_id: [per-example feature dict]}}`` as TFF's tables;
  rows interleaved across clients (rowid order within each client)."""
  connection = sqlite3.connect(str(path))
  connection.execute("CREATE TABLE examples (split_name TEXT NOT NULL, "
                     "client_id TEXT NOT NULL, serialized_example_proto "
                     "BLOB NOT NULL);")
  connection.execute("CREATE TABLE client_metadata (client_id TEXT NOT NULL, "
                     "split_name TEXT NOT NULL, num_examples INTEGER NOT "
                     "NULL);")
  if index:
    connection.execute("CREATE INDEX idx ON examples (split_name, client_id)")
  for split, clients in splits.items():
    for client_id, rows in clients.items():
      connection.execute("INSERT INTO client_metadata VALUES (?, ?, ?)",
                         (client_id, split, len(rows)))
    longest = max((len(rows) for rows in clients.values()), default=0)
    for i in range(longest):
      for client_id, rows in clients.items():
        if i < len(rows):
          connection.execute("INSERT INTO examples VALUES (?, ?, ?)",
                             (split, client_id, example(rows[i])))
  for row in extra_rows:
    connection.execute("INSERT INTO examples VALUES (?, ?, ?)", row)
  connection.commit()
  connection.close()
  return str(path)


def per_example(columns):
  """``{feature: array [n, ...]}`` -> ``[{feature: values}] * n``."""
  n = len(next(iter(columns.values())))
  return [{name: (np.asarray(values[i]) if not isinstance(values, list)
                  else values[i].encode()) for name, values in columns.items()}
          for i in range(n)]


def write_columns_db(path, raw):
  """``{split: {client_id: {feature: array [n, ...]}}}`` (the h5 writer's
  input) as a TFF database."""
  return write_db(path, {split: {c: per_example(f) for c, f in clients.items()}
                         for split, clients in raw.items()})


def test_hand_encoder_matches_the_reader_messages():
  proto = tff_sqlite.example_class().FromString(example(
      {"a": [b"x", b"yz"], "b": np.float32([0.5, -2]), "c": [3, -1]}))
  feature_map = proto.features.feature
  assert list(feature_map["a"].bytes_list.value) == [b"x", b"yz"]
  assert list(feature_map["b"].float_list.value) == [0.5, -2.0]
  assert list(feature_map["c"].int64_list.value) == [3, -1]
  unpacked = tff_sqlite.example_class().FromString(example({"c": [7, 8]},
                                                           packed=False))
  assert list(unpacked.features.feature["c"].int64_list.value) == [7, 8]


# ------------------------------------------------------ same as TFF's h5


def assert_same_clients(a, b):
  for split in ("train", "test"):
    sa, sb = getattr(a, split), getattr(b, split)
    assert sa.client_ids.tolist() == sb.client_ids.tolist()
    assert sa.client_sizes.tolist() == sb.client_sizes.tolist()
    for name in sa.features:
      np.testing.assert_array_equal(sa.features[name], sb.features[name])
      assert sa.features[name].dtype == sb.features[name].dtype
  assert a.num_classes == b.num_classes and a.input_shape == b.input_shape


EMNIST_TRAIN = {"f0002_03": [1, 35, 4], "f0000_14": [7, 0], "f0001_41": [61]}
EMNIST_TEST = {"f0002_03": [2], "f0000_14": [9, 9], "f0001_41": [10]}
DIGITS = {"b": [3, 4], "a": [9]}


@pytest.fixture
def emnist_db(tmp_path):
  """emnist_all.sqlite (four splits) and the same data as TFF's h5 files."""
  raw = {"all_train": emnist_clients(0, EMNIST_TRAIN),
         "all_test": emnist_clients(1, EMNIST_TEST),
         "digits_only_train": emnist_clients(2, DIGITS),
         "digits_only_test": emnist_clients(3, {"a": [1], "b": [2, 3]})}
  write_columns_db(tmp_path / "emnist_all.sqlite", raw)
  h5 = tmp_path / "h5"
  h5.mkdir()
  for split, clients in raw.items():
    prefix = "fed_emnist" if split.startswith("all") else (
        "fed_emnist_digitsonly")
    write_h5(h5 / f"{prefix}_{split.rpartition('_')[2]}.h5", clients)
  return tmp_path, raw


def test_emnist_equals_tff_h5_and_splits_are_selected(emnist_db):
  folder, raw = emnist_db
  dataset = tff_sqlite.load(str(folder))
  reference = tff_h5.load(str(folder / "h5" / "fed_emnist_train.h5"))
  assert_same_clients(dataset, reference)
  assert dataset.train.client_ids.tolist() == ["f0000_14", "f0001_41",
                                               "f0002_03"]
  client = dataset.train.client(2)
  np.testing.assert_array_equal(client["x"][..., 0],
                                1 - raw["all_train"]["f0002_03"]["pixels"])
  np.testing.assert_array_equal(client["y"], [1, 35, 4])
  assert dataset.name == "tff_emnist" and dataset.num_classes == 62
  assert dataset.info["train_split"] == "all_train"
  assert dataset.info["test_split"] == "all_test"

  digits = load_dataset("tff_sqlite", path=str(folder / "emnist_all.sqlite"),
                        train_split="digits_only_train")
  assert_same_clients(digits, tff_h5.load(
      str(folder / "h5" / "fed_emnist_digitsonly_train.h5")))
  assert digits.num_classes == 10 and digits.info["test_split"] == (
      "digits_only_test")
  mixed = tff_sqlite.load(str(folder), kind="emnist",
                          test_split="digits_only_test", max_clients=1)
  assert mixed.train.client_ids.tolist() == ["f0000_14"]
  assert mixed.test.client_ids.tolist() == ["a"]
  np.testing.assert_array_equal(mixed.test.features["y"], [1])


def test_raw_arrays_have_the_h5_readers_dtypes_and_shapes(emnist_db):
  folder, _ = emnist_db
  h5 = tff_h5._H5Split(str(folder / "h5" / "fed_emnist_train.h5"), 0)
  sql = tff_sqlite._SqlSplit(str(folder / "emnist_all.sqlite"))
  sql.select("all_train", 0)
  names = ("pixels", "label")
  for (id_a, a), (id_b, b) in zip(h5.clients(names), sql.clients(names),
                                  strict=True):
    assert id_a == id_b
    for name in names:
      assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
      np.testing.assert_array_equal(a[name], b[name])
  h5.close()
  sql.close()


def test_shakespeare_equals_tff_h5(tmp_path):
  train = {"PLAY_B": ["ab", "Hello there, friend"], "PLAY_A": ["x\u2014"]}
  test = {"PLAY_A": ["ok"], "PLAY_B": ["no", "yes"]}
  write_db(tmp_path / "shakespeare.sqlite", {
      split: {c: [{"snippets": s.encode()} for s in snippets]
              for c, snippets in clients.items()}
      for split, clients in (("train", train), ("test", test))})
  write_h5(tmp_path / "shakespeare_train.h5",
           {c: {"snippets": s} for c, s in train.items()})
  write_h5(tmp_path / "shakespeare_test.h5",
           {c: {"snippets": s} for c, s in test.items()})
  dataset = tff_sqlite.load(str(tmp_path / "shakespeare.sqlite"),
                            sequence_length=5)
  assert_same_clients(dataset, tff_h5.load(str(tmp_path), sequence_length=5))
  assert dataset.train.client_ids.tolist() == ["PLAY_A", "PLAY_B"]
  assert dataset.name == "tff_shakespeare" and dataset.num_classes == 90


SO = {"train": {"u2": ["b c b", "a b c d e"], "u1": ["a b", "", "c z"],
                "u3": ["b"]},
      "heldout": {"u7": ["a a", "q"]},
      "test": {"u9": ["a q b"]}}


def stackoverflow_rows(posts):
  return [{"tokens": p.encode(), "title": b"t", "tags": b"a|b",
           "creation_date": b"2010-01-01 00:00:00 UTC", "type": b"question",
           "score": [i - 1]} for i, p in enumerate(posts)]


def write_stackoverflow_db_and_h5(folder):
  """``SO`` as TFF's stackoverflow.sqlite in ``folder`` and as its three
  stackoverflow_<split>.h5 files in ``folder/h5``; returns that h5 folder."""
  write_db(folder / "stackoverflow.sqlite",
           {split: {c: stackoverflow_rows(p) for c, p in clients.items()}
            for split, clients in SO.items()})
  h5 = folder / "h5"
  h5.mkdir()
  for split, clients in SO.items():
    write_h5(h5 / f"stackoverflow_{split}.h5",
             {c: {"tokens": p} for c, p in clients.items()}, BYTES)
  return h5


def test_stackoverflow_equals_tff_h5_with_heldout_and_word_counts(tmp_path):
  h5 = write_stackoverflow_db_and_h5(tmp_path)
  dataset = tff_sqlite.load(str(tmp_path), vocab_size=3, sequence_length=3)
  assert dataset.info["vocab"] == ("b", "a", "c")
  assert_same_clients(dataset, tff_h5.load(str(h5), vocab_size=3,
                                           sequence_length=3))
  heldout = tff_sqlite.load(str(tmp_path), test_split="heldout",
                            vocab_size=3, sequence_length=3,
                            max_examples_per_client=1)
  assert_same_clients(heldout, tff_h5.load(
      str(h5 / "stackoverflow_train.h5"), vocab_size=3, sequence_length=3,
      test_path=str(h5 / "stackoverflow_heldout.h5"),
      max_examples_per_client=1))
  assert heldout.test.client_ids.tolist() == ["u7"]
  (tmp_path / "stackoverflow.word_count").write_text("z 9\nq 8\nb 1\n")
  counted = tff_sqlite.load(str(tmp_path), vocab_size=2)
  assert counted.info["vocab"] == ("z", "q")


def test_stackoverflow_config_switches_readers_and_splits_by_override(
    tmp_path):
  """configs/tff_stackoverflow_nwp.py declares every reader option, so the
  command line (which can only set declared keys) reaches the held-out
  users under tff_sqlite (test_split) and tff_h5 (test_path) alike."""
  h5 = write_stackoverflow_db_and_h5(tmp_path)
  config = importlib.import_module("configs.tff_stackoverflow_nwp").get_config()
  config.lock()
  overrides = {"vocab_size": 3, "sequence_length": 3}
  loaded = {}
  for name, split_overrides in [
      ("tff_sqlite", {"path": str(tmp_path), "test_split": "heldout"}),
      ("tff_h5", {"path": str(h5),
                  "test_path": str(h5 / "stackoverflow_heldout.h5")})]:
    trial = copy.deepcopy(config)
    for key, value in {"name": name, **overrides, **split_overrides}.items():
      setattr(trial.data, key, value)
    options = trial.data.to_dict()
    loaded[name] = load_dataset(options.pop("name"), **options)
  assert loaded["tff_sqlite"].test.client_ids.tolist() == ["u7"]
  assert_same_clients(loaded["tff_sqlite"], loaded["tff_h5"])
  with pytest.raises(AttributeError):
    config.data.heldout = True  # a key no config declares stays an error
  with pytest.raises(TypeError, match="'tff_h5'.*test_split.*test_split is "
                     "an option of: .*tff_sqlite"):
    load_dataset("tff_h5", path=str(h5), test_split="heldout")


def test_cifar100_equals_tff_h5(tmp_path):
  rng = np.random.default_rng(5)
  raw = {"train": cifar100_clients(rng, ["0", "1", "10", "2"], 2),
         "test": cifar100_clients(rng, ["0", "1"], 3)}
  write_columns_db(tmp_path / "cifar100.sqlite", raw)
  write_h5(tmp_path / "fed_cifar100_train.h5", raw["train"])
  write_h5(tmp_path / "fed_cifar100_test.h5", raw["test"])
  dataset = tff_sqlite.load(str(tmp_path / "cifar100.sqlite"))
  assert_same_clients(dataset, tff_h5.load(str(tmp_path)))
  assert dataset.train.client_ids.tolist() == ["0", "1", "10", "2"]
  np.testing.assert_allclose(dataset.train.client(2)["x"],
                             raw["train"]["10"]["image"] / 255.0, rtol=1e-6)
  assert dataset.num_classes == 100


def test_client_order_and_examples_as_tff_reads_them(tmp_path):
  """Ids from client_metadata sorted; examples in rowid order; rows of
  clients not in client_metadata ignored; no index needed."""
  rows = {"b": [{"snippets": b"b1"}, {"snippets": b"b2"}],
          "a": [{"snippets": b"a1"}], "c": []}
  path = write_db(tmp_path / "shakespeare.sqlite",
                  {"train": rows, "test": {"a": rows["a"]}}, index=False,
                  extra_rows=[("train", "zz", example({"snippets": b"q"}))])
  reader = tff_sqlite._SqlSplit(path)
  reader.select("train", 0)
  assert reader.client_ids == ["a", "b", "c"]
  assert reader.feature_names() == {"snippets"}
  got = {c: raw["snippets"].tolist() for c, raw in reader.clients(
      ("snippets",))}
  assert got == {"a": [b"a1"], "b": [b"b1", b"b2"], "c": []}
  reader.select("train", 2)
  assert [c for c, _ in reader.clients(("snippets",))] == ["a", "b"]
  reader.close()


def test_lzma_file_is_decompressed_once_beside_it(tmp_path):
  db = write_db(tmp_path / "x.sqlite", {"train": {"A": [{"snippets": b"hi"}]},
                                        "test": {"A": [{"snippets": b"yo"}]}})
  folder = tmp_path / "dl"
  folder.mkdir()
  with open(db, "rb") as f, lzma.open(folder / "shakespeare.sqlite.lzma",
                                      "wb") as out:
    out.write(f.read())
  dataset = tff_sqlite.load(str(folder))
  assert (folder / "shakespeare.sqlite").is_file()
  assert dataset.train.client_ids.tolist() == ["A"]
  again = tff_sqlite.load(str(folder / "shakespeare.sqlite.lzma"))
  assert again.test.num_examples == dataset.test.num_examples
  bad = tmp_path / "cifar100.sqlite.lzma"
  bad.write_bytes(b"not xz at all")
  with pytest.raises(FileLayoutError, match="cifar100.sqlite.lzma is not a "
                     "whole LZMA/xz file.*unxz"):
    tff_sqlite.load(str(bad))
  assert not (tmp_path / "cifar100.sqlite").exists()
  assert not (tmp_path / "cifar100.sqlite.partial").exists()


# ------------------------------------------------------------------ errors


def test_missing_files_folders_and_options(tmp_path, emnist_db):
  folder, _ = emnist_db
  with pytest.raises(FileNotFoundError, match="nope.sqlite does not exist.*"
                     "table examples"):
    tff_sqlite.load(str(tmp_path / "nope.sqlite"))
  with pytest.raises(ValueError, match="needs data.path"):
    tff_sqlite.load()
  with pytest.raises(ValueError, match="unknown data.kind"):
    tff_sqlite.load(str(folder), kind="mnist")
  with pytest.raises(FileNotFoundError, match="shakespeare.sqlite"):
    tff_sqlite.load(str(folder), kind="shakespeare")
  (folder / "cifar100.sqlite.lzma").write_bytes(b"")
  with pytest.raises(ValueError, match="several datasets"):
    tff_sqlite.load(str(folder))
  with pytest.raises(ValueError, match="max_clients"):
    tff_sqlite.load(str(folder), kind="emnist", max_clients=-1)


def test_wrong_layouts_name_the_file_and_the_layout(tmp_path):
  shakespeare = {"train": {"a": [{"snippets": b"x"}]},
                 "test": {"a": [{"snippets": b"y"}]}}
  not_sqlite = tmp_path / "a.sqlite"
  not_sqlite.write_bytes(b"this is not a database, just some bytes " * 4)
  with pytest.raises(FileLayoutError, match="a.sqlite is not an SQLite"):
    tff_sqlite.load(str(not_sqlite))

  no_table = tmp_path / "b.sqlite"
  sqlite3.connect(str(no_table)).execute("CREATE TABLE examples (x)")
  with pytest.raises(FileLayoutError, match=r"b.sqlite: table examples has "
                     r"columns \['x'\], lacking .*serialized_example_proto"
                     r".*expected TFF's SQLite client data"):
    tff_sqlite.load(str(no_table))
  connection = sqlite3.connect(str(tmp_path / "c.sqlite"))
  connection.execute("CREATE TABLE examples (split_name, client_id, "
                     "serialized_example_proto)")
  connection.close()
  with pytest.raises(FileLayoutError, match="c.sqlite has no table "
                     r"client_metadata; expected .*client_metadata\("):
    tff_sqlite.load(str(tmp_path / "c.sqlite"))

  path = write_db(tmp_path / "d.sqlite", shakespeare)
  with pytest.raises(FileLayoutError, match=r"d.sqlite has no split 'heldout'"
                     r"; its splits .* are \['test', 'train'\]"):
    tff_sqlite.load(path, test_split="heldout")
  emnist_only = write_db(tmp_path / "d2.sqlite", {"odd": shakespeare["train"]})
  with pytest.raises(FileLayoutError, match=r"no split 'all_train'.*\['odd'\]"):
    tff_sqlite.load(emnist_only)

  path = write_db(tmp_path / "e.sqlite", shakespeare, extra_rows=[
      ("train", "b", b"not a proto \xff")])
  connection = sqlite3.connect(path)
  connection.execute("INSERT INTO client_metadata VALUES ('b', 'train', 1)")
  connection.commit()
  connection.close()
  with pytest.raises(FileLayoutError, match=r"e.sqlite \(split 'train'\): "
                     r"client 'b': serialized_example_proto is not a "
                     r"tf.train.Example"):
    tff_sqlite.load(path)

  lacking = {"train": {"a": [{"pixels": np.zeros((28, 28), np.float32),
                              "label": [1]}],
                       "b": [{"pixels": np.zeros((28, 28), np.float32)}]},
             "test": {"a": [{"pixels": np.zeros((28, 28), np.float32),
                             "label": [1]}]}}
  path = write_db(tmp_path / "f.sqlite", {
      "all_" + s: c for s, c in lacking.items()})
  with pytest.raises(FileLayoutError, match=r"f.sqlite \(split 'all_train'\):"
                     r" client 'b': example 0 has features \['pixels'\], "
                     r"lacking 'label'"):
    tff_sqlite.load(path)

  short = {"train": {"a": [{"pixels": np.zeros(5, np.float32),
                            "label": [1]}]}, "test": {}}
  path = write_db(tmp_path / "g.sqlite", short)
  with pytest.raises(FileLayoutError, match=r"g.sqlite .*'pixels' is a "
                     r"float_list of 5 values; expected a float_list of 784"):
    tff_sqlite.load(path, kind="emnist", train_split="train",
                    test_split="train")
  ints = {"train": {"a": [{"image": np.zeros((32, 32, 3), np.float32),
                           "label": [1]}]}, "test": {}}
  path = write_db(tmp_path / "h.sqlite", ints)
  with pytest.raises(FileLayoutError, match="'image' is a float_list of 3072 "
                     "values; expected a int64_list"):
    tff_sqlite.load(path, kind="cifar100", test_split="train")
