"""Populations written chunk by chunk: sizes, determinism, provenance of the
images, the Synthetic labels, the streaming writer, interrupted writes."""

import io
import json
import os
import tracemalloc

import numpy as np
import pytest

from fedjax_lab.data import disk
from fedjax_lab.data import image_population
from fedjax_lab.data import populations
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.data.sources import mnist
from fedjax_lab.data.sources import synthetic
from fedjax_lab.training import api

NUM_CLIENTS = 200
SMALL = {"min_examples": 3, "max_examples": 9}


def _files(directory: str) -> dict[str, bytes]:
  """Relative path -> bytes of every file under ``directory``."""
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  return image_population.write_image_population(
      str(tmp_path_factory.mktemp("pop") / "image"), NUM_CLIENTS,
      pixel_dtype="uint8", **SMALL)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return populations.write_synthetic_population(
      str(tmp_path_factory.mktemp("pop") / "synthetic"), NUM_CLIENTS,
      alpha=0.5, beta=0.5, **SMALL)


def test_sizes_and_metadata(image_dir, synthetic_dir):
  image, synth = disk.open_dataset(image_dir), disk.open_dataset(synthetic_dir)
  for dataset in (image, synth):
    sizes = dataset.train.client_sizes
    assert dataset.train.num_clients == NUM_CLIENTS
    assert sizes.min() >= 3 and sizes.max() <= 9
    assert set(np.unique(sizes)) == set(range(3, 10))  # every size occurs
  assert image.test.num_clients == 100  # max(100, 1% of 200)
  assert image.train.features["x"].dtype == np.uint8
  assert image.input_shape == (28, 28, 1) and image.num_classes == 10
  assert image.info["generator"].endswith("write_image_population")
  assert "not real users" in image.info["source"]
  assert image.info["x_scale"] == pytest.approx(1 / 255)
  # Synthetic: same clients in both splits, ceil(0.2 n) held out each.
  np.testing.assert_array_equal(synth.test.client_ids, synth.train.client_ids)
  np.testing.assert_array_equal(synth.test.client_sizes,
                                np.ceil(0.2 * synth.train.client_sizes))
  assert synth.info["alpha"] == 0.5 and synth.input_shape == (60,)


@pytest.mark.parametrize("kind", ["synthetic", "image"])
def test_bytes_do_not_depend_on_the_chunk_size(kind, tmp_path):
  write = {"synthetic": populations.write_synthetic_population,
           "image": image_population.write_image_population}[kind]
  written = [_files(write(str(tmp_path / f"{kind}{chunk}"), 150, seed=3,
                          chunk_clients=chunk, **SMALL))
             for chunk in (7, 64)]
  assert written[0] == written[1]
  other_seed = _files(write(str(tmp_path / f"{kind}s"), 150, seed=4,
                            chunk_clients=64, **SMALL))
  assert other_seed["train/feature-x.npy"] != written[0]["train/feature-x.npy"]


def _style(image: np.ndarray, shift_rows: int, shift_cols: int,
           multiplier: int) -> np.ndarray:
  """The documented writer style, written independently with np.roll."""
  moved = np.roll(image.astype(np.int64), (shift_rows, shift_cols), (-2, -1))
  if shift_rows > 0:
    moved[..., :shift_rows, :] = 0
  elif shift_rows < 0:
    moved[..., shift_rows:, :] = 0
  if shift_cols > 0:
    moved[..., :shift_cols] = 0
  elif shift_cols < 0:
    moved[..., shift_cols:] = 0
  return np.minimum((moved * multiplier + 32) >> 6, 255).astype(np.uint8)


def test_images_are_styled_real_digits_and_test_digits_are_held_out(
    image_dir):
  dataset = disk.open_dataset(image_dir)
  digits = np.rint(mnist.centralized_arrays()["x"][..., 0] * 255).astype(
      np.uint8)
  digit_labels = mnist.centralized_arrays()["y"]
  train_rows, test_rows = image_population.source_digit_split()
  assert len(test_rows) == 1000 and not set(train_rows) & set(test_rows)
  for split, store, allowed in ((populations.TRAIN, dataset.train,
                                 train_rows),
                                (populations.TEST, dataset.test, test_rows)):
    for index in range(store.num_clients):
      client = store.client(index)
      draws = image_population.image_client(0, split, index, alpha=0.3,
                                            **SMALL)
      assert draws["size"] == len(client["y"])
      assert set(draws["source_rows"]) <= set(allowed)
      np.testing.assert_array_equal(client["y"],
                                    digit_labels[draws["source_rows"]])
      multiplier = image_population.INTENSITY_MULTIPLIERS[draws["level"]]
      expected = _style(digits[draws["source_rows"]], *draws["shift"],
                        multiplier)
      np.testing.assert_array_equal(client["x"][..., 0], expected)
  # Un-shifting a level-4 (scale 1) client's image recovers a source digit.
  client = next(i for i in range(NUM_CLIENTS)
                if image_population.image_client(
                    0, 0, i, alpha=0.3, **SMALL)["level"] == 4)
  draws = image_population.image_client(0, 0, client, alpha=0.3, **SMALL)
  rows, cols = draws["shift"]
  image = dataset.train.client(client)["x"][0, ..., 0]
  unshifted = image[max(rows, 0):28 + min(rows, 0), max(cols, 0):28 + min(
      cols, 0)]
  crops = digits[:, max(-rows, 0):28 + min(-rows, 0),
                 max(-cols, 0):28 + min(-cols, 0)]
  matches = np.flatnonzero((crops == unshifted).all(axis=(1, 2)))
  assert draws["source_rows"][0] in matches


def test_float16_pixels_are_uint8_pixels_over_255(image_dir, tmp_path):
  as_float = disk.open_dataset(image_population.write_image_population(
      str(tmp_path / "f16"), NUM_CLIENTS, **SMALL))
  as_uint8 = disk.open_dataset(image_dir)
  x = as_float.train.features["x"]
  assert x.dtype == np.float16 and 0 <= x.min() and x.max() <= 1
  np.testing.assert_array_equal(
      x, (as_uint8.train.features["x"] / 255.0).astype(np.float16))
  np.testing.assert_array_equal(as_float.test.features["y"],
                                as_uint8.test.features["y"])


def test_synthetic_labels_are_each_clients_own_argmax(synthetic_dir):
  dataset = disk.open_dataset(synthetic_dir)
  feature_std = np.sqrt(np.arange(1, 61, dtype=np.float64) ** -1.2)
  for k in range(NUM_CLIENTS):
    # The documented scheme, re-derived here.
    rng = np.random.default_rng([0, 0, k])
    size = 3 + int(rng.random() * 7)
    held_out = int(np.ceil(0.2 * size))
    z = rng.standard_normal(672 + (size + held_out) * 60)
    w = 0.5 * z[0] + z[2:602].reshape(60, 10)
    b = 0.5 * z[0] + z[602:612]
    v = 0.5 * z[1] + z[612:672]
    x = v + feature_std * z[672:].reshape(-1, 60)
    stored_x = np.concatenate([dataset.train.client(k)["x"],
                               dataset.test.client(k)["x"]])
    stored_y = np.concatenate([dataset.train.client(k)["y"],
                               dataset.test.client(k)["y"]])
    np.testing.assert_array_equal(stored_x, x.astype(np.float32))
    np.testing.assert_array_equal(stored_y, np.argmax(x @ w + b, axis=1))
  assert dataset.train.features["y"].dtype == np.int32
  assert len(np.unique(dataset.train.features["y"])) == synthetic.NUM_CLASSES


def test_streaming_writer_equals_write_dataset_and_numpy_save(tmp_path):
  dataset = load_dataset("synthetic", num_clients=20)
  whole = disk.write_dataset(dataset, str(tmp_path / "whole"))
  with disk.DatasetWriter(str(tmp_path / "chunks"), name=dataset.name,
                          num_classes=dataset.num_classes,
                          input_shape=dataset.input_shape,
                          info=dataset.info) as writer:
    for split in disk.SPLITS:
      store = getattr(dataset, split)
      # Uneven chunks, one of zero clients.
      for start, stop in ((0, 3), (3, 3), (3, 11), (11, 20)):
        chunk = store.subset(np.arange(start, stop))
        writer.add_clients(split, chunk.client_ids, chunk.features,
                           chunk.client_sizes)
  assert _files(whole) == _files(writer.directory)
  for split in disk.SPLITS:
    store = getattr(dataset, split)
    for name, array in [("offsets", store.offsets),
                        ("client_ids", store.client_ids.astype(str)),
                        *[(f"feature-{n}", a)
                          for n, a in store.features.items()]]:
      buffer = io.BytesIO()
      np.save(buffer, array)
      assert _files(whole)[f"{split}/{name}.npy"] == buffer.getvalue()


def test_writer_refuses_mismatched_chunks_and_leaves_nothing(tmp_path):
  path = str(tmp_path / "d")
  x = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match="every chunk must match"):
    with disk.DatasetWriter(path, name="d", num_classes=2,
                            input_shape=(2,)) as writer:
      writer.add_clients("train", ["a"], {"x": x}, [4])
      writer.add_clients("train", ["b"], {"x": x.astype(np.float64)}, [4])
  with pytest.raises(ValueError, match="no clients were added"):
    with disk.DatasetWriter(path, name="d", num_classes=2,
                            input_shape=(2,)) as writer:
      writer.add_clients("train", ["a"], {"x": x}, [4])
  assert os.listdir(tmp_path) == []


def test_an_interrupted_population_leaves_no_folder(tmp_path):
  def interrupt(split, done, total):
    raise KeyboardInterrupt
  path = str(tmp_path / "image")
  with pytest.raises(KeyboardInterrupt):
    image_population.write_image_population(path, 50, chunk_clients=10,
                                       progress=interrupt, **SMALL)
  assert os.listdir(tmp_path) == []
  image_population.write_image_population(path, 50, **SMALL)  # a retry works
  with pytest.raises(FileExistsError):
    populations.write_synthetic_population(path, 50)


def test_memory_is_o_chunk_whatever_the_population(tmp_path):
  peaks = {}
  for num_clients in (1_000, 8_000):
    tracemalloc.start()
    try:
      populations.write_synthetic_population(
          str(tmp_path / str(num_clients)), num_clients, chunk_clients=500)
      peaks[num_clients] = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
  assert peaks[8_000] < 1.2 * peaks[1_000], peaks


def test_a_population_trains_with_the_disk_source(image_dir, tmp_path):
  config = api.default_config(**{
      "data.name": "disk", "data.path": image_dir, "model.name": "logistic",
      "num_rounds": 2, "cohort_size": 4, "client.max_steps": 2,
      "metrics_sinks": ""})
  result = api.simulate(config, workdir=str(tmp_path / "run"))
  assert len(result.history) == 2
  with open(os.path.join(image_dir, disk.META_FILE)) as f:
    assert json.load(f)["info"]["num_clients"] == NUM_CLIENTS
