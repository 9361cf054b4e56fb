"""Dataset sources: one module per dataset, all returning a FederatedDataset.

``load_dataset(name, **kwargs)`` dispatches to ``<module>.load(**kwargs)``;
modules are imported lazily so importing this package stays cheap.

Besides the built-in datasets, four names read files a researcher has
downloaded elsewhere (nothing is fetched at run time):

* ``tff_h5``: TensorFlow Federated's HDF5 client data (EMNIST, Shakespeare,
  Stack Overflow, CIFAR-100), ``data.path`` = a folder or a train file
  (:mod:`.tff_h5`);
* ``tff_sqlite``: TensorFlow Federated's newer SQLite client data (one
  ``*.sqlite`` database per dataset holding every split), the same datasets
  (:mod:`.tff_sqlite`);
* ``fedjax_sqlite``: FedJAX's SQLite federated data, the same datasets
  (:mod:`.fedjax_sqlite`);
* ``tfds``: a prepared TFDS dataset whose examples carry a client id,
  ``data.tfds_name`` + ``data.data_dir`` (:mod:`.tfds_clients`).

``backend="tfds"`` (``config.data.backend``) serves a built-in dataset
through TFDS instead of its direct loader (:mod:`fedjax_lab.data.
tfds_builders` prepares it once under ``tfds_data_dir``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from fedjax_lab.data.federated import FederatedDataset

# Dataset name -> module (under fedjax_lab.data.sources) with a load().
_REGISTRY = {
    "shakespeare": "shakespeare",
    "shakespeare_words": "shakespeare_words",
    "synthetic": "synthetic",
    "mnist": "mnist",
    "digits": "digits",
    "disk": "disk",
    "tff_h5": "tff_h5",
    "tff_sqlite": "tff_sqlite",
    "fedjax_sqlite": "fedjax_sqlite",
    "tfds": "tfds_clients",
}


def available_datasets() -> tuple[str, ...]:
  """Names accepted by :func:`load_dataset`, sorted."""
  return tuple(sorted(_REGISTRY))


BACKENDS = ("direct", "tfds")


def _source_module(name: str):
  """The module of registered dataset ``name`` (imported on first use)."""
  return importlib.import_module(f"{__name__}.{_REGISTRY[name]}")


def _who_takes(options: list[str]) -> str:
  """" (<option> is an option of: <datasets>)" for options other sources take,
  so a config switched between readers says which reader an option is for."""
  owners = {option: [] for option in options}
  for other in available_datasets():
    parameters = inspect.signature(_source_module(other).load).parameters
    for option in options:
      if option in parameters:
        owners[option].append(other)
  notes = [f"{option} is an option of: {', '.join(names)}"
           for option, names in owners.items() if names]
  return f" ({'; '.join(notes)})" if notes else ""


def load_dataset(name: str, backend: str = "direct", tfds_data_dir: str = "",
                 **kwargs: Any) -> FederatedDataset:
  """Loads the dataset ``name`` with the keyword arguments of its ``load``.

  Args:
    name: a registered dataset (:func:`available_datasets`).
    backend: ``"direct"`` (the source's ``load``) or ``"tfds"``: the same
      dataset published as a TFDS dataset (prepared once under
      ``tfds_data_dir`` by :mod:`fedjax_lab.data.tfds_builders`, then served
      by TFDS's reader; the arrays are the direct source's).
    tfds_data_dir: the TFDS data dir for ``backend="tfds"`` ("": TFDS's
      default).
    **kwargs: the source's ``load`` arguments. An argument the source does
      not take is dropped when it is left empty (``""``), so one config can
      declare the options of several file readers (e.g. ``data.test_split``,
      which only ``tff_sqlite`` takes) and be switched between them with
      ``data.name``.

  Raises:
    ValueError: ``name`` is not registered (the message lists valid names),
      an unknown ``backend``, or a source without a TFDS builder.
    TypeError: a non-empty keyword is not accepted by that dataset's
      ``load`` (the message names the dataset and its accepted keywords).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown dataset {name!r}; valid names: "
                     f"{', '.join(available_datasets())}.")
  if backend not in BACKENDS:
    raise ValueError(f"data.backend must be one of {BACKENDS}, got "
                     f"{backend!r}.")
  module = _source_module(name)
  accepted = inspect.signature(module.load).parameters
  kwargs = {key: value for key, value in kwargs.items()
            if key in accepted or value != ""}
  unknown = sorted(set(kwargs) - set(accepted))
  if unknown:
    raise TypeError(
        f"dataset {name!r} got unknown argument(s) {', '.join(unknown)}; it "
        f"accepts: {', '.join(accepted)}.{_who_takes(unknown)}")
  if backend == "tfds":
    # Imported here: tfds costs ~1 s to import, which direct loads skip.
    builders = importlib.import_module("fedjax_lab.data.tfds_builders")
    return builders.load_through_tfds(name, data_dir=tfds_data_dir or None,
                                      **kwargs)
  return module.load(**kwargs)
