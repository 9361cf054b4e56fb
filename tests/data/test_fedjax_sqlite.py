"""FedJAX SQLite federated data: miniature files written with msgpack directly
(independently of the reader's decoder), read back exactly."""

import sqlite3
import zlib

import msgpack
import numpy as np
import pytest

from fedjax_lab.data.sources import fedjax_sqlite, load_dataset, shakespeare
from fedjax_lab.data.sources import tff_h5
from fedjax_lab.data.sources.federated_files import FileLayoutError

CREATE = ("CREATE TABLE federated_data (client_id BLOB NOT NULL PRIMARY KEY, "
          "data BLOB NOT NULL, num_examples INTEGER NOT NULL);")


def ext(value):
  """FedJAX's msgpack extension for one array (or numpy scalar)."""
  if isinstance(value, np.generic):
    payload = msgpack.packb(([], value.dtype.name, value.tobytes()),
                            use_bin_type=True)
    return msgpack.ExtType(3, payload)
  if value.dtype == object:
    payload = msgpack.packb((list(value.shape), list(value.ravel())),
                            use_bin_type=True)
    return msgpack.ExtType(4, payload)
  payload = msgpack.packb((list(value.shape), value.dtype.name,
                           value.tobytes("C")), use_bin_type=True)
  return msgpack.ExtType(1, payload)


def blob(examples):
  return zlib.compress(msgpack.packb({k: ext(v) for k, v in examples.items()},
                                     use_bin_type=True))


def write_sqlite(path, clients, create=CREATE):
  """``[(client_id, {feature: array})]`` rows, in this (rowid) order."""
  connection = sqlite3.connect(str(path))
  connection.execute(create)
  for client_id, examples in clients:
    num = len(next(iter(examples.values())))
    connection.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
                       (client_id.encode(), blob(examples), num))
  connection.commit()
  connection.close()
  return str(path)


def byte_strings(*items):
  column = np.empty(len(items), dtype=object)
  column[:] = [i.encode() for i in items]
  return column


def emnist(seed, labels):
  rng = np.random.default_rng(seed)
  return {"pixels": rng.random((len(labels), 28, 28), dtype=np.float32),
          "label": np.asarray(labels, np.int32)}


# FedJAX's ids: "<16 hex digits>:f<writer>_<n>", read in rowid order.
TRAIN = [("ff00000000000000:f0002_03", emnist(0, [3, 40])),
         ("0a00000000000000:f0000_14", emnist(1, [5]))]
TEST = [("ff00000000000000:f0002_03", emnist(2, [1])),
        ("0a00000000000000:f0000_14", emnist(3, [2, 8]))]


@pytest.fixture
def emnist_folder(tmp_path):
  write_sqlite(tmp_path / "federated_emnist_train.sqlite", TRAIN)
  write_sqlite(tmp_path / "federated_emnist_test.sqlite", TEST)
  return tmp_path


def test_emnist_in_rowid_order(emnist_folder):
  dataset = load_dataset("fedjax_sqlite", path=str(emnist_folder))
  for store, rows in ((dataset.train, TRAIN), (dataset.test, TEST)):
    assert store.client_ids.tolist() == [cid for cid, _ in rows]
    for index, (_, raw) in enumerate(rows):
      client = store.client(index)
      np.testing.assert_allclose(client["x"], 1.0 - raw["pixels"][..., None])
      np.testing.assert_array_equal(client["y"], raw["label"])
  assert dataset.name == "fedjax_emnist" and dataset.num_classes == 62
  assert dataset.input_shape == (28, 28, 1)
  one = fedjax_sqlite.load(str(emnist_folder), max_clients=1)
  assert one.train.client_ids.tolist() == [TRAIN[0][0]]


def test_decoder_reads_every_fedjax_extension():
  examples = {"a": np.arange(6, dtype=np.int64).reshape(2, 3),
              "b": byte_strings("x", "yz"), "c": np.float32(2.5),
              "d": np.zeros((0, 4), np.float16)}
  decoded = fedjax_sqlite.decode_examples(blob(examples))
  assert set(decoded) == set(examples)
  np.testing.assert_array_equal(decoded["a"], examples["a"])
  assert decoded["a"].dtype == np.int64
  assert decoded["b"].tolist() == [b"x", b"yz"]
  assert decoded["c"] == np.float32(2.5)
  assert decoded["d"].shape == (0, 4) and decoded["d"].dtype == np.float16


def test_shakespeare_and_stackoverflow_use_the_h5_tokenizers(tmp_path):
  write_sqlite(tmp_path / "shakespeare_train.sqlite",
               [("KING", {"snippets": byte_strings("ab", "What?")})])
  write_sqlite(tmp_path / "shakespeare_test.sqlite",
               [("KING", {"snippets": byte_strings("c")})])
  dataset = fedjax_sqlite.load(str(tmp_path), sequence_length=4)
  x, y = shakespeare.speeches_to_windows(["ab", "What?"], 4)
  np.testing.assert_array_equal(dataset.train.features["x"], x)
  np.testing.assert_array_equal(dataset.train.features["y"], y)
  assert dataset.num_classes == 90 and dataset.name == "fedjax_shakespeare"

  posts = {"tokens": byte_strings("a b", "b c d"),
           "title": byte_strings("", ""), "tags": byte_strings("t", "t"),
           "creation_date": byte_strings("d", "d"),
           "type": byte_strings("question", "answer"),
           "score": np.array([1, 2], np.int64)}
  folder = tmp_path / "so"
  folder.mkdir()
  write_sqlite(folder / "stackoverflow_train.sqlite", [("7", posts)])
  write_sqlite(folder / "stackoverflow_test.sqlite", [("8", posts)])
  (folder / "stackoverflow.word_count").write_text("b 5\nc 4\na 1\n")
  dataset = fedjax_sqlite.load(str(folder), vocab_size=2, sequence_length=3)
  b, c, oov, bos, eos = 1, 2, 3, 4, 5
  windows = np.array([[bos, oov, b, eos], [bos, b, c, oov]], np.int32)
  np.testing.assert_array_equal(dataset.train.features["x"], windows[:, :-1])
  np.testing.assert_array_equal(dataset.train.features["y"], windows[:, 1:])
  assert dataset.info["vocab"] == ("b", "c") and dataset.num_classes == 6


def test_cifar100(tmp_path):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (2, 32, 32, 3), np.uint8)
  raw = {"image": image, "label": np.array([99, 0], np.int64),
         "coarse_label": np.array([19, 0], np.int64)}
  write_sqlite(tmp_path / "federated_cifar100_train.sqlite", [("0", raw)])
  write_sqlite(tmp_path / "federated_cifar100_test.sqlite", [("0", raw)])
  dataset = fedjax_sqlite.load(str(tmp_path))
  np.testing.assert_allclose(dataset.train.features["x"], image / 255.0,
                             rtol=1e-6)
  np.testing.assert_array_equal(dataset.train.features["y"], [99, 0])
  assert dataset.num_classes == 100


def test_same_data_as_tff_h5_gives_the_same_arrays(tmp_path):
  h5py = pytest.importorskip("h5py")
  for split, rows in (("train", TRAIN), ("test", TEST)):
    with h5py.File(tmp_path / f"fed_emnist_{split}.h5", "w") as f:
      for cid, raw in rows:
        for name, values in raw.items():
          f.create_dataset(f"examples/{cid}/{name}", data=values)
    write_sqlite(tmp_path / f"federated_emnist_{split}.sqlite", rows)
  a = tff_h5.load(str(tmp_path))
  b = fedjax_sqlite.load(str(tmp_path))
  order = np.argsort(b.train.client_ids)  # h5 ids are sorted, sqlite rowid
  for name in ("x", "y"):
    np.testing.assert_array_equal(
        a.train.features[name],
        np.concatenate([b.train.client(i)[name] for i in order]))


# ------------------------------------------------------------------ errors


def test_malformed_files_name_the_file_and_the_layout(tmp_path,
                                                      emnist_folder):
  test = str(emnist_folder / "federated_emnist_test.sqlite")
  with pytest.raises(FileNotFoundError, match="does not exist"):
    fedjax_sqlite.load(str(tmp_path / "x_train.sqlite"), test_path=test)

  no_table = tmp_path / "a_train.sqlite"
  sqlite3.connect(str(no_table)).execute("CREATE TABLE other (x INTEGER)")
  with pytest.raises(FileLayoutError, match=r"a_train.sqlite has no table "
                     r"federated_data.*federated_data\(client_id BLOB"):
    fedjax_sqlite.load(str(no_table), test_path=test)

  columns = write_sqlite(tmp_path / "b_train.sqlite", [],
                         "CREATE TABLE federated_data (client_id BLOB, x)")
  with pytest.raises(FileLayoutError, match="b_train.sqlite: table "
                     "federated_data has columns"):
    fedjax_sqlite.load(columns, test_path=test)

  not_sqlite = tmp_path / "c_train.sqlite"
  not_sqlite.write_bytes(b"this is not a database, just some bytes " * 4)
  with pytest.raises(FileLayoutError, match="c_train.sqlite is not an SQLite"):
    fedjax_sqlite.load(str(not_sqlite), test_path=test)

  corrupt = tmp_path / "d_train.sqlite"
  write_sqlite(corrupt, [])
  connection = sqlite3.connect(str(corrupt))
  connection.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
                     (b"a", b"not zlib", 1))
  connection.commit()
  connection.close()
  with pytest.raises(FileLayoutError, match="d_train.sqlite: client 'a': "
                     "cannot decode data.*zlib-compressed msgpack"):
    fedjax_sqlite.load(str(corrupt), test_path=test)

  miscounted = tmp_path / "h_train.sqlite"
  write_sqlite(miscounted, [])
  connection = sqlite3.connect(str(miscounted))
  connection.execute("INSERT INTO federated_data VALUES (?, ?, ?)",
                     (b"a", blob(emnist(0, [1, 2])), 3))
  connection.commit()
  connection.close()
  with pytest.raises(FileLayoutError, match="h_train.sqlite: client 'a' has "
                     "num_examples=3 but features of lengths"):
    fedjax_sqlite.load(str(miscounted), test_path=test)

  raw = emnist(0, [1, 2])
  lacking = write_sqlite(tmp_path / "e_train.sqlite",
                         [("a", raw), ("b", {"pixels": raw["pixels"]})])
  with pytest.raises(FileLayoutError, match=r"e_train.sqlite: client 'b' "
                     r".* lacking \['label'\]"):
    fedjax_sqlite.load(lacking, test_path=test)

  wrong = write_sqlite(tmp_path / "f_train.sqlite", [("a", {
      "pixels": np.zeros((1, 28, 28), np.int64), "label": np.zeros(1)})])
  with pytest.raises(FileLayoutError, match="'pixels' is int64"):
    fedjax_sqlite.load(wrong, test_path=test)

  empty = write_sqlite(tmp_path / "g_train.sqlite", [])
  with pytest.raises(FileLayoutError, match="table federated_data is empty"):
    fedjax_sqlite.load(empty, test_path=test)

  with pytest.raises(ValueError, match="unknown data.kind"):
    fedjax_sqlite.load(str(emnist_folder), kind="celeba")
