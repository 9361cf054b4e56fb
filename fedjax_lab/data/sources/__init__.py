"""Dataset sources: one module per dataset, all returning a FederatedDataset.

``load_dataset(name, **kwargs)`` dispatches to ``<module>.load(**kwargs)``;
modules are imported lazily so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from fedjax_lab.data.federated import FederatedDataset

# Dataset name -> module (under fedjax_lab.data.sources) with a load().
_REGISTRY = {
    "shakespeare": "shakespeare",
    "synthetic": "synthetic",
    "mnist": "mnist",
    "digits": "digits",
    "disk": "disk",
}


def available_datasets() -> tuple[str, ...]:
  """Names accepted by :func:`load_dataset`, sorted."""
  return tuple(sorted(_REGISTRY))


def load_dataset(name: str, **kwargs: Any) -> FederatedDataset:
  """Loads the dataset ``name`` with the keyword arguments of its ``load``.

  Raises:
    ValueError: ``name`` is not registered (the message lists valid names).
    TypeError: a keyword is not accepted by that dataset's ``load`` (the
      message names the dataset and its accepted keywords).
  """
  if name not in _REGISTRY:
    raise ValueError(f"unknown dataset {name!r}; valid names: "
                     f"{', '.join(available_datasets())}.")
  module = importlib.import_module(f"{__name__}.{_REGISTRY[name]}")
  signature = inspect.signature(module.load)
  unknown = sorted(set(kwargs) - set(signature.parameters))
  if unknown:
    raise TypeError(
        f"dataset {name!r} got unknown argument(s) {', '.join(unknown)}; it "
        f"accepts: {', '.join(signature.parameters)}.")
  return module.load(**kwargs)
