"""TFF HDF5 client data: miniature files in TFF's layout, read back exactly."""

import h5py
import numpy as np
import pytest

from fedjax_lab.data.sources import load_dataset, shakespeare, tff_h5
from fedjax_lab.data.sources.federated_files import FileLayoutError
from fedjax_lab.training import api

TEXT = h5py.string_dtype("utf-8")
BYTES = h5py.string_dtype("ascii")  # variable-length byte strings


def write_h5(path, clients, text_dtype=TEXT):
  """``{client_id: {feature: array}}`` as ``/examples/<id>/<feature>``."""
  with h5py.File(path, "w") as f:
    examples = f.create_group("examples")
    for client_id, features in clients.items():
      group = examples.create_group(client_id)
      for name, values in features.items():
        if isinstance(values, list):  # strings
          group.create_dataset(name, data=values, dtype=text_dtype)
        else:
          group.create_dataset(name, data=values)
  return str(path)


def emnist_clients(seed, labels_per_client):
  rng = np.random.default_rng(seed)
  return {cid: {"pixels": rng.random((len(labels), 28, 28),
                                     dtype=np.float32),
                "label": np.asarray(labels, np.int32)}
          for cid, labels in labels_per_client.items()}


# Deliberately not in sorted order: TFF reads the ids sorted.
EMNIST_TRAIN = {"f0002_03": [1, 35, 4], "f0000_14": [7, 0], "f0001_41": [61]}
EMNIST_TEST = {"f0002_03": [2], "f0000_14": [9, 9], "f0001_41": [10]}


@pytest.fixture
def emnist_files(tmp_path):
  train = emnist_clients(0, EMNIST_TRAIN)
  test = emnist_clients(1, EMNIST_TEST)
  write_h5(tmp_path / "fed_emnist_train.h5", train)
  write_h5(tmp_path / "fed_emnist_test.h5", test)
  return tmp_path, train, test


def test_emnist_pixels_labels_and_sorted_client_ids(emnist_files):
  folder, train, test = emnist_files
  dataset = tff_h5.load(str(folder))
  order = ["f0000_14", "f0001_41", "f0002_03"]
  for store, raw in ((dataset.train, train), (dataset.test, test)):
    assert store.client_ids.tolist() == order
    for index, cid in enumerate(order):
      client = store.client(index)
      assert client["x"].dtype == np.float32 and client["y"].dtype == np.int32
      np.testing.assert_allclose(client["x"],
                                 1.0 - raw[cid]["pixels"][..., None])
      np.testing.assert_array_equal(client["y"], raw[cid]["label"])
  assert dataset.name == "tff_emnist" and dataset.num_classes == 62
  assert dataset.input_shape == (28, 28, 1)
  assert dataset.info["kind"] == "emnist"
  assert set(dataset.train.feature_names) == {"x", "y"}


def test_emnist_raw_pixels_digits_only_and_max_clients(tmp_path):
  train = emnist_clients(2, {"b": [3, 4], "a": [9]})
  train["a"]["label"] = train["a"]["label"][:, None]  # [n, 1] labels too
  write_h5(tmp_path / "fed_emnist_digitsonly_train.h5", train)
  write_h5(tmp_path / "fed_emnist_digitsonly_test.h5",
           emnist_clients(3, {"b": [1], "a": [2]}))
  dataset = tff_h5.load(str(tmp_path / "fed_emnist_digitsonly_train.h5"),
                        invert_pixels=False, max_clients=1)
  assert dataset.num_classes == 10
  assert dataset.train.client_ids.tolist() == ["a"]
  assert dataset.test.client_ids.tolist() == ["a"]
  np.testing.assert_array_equal(dataset.train.features["x"][..., 0],
                                train["a"]["pixels"])
  np.testing.assert_array_equal(dataset.train.features["y"], [9])


def _ids(text):
  return [shakespeare.encode(c)[0] for c in text]


def test_shakespeare_windows_use_the_shakespeare_tokenizer(tmp_path):
  train = {"PLAY_B": ["ab", "Hello there, friend"], "PLAY_A": ["x\u2014"]}
  test = {"PLAY_A": ["ok"], "PLAY_B": ["no"]}
  write_h5(tmp_path / "shakespeare_train.h5",
           {c: {"snippets": s} for c, s in train.items()})
  write_h5(tmp_path / "shakespeare_test.h5",
           {c: {"snippets": s} for c, s in test.items()})
  dataset = load_dataset("tff_h5", path=str(tmp_path), sequence_length=3)
  bos, eos, oov = shakespeare.BOS_ID, shakespeare.EOS_ID, shakespeare.OOV_ID
  assert dataset.train.client_ids.tolist() == ["PLAY_A", "PLAY_B"]
  # "x\u2014" -> [BOS, x, OOV, EOS]: one window of 4.
  a = dataset.train.client(0)
  np.testing.assert_array_equal(a["x"], [[bos, *_ids("x"), oov]])
  np.testing.assert_array_equal(a["y"], [[*_ids("x"), oov, eos]])
  b = dataset.train.client(1)
  np.testing.assert_array_equal(b["x"][0], [bos, *_ids("ab")])
  np.testing.assert_array_equal(b["y"][0], [*_ids("ab"), eos])
  expected = shakespeare.speeches_to_windows(train["PLAY_B"], 3)
  np.testing.assert_array_equal(b["x"], expected[0])
  np.testing.assert_array_equal(b["y"], expected[1])
  assert dataset.num_classes == shakespeare.VOCAB_SIZE == 90
  assert dataset.input_shape == (3,)
  assert dataset.info["bos_id"] == bos
  default = tff_h5.load(str(tmp_path))
  assert default.input_shape == (80,)


def _stackoverflow(posts):
  n = len(posts)
  return {"tokens": posts, "title": ["t"] * n, "tags": ["a|b"] * n,
          "creation_date": ["2010-01-01 00:00:00 UTC"] * n,
          "type": ["question"] * n,
          "score": np.arange(n, dtype=np.int64)}


SO_TRAIN = {"u2": ["b c b", "a b c d e"], "u1": ["a b", "", "c z"],
            "u3": ["b"]}
SO_TEST = {"u9": ["a q b"]}


def stackoverflow_files(folder):
  """TFF's two Stack Overflow files, miniature, in ``folder``."""
  folder.mkdir(parents=True, exist_ok=True)
  write_h5(folder / "stackoverflow_train.h5",
           {c: _stackoverflow(p) for c, p in SO_TRAIN.items()}, BYTES)
  write_h5(folder / "stackoverflow_test.h5",
           {c: _stackoverflow(p) for c, p in SO_TEST.items()}, BYTES)
  return folder


@pytest.fixture
def stackoverflow_folder(tmp_path):
  return stackoverflow_files(tmp_path)


def test_stackoverflow_counted_vocabulary_and_windows(stackoverflow_folder):
  dataset = tff_h5.load(str(stackoverflow_folder), vocab_size=3,
                        sequence_length=3)
  # Users per word: b 3, a 2, c 2, d 1, e 1, z 1 -> [b, a, c] (ties by word).
  assert dataset.info["vocab"] == ("b", "a", "c")
  b, a, c, oov, bos, eos = 1, 2, 3, 4, 5, 6
  assert (dataset.info["oov_id"], dataset.info["bos_id"],
          dataset.info["eos_id"], dataset.num_classes) == (oov, bos, eos, 7)
  assert dataset.train.client_ids.tolist() == ["u1", "u2", "u3"]
  windows = {
      "u1": [[bos, a, b, eos], [bos, eos, 0, 0], [bos, c, oov, eos]],
      # "a b c d e" has >= 3 words: truncated, no EOS.
      "u2": [[bos, b, c, b], [bos, a, b, c]],
      "u3": [[bos, b, eos, 0]],
  }
  for index, cid in enumerate(["u1", "u2", "u3"]):
    client = dataset.train.client(index)
    expected = np.asarray(windows[cid], np.int32)
    np.testing.assert_array_equal(client["x"], expected[:, :-1])
    np.testing.assert_array_equal(client["y"], expected[:, 1:])
  test = dataset.test.client(0)
  np.testing.assert_array_equal(test["x"], [[bos, a, oov]])
  np.testing.assert_array_equal(test["y"], [[a, oov, b]])
  assert dataset.input_shape == (3,)
  capped = tff_h5.load(str(stackoverflow_folder), vocab_size=3,
                       sequence_length=3, max_examples_per_client=1)
  assert capped.train.client_sizes.tolist() == [1, 1, 1]
  assert capped.test.client_sizes.tolist() == [1]


def test_stackoverflow_word_count_file_beside_the_train_file(
    stackoverflow_folder):
  (stackoverflow_folder / "stackoverflow.word_count").write_text(
      "z 900\nq 800\nb 10\na 5\n")
  dataset = tff_h5.load(
      str(stackoverflow_folder / "stackoverflow_train.h5"), vocab_size=2,
      sequence_length=20)
  assert dataset.info["vocab"] == ("z", "q")
  assert dataset.input_shape == (20,) and dataset.num_classes == 6
  test = dataset.test.client(0)
  oov, bos, eos = 3, 4, 5
  np.testing.assert_array_equal(test["x"][0, :5], [bos, oov, 2, oov, eos])
  other = stackoverflow_folder / "words.txt"
  other.write_text("a 3\nb 2\n")
  dataset = tff_h5.load(str(stackoverflow_folder), word_count_path=str(other))
  assert dataset.info["vocab"] == ("a", "b")


def cifar100_clients(rng, ids, n):
  """``{client_id: TFF's CIFAR-100 features}``, ``n`` random examples each."""
  return {cid: {"image": rng.integers(0, 256, (n, 32, 32, 3), np.uint8),
                "label": rng.integers(0, 100, n).astype(np.int64),
                "coarse_label": rng.integers(0, 20, n).astype(np.int64)}
          for cid in ids}


def test_cifar100_scaled_images_and_fine_labels(tmp_path):
  rng = np.random.default_rng(5)
  train = cifar100_clients(rng, ["0", "1", "10", "2"], 2)
  test = cifar100_clients(rng, ["0", "1"], 3)
  write_h5(tmp_path / "fed_cifar100_train.h5", train)
  write_h5(tmp_path / "fed_cifar100_test.h5", test)
  dataset = tff_h5.load(str(tmp_path), kind="cifar100")
  assert dataset.train.client_ids.tolist() == ["0", "1", "10", "2"]
  client = dataset.train.client(2)
  np.testing.assert_allclose(client["x"], train["10"]["image"] / 255.0,
                             rtol=1e-6)
  assert client["x"].dtype == np.float32 and client["y"].dtype == np.int32
  np.testing.assert_array_equal(client["y"], train["10"]["label"])
  assert dataset.num_classes == 100 and dataset.input_shape == (32, 32, 3)


# ------------------------------------------------------------------ errors


def test_missing_files_and_options(tmp_path, emnist_files):
  folder, _, _ = emnist_files
  with pytest.raises(FileNotFoundError, match="does not exist"):
    tff_h5.load(str(tmp_path / "nope"))
  with pytest.raises(ValueError, match="needs data.path"):
    tff_h5.load()
  with pytest.raises(ValueError, match="unknown data.kind 'mnist'"):
    tff_h5.load(str(folder), kind="mnist")
  with pytest.raises(FileNotFoundError, match="shakespeare_train.h5"):
    tff_h5.load(str(folder), kind="shakespeare")
  (folder / "fed_emnist_test.h5").unlink()
  with pytest.raises(FileNotFoundError, match="fed_emnist_test.h5"):
    tff_h5.load(str(folder))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="none of the train files"):
    tff_h5.load(str(empty))


def test_two_datasets_in_one_folder_is_ambiguous(emnist_files):
  folder, train, _ = emnist_files
  write_h5(folder / "fed_emnist_digitsonly_train.h5", train)
  with pytest.raises(ValueError, match="several datasets"):
    tff_h5.load(str(folder))


def test_wrong_layouts_name_the_file_and_the_layout(tmp_path):
  test = write_h5(tmp_path / "t_test.h5", emnist_clients(0, {"a": [1]}))
  no_group = tmp_path / "a_train.h5"
  with h5py.File(no_group, "w") as f:
    f.create_dataset("pixels", data=np.zeros(3))
  with pytest.raises(FileLayoutError, match=r"a_train.h5 has no group "
                     r"/examples.*/examples/<client_id>/<feature>"):
    tff_h5.load(str(no_group), test_path=test)

  not_h5 = tmp_path / "b_train.h5"
  not_h5.write_text("hello")
  with pytest.raises(FileLayoutError, match="b_train.h5 is not an HDF5"):
    tff_h5.load(str(not_h5), test_path=test)

  lacking = emnist_clients(0, {"a": [1], "b": [2]})
  del lacking["b"]["label"]
  path = write_h5(tmp_path / "c_train.h5", lacking)
  with pytest.raises(FileLayoutError,
                     match=r"c_train.h5: client 'b' .* lacking \['label'\]"):
    tff_h5.load(path, test_path=test)

  wrong = emnist_clients(0, {"a": [1]})
  wrong["a"]["pixels"] = (wrong["a"]["pixels"] * 255).astype(np.uint8)
  path = write_h5(tmp_path / "d_train.h5", wrong)
  with pytest.raises(FileLayoutError,
                     match=r"d_train.h5: client 'a': 'pixels' is uint8.*"
                     r"expected float32 \[n, 28, 28\]"):
    tff_h5.load(path, test_path=test)

  unknown = write_h5(tmp_path / "e_train.h5",
                     {"a": {"foo": np.zeros(2), "bar": np.zeros(2)}})
  with pytest.raises(FileLayoutError, match="e_train.h5: features .* match "
                     "no known dataset.*emnist: pixels, label"):
    tff_h5.load(unknown, test_path=test)

  bad_labels = emnist_clients(0, {"a": [1]})
  bad_labels["a"]["label"] = np.array([1.5], np.float32)
  path = write_h5(tmp_path / "f_train.h5", bad_labels)
  with pytest.raises(FileLayoutError, match="'label' is float32"):
    tff_h5.load(path, test_path=test)

  snippets = write_h5(tmp_path / "g_train.h5",
                      {"a": {"snippets": np.zeros(2, np.int64)}})
  with pytest.raises(FileLayoutError, match="'snippets' is int64"):
    tff_h5.load(snippets, test_path=test, kind="shakespeare")

  nameless = tmp_path / "h.h5"
  nameless.write_bytes(b"")
  with pytest.raises(ValueError, match="set data.test_path"):
    tff_h5.load(str(nameless))


def test_word_count_file_with_a_wrong_layout(stackoverflow_folder):
  words = stackoverflow_folder / "bad.word_count"
  words.write_text("just-a-word\n")
  with pytest.raises(FileLayoutError, match="bad.word_count, line 1"):
    tff_h5.load(str(stackoverflow_folder), word_count_path=str(words))


# -------------------------------------------------------------- end to end


def test_a_config_naming_tff_h5_trains(emnist_files, tmp_path):
  folder, _, _ = emnist_files
  config = api.default_config(**{
      "data.name": "tff_h5", "data.path": str(folder / "fed_emnist_train.h5"),
      "model.name": "logistic", "num_rounds": 2, "cohort_size": 2,
      "client.batch_size": 2, "client.max_steps": 1, "eval_every": 1,
      "metrics_sinks": ""})
  result = api.simulate(config, workdir=str(tmp_path / "run"))
  assert len(result.history) >= 2
  assert all(np.isfinite(v) for r in result.history for k, v in r.items()
             if isinstance(v, float))
