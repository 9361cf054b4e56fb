"""Datasets on disk: exact round trips, O(cohort) reads, refusals."""

import json
import os
import tracemalloc

import jax
import numpy as np
import pytest

from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data import disk
from fedjax_lab.data.federated import ClientStore, FederatedDataset
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.training import api


def _assert_same_store(a: ClientStore, b: ClientStore) -> None:
  np.testing.assert_array_equal(a.offsets, b.offsets)
  np.testing.assert_array_equal(a.client_ids, b.client_ids)
  assert a.feature_names == b.feature_names
  for name in a.feature_names:
    assert a.features[name].dtype == b.features[name].dtype
    np.testing.assert_array_equal(a.features[name], b.features[name])


@pytest.mark.parametrize("source", ["synthetic", "digits", "mnist",
                                    "shakespeare"])
def test_every_source_round_trips_exactly(source, tmp_path):
  original = load_dataset(source)
  written = disk.write_dataset(original, str(tmp_path / source))
  for mmap in (True, False):
    opened = disk.open_dataset(written, mmap=mmap)
    for split in ("train", "test"):
      _assert_same_store(getattr(original, split), getattr(opened, split))
    assert opened.name == original.name
    assert opened.num_classes == original.num_classes
    assert opened.input_shape == original.input_shape
  mapped = disk.open_dataset(written).train.features["x"]
  assert isinstance(mapped, np.memmap) and mapped.mode == "r"


def _population(num_clients: int, examples_per_client: int = 4):
  rng = np.random.default_rng(0)
  total = num_clients * examples_per_client
  store = ClientStore(
      np.array([str(i) for i in range(num_clients)]),
      np.arange(0, total + 1, examples_per_client, dtype=np.int64),
      {"x": rng.normal(size=(total, 16)).astype(np.float32),
       "y": rng.integers(0, 10, size=total).astype(np.int32)})
  return FederatedDataset("population", store, store, 10, (16,))


def _cohort_peak_bytes(store: ClientStore) -> int:
  clients = np.arange(0, store.num_clients, store.num_clients // 20)[:20]
  tracemalloc.start()
  try:
    cohort_lib.make_round_cohort(store, clients, batch_size=2, num_epochs=1,
                                 max_steps=None, seed=0, round_index=3,
                                 fixed_cohort_size=20)
    return tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()


def test_a_cohort_reads_o_cohort_memory_whatever_the_population(tmp_path):
  peaks = {}
  for num_clients in (2_000, 200_000):
    path = disk.write_dataset(_population(num_clients),
                              str(tmp_path / str(num_clients)))
    store = disk.open_dataset(path).train
    _cohort_peak_bytes(store)  # first call: lazy imports, caches
    peaks[num_clients] = _cohort_peak_bytes(store)
  # The 200k-client columns are 100x larger (~13 MB); the cohort is not.
  assert peaks[200_000] < 1.2 * peaks[2_000] + 64 * 1024, peaks
  assert peaks[200_000] < 1_000_000, peaks


def test_a_run_on_the_disk_source_equals_the_run_in_memory(tmp_path):
  dataset = load_dataset("synthetic", num_clients=12)
  path = disk.write_dataset(dataset, str(tmp_path / "synthetic"))
  common = {"model.name": "logistic", "num_rounds": 2, "cohort_size": 4,
            "client.max_steps": 3, "metrics_sinks": ""}
  in_memory = api.simulate(api.default_config(**common), dataset=dataset,
                           workdir=str(tmp_path / "memory"))
  on_disk = api.simulate(
      api.default_config(**common, **{"data.name": "disk",
                                      "data.path": path}),
      workdir=str(tmp_path / "disk"))
  untimed = lambda history: [
      {k: v for k, v in r.items() if not k.endswith("seconds")}
      for r in history]
  assert untimed(on_disk.history) == untimed(in_memory.history)
  for a, b in zip(jax.tree.leaves(on_disk.params),
                  jax.tree.leaves(in_memory.params)):
    np.testing.assert_array_equal(a, b)


def test_refusals_say_what_to_do(tmp_path):
  dataset = _population(10)
  path = disk.write_dataset(dataset, str(tmp_path / "d"))
  with pytest.raises(FileExistsError, match="new folder"):
    disk.write_dataset(dataset, path)
  with pytest.raises(FileNotFoundError, match="write_dataset"):
    disk.open_dataset(str(tmp_path / "missing"))
  meta_path = os.path.join(path, disk.META_FILE)
  with open(meta_path) as f:
    meta = json.load(f)
  meta["format_version"] = 99
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(ValueError, match="Write the dataset again"):
    disk.open_dataset(path)
  with pytest.raises(ValueError, match="data.path"):
    load_dataset("disk")
  assert not os.path.exists(path + ".partial")
