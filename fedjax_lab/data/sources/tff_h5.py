"""Federated datasets from TensorFlow Federated's HDF5 files (a local copy).

Older ``tff.simulation.datasets`` releases downloaded EMNIST, Shakespeare,
Stack Overflow and CIFAR-100 as archives of one HDF5 file per split, read by
TFF's ``HDF5ClientData``. A researcher who has those files can train on them
with a config whose ``data.name = "tff_h5"`` and ``data.path =
DIR_OR_TRAIN_FILE``; no TensorFlow is needed and nothing is downloaded.

File layout (every dataset)::

  /examples/<client_id>/<feature>    one dataset per feature; its first axis
                                     indexes the client's examples

Client ids are the names of the groups under ``/examples``, taken in sorted
order (as ``HDF5ClientData`` does). The files of each dataset (``kind``):

* ``emnist``: ``fed_emnist_{train,test}.h5`` (62 classes) or
  ``fed_emnist_digitsonly_{train,test}.h5`` (10 classes);
* ``shakespeare``: ``shakespeare_{train,test}.h5``;
* ``stackoverflow``: ``stackoverflow_{train,held_out,test}.h5`` plus the
  vocabulary file ``stackoverflow.word_count``;
* ``cifar100``: ``fed_cifar100_{train,test}.h5``.

Their raw features, and the ``x``/``y`` arrays and options of the loaded
clients, are those of :mod:`fedjax_lab.data.sources.federated_files` (shared
with :mod:`fedjax_lab.data.sources.fedjax_sqlite`, whose files hold the same
features).
"""

from __future__ import annotations

import os
from typing import Mapping

from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.data.sources import federated_files
from fedjax_lab.data.sources.federated_files import FileLayoutError

# kind -> (train, test) file names TFF's archives hold.
CANONICAL_FILES: Mapping[str, tuple[tuple[str, str], ...]] = {
    "emnist": (("fed_emnist_train.h5", "fed_emnist_test.h5"),
               ("fed_emnist_digitsonly_train.h5",
                "fed_emnist_digitsonly_test.h5")),
    "shakespeare": (("shakespeare_train.h5", "shakespeare_test.h5"),),
    "stackoverflow": (("stackoverflow_train.h5", "stackoverflow_test.h5"),),
    "cifar100": (("fed_cifar100_train.h5", "fed_cifar100_test.h5"),),
}

H5_LAYOUT = ("TFF's HDF5 client data: a group /examples holding one group per "
             "client, /examples/<client_id>/<feature>, one dataset per "
             "feature whose first axis indexes the client's examples")


class _H5Split(federated_files.SplitReader):
  """One TFF HDF5 file, opened read-only."""

  def __init__(self, path: str, max_clients: int):
    import h5py  # pylint: disable=import-outside-toplevel
    self.path = path
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path} does not exist ({H5_LAYOUT}).")
    try:
      self._file = h5py.File(path, "r")
    except OSError as e:
      raise FileLayoutError(f"{path} is not an HDF5 file ({e}); expected "
                            f"{H5_LAYOUT}.") from None
    examples = self._file.get("examples")
    problem = None
    if not isinstance(examples, h5py.Group):
      problem = f"{path} has no group /examples"
    elif not examples.keys():
      problem = f"{path}: /examples holds no clients"
    if problem:
      self._file.close()
      raise FileLayoutError(f"{problem}; expected {H5_LAYOUT}.")
    self._examples = examples
    ids = sorted(examples.keys())
    self.client_ids = ids[:max_clients] if max_clients else ids

  def _group(self, client_id: str):
    import h5py  # pylint: disable=import-outside-toplevel
    group = self._examples[client_id]
    if not isinstance(group, h5py.Group):
      raise FileLayoutError(
          f"{self.path}: /examples/{client_id} is not a group; expected "
          f"{H5_LAYOUT}.")
    return group

  def feature_names(self) -> set[str]:
    return set(self._group(self.client_ids[0]).keys())

  def clients(self, names):
    for client_id in self.client_ids:
      group = self._group(client_id)
      missing = [n for n in names if n not in group]
      if missing:
        raise FileLayoutError(
            f"{self.path}: client {client_id!r} has features "
            f"{sorted(group.keys())}, lacking {missing}; every client of "
            f"this dataset needs {list(names)} ({H5_LAYOUT}).")
      raw = {n: group[n][()] for n in names}
      lengths = {n: len(a) for n, a in raw.items()}
      if len(set(lengths.values())) != 1:
        raise FileLayoutError(
            f"{self.path}: client {client_id!r} has features of different "
            f"lengths {lengths}.")
      yield client_id, raw

  def close(self) -> None:
    self._file.close()


def load(path: str = "", test_path: str = "", kind: str = "",
         max_clients: int = 0, sequence_length: int = 0,
         vocab_size: int = federated_files.DEFAULT_VOCAB_SIZE,
         word_count_path: str = "",
         max_examples_per_client: int = (
             federated_files.DEFAULT_MAX_EXAMPLES_PER_CLIENT),
         invert_pixels: bool = True) -> FederatedDataset:
  """A TFF HDF5 dataset (files: the module docstring; features:
  :mod:`fedjax_lab.data.sources.federated_files`).

  Args:
    path: a folder holding TFF's files under their usual names (e.g.
      ``fed_emnist_train.h5`` and ``fed_emnist_test.h5``), or the train file.
    test_path: the test file (default: the folder's test file, or the train
      file's name with ``_train`` replaced by ``_test``); e.g.
      ``stackoverflow_held_out.h5``.
    kind: ``"emnist"``, ``"shakespeare"``, ``"stackoverflow"`` or
      ``"cifar100"``; empty: detected from the features.
    max_clients: read only the first this many clients of each file (in
      sorted id order); 0 = all. For quick runs.
    sequence_length: text models' input length; 0 = 80 (Shakespeare) or 20
      (Stack Overflow).
    vocab_size: Stack Overflow vocabulary size ``V``.
    word_count_path: Stack Overflow vocabulary file (``"<word> <count>"``
      lines); default ``stackoverflow.word_count`` next to the train file if
      there, else the words are counted over the loaded training clients.
    max_examples_per_client: Stack Overflow: posts kept per training client
      (the first ones); 0 = all.
    invert_pixels: EMNIST: ``x = 1 - pixels`` (0 background, as ``mnist``);
      False keeps TFF's 1.0 background.

  Raises:
    FileNotFoundError: a file does not exist.
    FileLayoutError: a file is not laid out as TFF's (the message says how).
    ValueError: no ``path``, an unknown ``kind`` or an invalid option.
  """
  return federated_files.load_split_files(
      _H5Split, source="tff_h5", prefix="tff", layout=H5_LAYOUT,
      canonical=CANONICAL_FILES,
      info={"source": "TensorFlow Federated HDF5 client data (local files)"},
      path=path, test_path=test_path, kind=kind, max_clients=max_clients,
      sequence_length=sequence_length, vocab_size=vocab_size,
      word_count_path=word_count_path,
      max_examples_per_client=max_examples_per_client,
      invert_pixels=invert_pixels)
