"""Prepared TFDS datasets with a client-id feature, read without TensorFlow:
tiny builders prepared (array_record) into a temporary data_dir."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from fedjax_lab.data.sources import load_dataset
from fedjax_lab.data.sources import tfds_clients
from fedjax_lab.data.sources.tff_h5 import FileLayoutError

# (client_id, x, y) in generation order; the builder keeps this order.
ROWS = [("bob", [1.0, 2.0], 3), ("amy", [0.5, 0.0], 1),
        ("bob", [3.0, 4.0], 0), ("cid", [9.0, 9.0], 2),
        ("amy", [7.0, 7.0], 5)]
TEST_ROWS = [("amy", [1.0, 1.0], 4), ("dan", [2.0, 2.0], 6)]


class TinyFederatedRows(tfds.core.GeneratorBasedBuilder):
  """client_id (string) + x/y, as written from a built-in source."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "client_id": tfds.features.Text(),
            "note": tfds.features.Text(),
            "x": tfds.features.Tensor(shape=(2,), dtype=np.float32),
            "y": tfds.features.Tensor(shape=(), dtype=np.int64)}),
        metadata=tfds.core.MetadataDict(num_classes=7),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(ROWS),
            "test": self._generate_examples(TEST_ROWS)}

  def _generate_examples(self, rows):
    for index, (cid, x, y) in enumerate(rows):
      yield index, {"client_id": cid, "note": f"row {index}",
                    "x": np.asarray(x, np.float32), "y": y}


IMAGE_USERS = [12, 3, 12, 3, 3, 40]


class TinyFederatedImages(tfds.core.GeneratorBasedBuilder):
  """An integer ``user`` id, uint8 images and a ClassLabel; shuffled."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "user": tfds.features.Tensor(shape=(), dtype=np.int64),
            "image": tfds.features.Tensor(shape=(4, 4, 1), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=5)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(0),
            "test": self._generate_examples(1)}

  def _generate_examples(self, offset):
    for index, user in enumerate(IMAGE_USERS):
      yield index, {"user": user,
                    "image": np.full((4, 4, 1), 10 * index + offset, np.uint8),
                    "label": (index + offset) % 5}


class TinyFederatedTokens(tfds.core.GeneratorBasedBuilder):
  """Token sequences with no class count anywhere: inferred from x and y."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "client_id": tfds.features.Text(),
            "x": tfds.features.Tensor(shape=(3,), dtype=np.int32),
            "y": tfds.features.Tensor(shape=(3,), dtype=np.int32)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(), "test":
            self._generate_examples()}

  def _generate_examples(self):
    yield 0, {"client_id": "a", "x": np.array([1, 11, 2], np.int32),
              "y": np.array([11, 2, 0], np.int32)}
    yield 1, {"client_id": "b", "x": np.array([1, 3, 0], np.int32),
              "y": np.array([3, 0, 0], np.int32)}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tfds"))
  for builder in (TinyFederatedRows, TinyFederatedImages,
                  TinyFederatedTokens):
    builder(data_dir=folder, file_format="array_record").download_and_prepare()
  return folder


def test_rows_grouped_by_client_in_generation_order(data_dir):
  dataset = load_dataset("tfds", tfds_name="tiny_federated_rows",
                         data_dir=data_dir)
  for store, rows in ((dataset.train, ROWS), (dataset.test, TEST_ROWS)):
    ids = list(dict.fromkeys(cid for cid, _, _ in rows))  # first seen
    assert store.client_ids.tolist() == ids
    for index, cid in enumerate(ids):
      client = store.client(index)
      mine = [(x, y) for c, x, y in rows if c == cid]
      np.testing.assert_array_equal(client["x"], [x for x, _ in mine])
      np.testing.assert_array_equal(client["y"], [y for _, y in mine])
  # The string feature "note" is left out by default.
  assert set(dataset.train.feature_names) == {"x", "y"}
  assert dataset.train.features["x"].dtype == np.float32
  assert dataset.num_classes == 7  # from the dataset's metadata
  assert dataset.input_shape == (2,)
  assert dataset.name == "tiny_federated_rows"
  first = tfds_clients.load("tiny_federated_rows", data_dir, max_clients=2)
  assert first.train.client_ids.tolist() == ["bob", "amy"]
  assert first.train.num_examples == 4
  assert first.test.client_ids.tolist() == ["amy", "dan"]
  part = tfds_clients.load("tiny_federated_rows", data_dir,
                           train_split="train[:2]")
  assert part.train.client_ids.tolist() == ["bob", "amy"]
  assert part.train.num_examples == 2


def test_feature_mapping_integer_ids_uint8_and_class_labels(data_dir):
  dataset = tfds_clients.load("tiny_federated_images", data_dir,
                              client_id_feature="user",
                              features="x=image, y=label")
  assert dataset.train.client_ids.tolist() == ["12", "3", "40"]
  assert dataset.train.client_sizes.tolist() == [2, 3, 1]
  for index, user in enumerate(["12", "3", "40"]):
    client = dataset.train.client(index)
    rows = [i for i, u in enumerate(IMAGE_USERS) if str(u) == user]
    # TFDS shuffled the split: compare each client's examples as a set.
    got = sorted(zip(client["x"][:, 0, 0, 0].tolist(), client["y"].tolist()))
    assert got == [(np.float32(10 * i / 255.0), i % 5) for i in rows]
  assert dataset.train.features["x"].dtype == np.float32
  assert dataset.num_classes == 5 and dataset.input_shape == (4, 4, 1)
  raw = tfds_clients.load("tiny_federated_images", data_dir,
                          client_id_feature="user",
                          features={"x": "image", "y": "label"},
                          scale_uint8=False, num_classes=9)
  assert raw.train.features["x"].dtype == np.uint8 and raw.num_classes == 9


def test_num_classes_inferred_from_token_sequences(data_dir):
  dataset = tfds_clients.load("tiny_federated_tokens", data_dir)
  assert dataset.num_classes == 12
  assert dataset.train.features["x"].dtype == np.int32


def test_group_by_client_is_stable_and_vectorised():
  ids = np.array(["b", "a", "b", "c", "a"])
  store = tfds_clients.group_by_client(ids, {"v": np.arange(5)})
  assert store.client_ids.tolist() == ["a", "b", "c"]
  np.testing.assert_array_equal(store.features["v"], [1, 4, 0, 2, 3])
  np.testing.assert_array_equal(store.offsets, [0, 2, 4, 5])
  seen = tfds_clients.group_by_client(ids, {"v": np.arange(5)},
                                      max_clients=2, first_seen=True)
  assert seen.client_ids.tolist() == ["b", "a"]
  np.testing.assert_array_equal(seen.features["v"], [0, 2, 1, 4])


def test_reads_the_builtin_source_builders_back_exactly(tmp_path):
  """A source written by fedjax_lab.data.tfds_builders reads back as that
  source's stores (client order, rows, classes, shape)."""
  tfds_builders = pytest.importorskip("fedjax_lab.data.tfds_builders")
  config = tfds_builders.SourceConfig(
      name="test", load_kwargs={"num_clients": 6}, max_clients=4)
  tfds_builders.prepare("synthetic", str(tmp_path), config)
  dataset = tfds_clients.load("fedjax_lab_synthetic/test", str(tmp_path))
  direct = load_dataset("synthetic", num_clients=6)
  for split in ("train", "test"):
    got, want = getattr(dataset, split), getattr(direct, split).subset(
        np.arange(4))
    np.testing.assert_array_equal(got.client_ids, want.client_ids)
    np.testing.assert_array_equal(got.offsets, want.offsets)
    for name in ("x", "y"):
      assert got.features[name].dtype == want.features[name].dtype
      np.testing.assert_array_equal(got.features[name], want.features[name])
  assert dataset.num_classes == direct.num_classes
  assert dataset.input_shape == direct.input_shape
  assert dataset.name == direct.name


def test_errors_name_the_dataset_and_the_layout(data_dir, tmp_path):
  with pytest.raises(ValueError, match="needs data.tfds_name"):
    tfds_clients.load()
  with pytest.raises(FileNotFoundError, match="no TFDS dataset "
                     "'no_such_federated_thing'"):
    tfds_clients.load("no_such_federated_thing", data_dir)
  with pytest.raises(FileNotFoundError, match="is not prepared"):
    tfds_clients.load("tiny_federated_rows", str(tmp_path))
  with pytest.raises(FileLayoutError, match="no client-id feature 'user'.*"
                     "array_record"):
    tfds_clients.load("tiny_federated_rows", data_dir,
                      client_id_feature="user")
  with pytest.raises(FileLayoutError, match=r"no feature\(s\) \['pixels'\]"):
    tfds_clients.load("tiny_federated_images", data_dir,
                      client_id_feature="user", features="x=pixels,y=label")
  with pytest.raises(FileLayoutError, match="lack 'x' or 'y'"):
    tfds_clients.load("tiny_federated_images", data_dir,
                      client_id_feature="user")
  with pytest.raises(FileLayoutError, match=r"\['note'\] are strings"):
    tfds_clients.load("tiny_federated_rows", data_dir, features="x=note,y=y")
  with pytest.raises(FileLayoutError, match="no split 'validation'"):
    tfds_clients.load("tiny_federated_rows", data_dir,
                      test_split="validation")
  with pytest.raises(ValueError, match="'ours=theirs' pairs"):
    tfds_clients.load("tiny_federated_images", data_dir,
                      client_id_feature="user", features="image")
