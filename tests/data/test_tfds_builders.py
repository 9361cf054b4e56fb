"""Tests of the TFDS builders: prepared offline, read back with TFDS's own
``as_data_source`` (no TensorFlow), equal to the direct sources."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

# pylint: disable=g-import-not-at-top,wrong-import-position
from fedjax_lab.data import tfds_builders
from fedjax_lab.data.sources import load_dataset

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True, scope="module")
def _quiet():
  tfds.disable_progress_bar()


def _read_clients(source) -> tuple[list[str], dict[str, list[np.ndarray]]]:
  """Client ids in first-seen order and their features, per client, from a
  TFDS data source read in index order."""
  examples = source.__getitems__(list(range(len(source))))
  ids, per_client = [], {}
  for example in examples:
    client = example[tfds_builders.CLIENT_ID].decode("utf-8")
    if not ids or ids[-1] != client:
      assert client not in per_client, f"client {client} is not contiguous"
      ids.append(client)
      per_client[client] = []
    per_client[client].append(example)
  return ids, per_client


def _assert_matches_store(source, store, num_clients):
  """The TFDS split holds exactly the store's first ``num_clients``."""
  ids, per_client = _read_clients(source)
  assert ids == [str(c) for c in store.client_ids[:num_clients]]
  for index, client in enumerate(ids):
    expected = store.client(index)
    got = per_client[client]
    assert len(got) == len(expected["y"])
    for name, column in expected.items():
      if column.ndim > 1:  # TFDS returns arrays, and scalars as Python's.
        assert got[0][name].dtype == column.dtype
      values = np.asarray([e[name] for e in got], dtype=column.dtype)
      np.testing.assert_array_equal(values, column)
      assert values.shape == column.shape


# Small load() options so that each source builds in about a second.
_CASES = {
    "shakespeare": {"sequence_length": 40},
    "shakespeare_words": {},
    "mnist": {"num_clients": 20},
    "digits": {"num_clients": 10},
    "synthetic": {"num_clients": 6},
}


@pytest.mark.parametrize("source", sorted(_CASES))
def test_round_trip_equals_direct_source(source, tmp_path):
  load_kwargs = dict(_CASES[source])
  if source.startswith("shakespeare"):
    load_kwargs["cache_dir"] = str(tmp_path / "cache")
  config = tfds_builders.SourceConfig(
      name="test", load_kwargs=load_kwargs, max_clients=3)
  builder = tfds_builders.prepare(source, str(tmp_path / "tfds"), config)
  assert builder.name == f"fedjax_lab_{source}"
  assert builder.info.full_name == f"fedjax_lab_{source}/test/1.0.0"
  direct = load_dataset(source, **load_kwargs)
  data = builder.as_data_source()
  assert set(data) == {"train", "test"}
  _assert_matches_store(data["train"], direct.train, 3)
  _assert_matches_store(data["test"], direct.test, 3)
  metadata = builder.info.metadata
  assert metadata["num_classes"] == direct.num_classes
  assert tuple(metadata["input_shape"]) == direct.input_shape
  assert metadata["name"] == direct.name
  assert metadata["num_clients"] == {"train": 3, "test": 3}
  assert metadata["client_id_feature"] == "client_id"
  if source == "shakespeare_words":
    assert tuple(metadata["info"]["vocab"]) == direct.info["vocab"]
    assert metadata["info"]["eos_id"] == direct.info["eos_id"]


def test_whole_dataset_and_reading_without_the_builder(tmp_path):
  """All 30 synthetic clients; read back through the folder alone."""
  builder = tfds_builders.prepare("synthetic", str(tmp_path))
  direct = load_dataset("synthetic")
  assert builder.info.full_name == "fedjax_lab_synthetic/default/1.0.0"
  assert builder.info.splits["train"].num_examples == direct.train.num_examples
  reader = tfds.builder_from_directory(builder.data_dir)
  for split, store in (("train", direct.train), ("test", direct.test)):
    _assert_matches_store(reader.as_data_source(split=split), store,
                          store.num_clients)
  assert reader.info.metadata["num_classes"] == 10
  assert reader.info.metadata["info"]["client_sizes"] == (
      direct.info["client_sizes"])
  # Registered under its TFDS name: tfds.builder finds the prepared copy.
  again = tfds.builder("fedjax_lab_synthetic", data_dir=str(tmp_path))
  assert again.info.splits["test"].num_examples == direct.test.num_examples


def test_registered_configs_and_names(tmp_path):
  assert tfds_builders.tfds_name("shakespeare_words") == (
      "fedjax_lab_shakespeare_words")
  assert sorted(tfds_builders.BUILDERS) == [
      "digits", "mnist", "shakespeare", "shakespeare_words", "synthetic"]
  iid = tfds_builders.builder("synthetic", str(tmp_path), "iid",
                              max_clients=2)
  assert iid.builder_config.name == "iid_first2"
  assert iid.builder_config.load_kwargs == {"iid": True}
  assert iid.builder_config.max_clients == 2
  char = tfds_builders.builder("shakespeare", str(tmp_path))
  assert char.builder_config.name == "default"
  assert char.info.features["x"].shape == (80,)
  words = tfds_builders.builder("shakespeare_words", str(tmp_path))
  assert words.info.features["y"].shape == (20,)
  seq40 = tfds_builders.builder("shakespeare", str(tmp_path),
                                tfds_builders.SourceConfig(
                                    name="seq40",
                                    load_kwargs={"sequence_length": 40}))
  assert seq40.info.features["x"].shape == (40,)


def test_errors(tmp_path):
  with pytest.raises(ValueError, match="no TFDS builder for source 'disk'"):
    tfds_builders.builder("disk", str(tmp_path))
  with pytest.raises(ValueError, match="no config 'nope'"):
    tfds_builders.builder("mnist", str(tmp_path), "nope")
  with pytest.raises(ValueError, match="max_clients"):
    tfds_builders.builder("mnist", str(tmp_path), max_clients=0)
  bad = tfds_builders.SourceConfig(name="bad", load_kwargs={"colour": 1})
  with pytest.raises(TypeError, match="unknown load\\(\\) argument"):
    tfds_builders.builder("digits", str(tmp_path), bad)


def test_reuses_prepared_dataset(tmp_path):
  config = tfds_builders.SourceConfig(name="tiny", load_kwargs={
      "num_clients": 4}, max_clients=2)
  first = tfds_builders.prepare("synthetic", str(tmp_path), config)
  files = sorted(pathlib.Path(first.data_dir).iterdir())
  stamps = [f.stat().st_mtime_ns for f in files]
  tfds_builders.prepare("synthetic", str(tmp_path),
                        dataclasses.replace(config))
  assert [f.stat().st_mtime_ns for f in files] == stamps


def test_command_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  command = [sys.executable, "-m", "experiments.prepare_tfds",
             "--datasets=synthetic,synthetic/iid", f"--data_dir={tmp_path}",
             "--max_clients=2"]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  report = json.loads(result.stdout.strip().splitlines()[-1])
  assert [r["tfds_name"] for r in report] == [
      "fedjax_lab_synthetic/default_first2/1.0.0",
      "fedjax_lab_synthetic/iid_first2/1.0.0"]
  assert report[0]["clients"] == {"train": 2, "test": 2}
  for entry in report:
    assert pathlib.Path(entry["path"]).is_dir()
  with_kwargs = subprocess.run(
      [*command[:3], "--datasets=synthetic", f"--data_dir={tmp_path}",
       '--load_kwargs={"num_clients": 4}', "--max_clients=1"], cwd=ROOT,
      env=env, capture_output=True, text=True, timeout=300, check=False)
  assert with_kwargs.returncode == 0, with_kwargs.stderr
  config = tfds_builders.config_for("synthetic", {"num_clients": 4})
  assert json.loads(with_kwargs.stdout.strip().splitlines()[-1])[0][
      "tfds_name"] == f"fedjax_lab_synthetic/{config.name}_first1/1.0.0"
  bad = subprocess.run([*command[:3], "--datasets=nope",
                        f"--data_dir={tmp_path}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300,
                       check=False)
  assert bad.returncode == 2
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "error: no TFDS builder for source 'nope'")


@pytest.mark.parametrize("source,load_kwargs,max_clients", [
    ("synthetic", {}, None),
    ("shakespeare_words", {"sequence_length": 12}, 4),
])
def test_generic_reader_round_trip(source, load_kwargs, max_clients,
                                   tmp_path):
  """Prepared here, read back by the ``tfds`` source: the direct dataset."""
  if source.startswith("shakespeare"):
    load_kwargs = {**load_kwargs, "cache_dir": str(tmp_path / "cache")}
  config = tfds_builders.SourceConfig(name="roundtrip",
                                      load_kwargs=load_kwargs)
  builder = tfds_builders.prepare(source, str(tmp_path / "tfds"), config,
                                  max_clients=max_clients)
  name = (f"{builder.name}/{builder.builder_config.name}:"
          f"{builder.version}")
  read = load_dataset("tfds", tfds_name=name, data_dir=str(tmp_path / "tfds"))
  direct = load_dataset(source, **load_kwargs)
  assert read.name == direct.name
  assert read.num_classes == direct.num_classes
  assert read.input_shape == direct.input_shape
  for split in ("train", "test"):
    expected = getattr(direct, split)
    if max_clients is not None:
      expected = expected.subset(np.arange(max_clients))
    got = getattr(read, split)
    np.testing.assert_array_equal(got.client_ids, expected.client_ids)
    np.testing.assert_array_equal(got.offsets, expected.offsets)
    assert set(got.features) == set(expected.features)
    for feature, column in expected.features.items():
      assert got.features[feature].dtype == column.dtype
      np.testing.assert_array_equal(got.features[feature], column)
  if source == "shakespeare_words":
    assert tuple(read.info["vocab"]) == direct.info["vocab"]


def test_config_for_load_arguments(tmp_path):
  default = tfds_builders.config_for("shakespeare", {})
  assert default.name == "default"
  # Defaults and cache_dir do not change the data: still the default config.
  assert tfds_builders.config_for(
      "shakespeare", {"sequence_length": 80, "cache_dir": "x"}) is default
  assert tfds_builders.config_for("synthetic", {"iid": True}).name == "iid"
  custom = tfds_builders.config_for("shakespeare", {"sequence_length": 40,
                                                    "cache_dir": "x"})
  assert custom.name.startswith("kw_")
  assert custom.load_kwargs == {"sequence_length": 40}
  assert tfds_builders.config_for(
      "shakespeare", {"sequence_length": 40}).name == custom.name
  assert tfds_builders.config_for(
      "shakespeare", {"sequence_length": 41}).name != custom.name
  with pytest.raises(TypeError, match="unknown argument"):
    tfds_builders.config_for("mnist", {"colour": 1})
  with_cache = tfds_builders.builder(
      "shakespeare", str(tmp_path), custom,
      load_overrides={"cache_dir": str(tmp_path)})
  assert with_cache.load_overrides == {"cache_dir": str(tmp_path)}
  assert with_cache.info.features["x"].shape == (40,)
  with pytest.raises(ValueError, match="load_overrides"):
    tfds_builders.builder("shakespeare", str(tmp_path), custom,
                          load_overrides={"sequence_length": 5})


def test_load_through_tfds_equals_direct(tmp_path):
  data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError):
    tfds_builders.load_through_tfds("synthetic", data_dir,
                                    prepare_if_missing=False, num_clients=5)
  read = tfds_builders.load_through_tfds("synthetic", data_dir,
                                         num_clients=5, seed=3)
  again = tfds_builders.load_through_tfds("synthetic", data_dir,
                                          prepare_if_missing=False,
                                          num_clients=5, seed=3)
  direct = load_dataset("synthetic", num_clients=5, seed=3)
  assert read.info["tfds_name"].startswith("fedjax_lab_synthetic/kw_")
  assert (read.name, read.num_classes, read.input_shape) == (
      direct.name, direct.num_classes, direct.input_shape)
  for other in (read, again):
    for split in ("train", "test"):
      got, expected = getattr(other, split), getattr(direct, split)
      np.testing.assert_array_equal(got.client_ids, expected.client_ids)
      np.testing.assert_array_equal(got.offsets, expected.offsets)
      for name, column in expected.features.items():
        assert got.features[name].dtype == column.dtype
        np.testing.assert_array_equal(got.features[name], column)


def test_config_data_backend_chooses_tfds_or_direct(tmp_path):
  """``config.data.backend="tfds"`` trains on the TFDS-served dataset, which
  equals the direct one; an unknown backend is refused by name."""
  from fedjax_lab.training import setup  # pylint: disable=g-import-not-at-top
  from tests import config_helpers  # pylint: disable=g-import-not-at-top
  config = config_helpers.tiny_config("synthetic_logreg_fedavg")
  config.data.num_clients = 5
  direct = setup.build_experiment(config).dataset
  config.data.backend = "tfds"
  config.data.tfds_data_dir = str(tmp_path)
  served = setup.build_experiment(config).dataset
  assert served.info["tfds_name"].startswith("fedjax_lab_synthetic/")
  for split in ("train", "test"):
    got, expected = getattr(served, split), getattr(direct, split)
    np.testing.assert_array_equal(got.client_ids, expected.client_ids)
    for name, column in expected.features.items():
      np.testing.assert_array_equal(got.features[name], column)
  config.data.backend = "parquet"
  with pytest.raises(ValueError, match="data.backend must be one of"):
    setup.build_experiment(config)
