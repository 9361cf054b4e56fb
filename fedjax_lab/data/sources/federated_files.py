"""TFF's federated datasets as files: their raw features -> our arrays.

TensorFlow Federated's EMNIST, Shakespeare, Stack Overflow and CIFAR-100 are
distributed as one file per split, in TFF's HDF5 layout
(:mod:`fedjax_lab.data.sources.tff_h5`) or FedJAX's SQLite layout
(:mod:`fedjax_lab.data.sources.fedjax_sqlite`), or as one database holding
every split in TFF's newer SQLite layout
(:mod:`fedjax_lab.data.sources.tff_sqlite`). All hold the same raw
features per client; this module checks and converts them, whatever the
file format. A format supplies a :class:`SplitReader` (client ids and their
raw arrays) and calls :func:`load_split_files` (one file per split) or
:func:`build_dataset`.

The raw features of each dataset (``kind``), as TFF's loaders document them:

* ``emnist``: ``pixels`` float32 ``[n, 28, 28]`` in ``[0, 1]`` with **1.0
  the background** (the inverse of MNIST); ``label`` int32, one per example
  (TFF documents each as shape ``[1]``, so ``[n]`` and ``[n, 1]`` are read):
  0-9 digits, 10-35 upper case, 36-61 lower case. The full (62 classes) and
  digits-only (10 classes) files have the same writers in train and test.
* ``shakespeare``: one client per (play, character), the same clients in both
  files. ``snippets``: variable-length byte strings ``[n]``, one speech each.
* ``stackoverflow``: train, held-out and test files plus the vocabulary file
  ``stackoverflow.word_count`` (lines ``"<word> <count>"``, most frequent
  first; the count is the number of training users using the word).
  Byte-string features ``tokens`` (a post's words separated by single
  spaces), ``title``, ``tags`` (``|``-separated), ``creation_date``, ``type``
  (``question`` / ``answer``) and int64 ``score``; only ``tokens`` is read.
* ``cifar100``: train clients ``"0"`` .. ``"499"`` and test clients ``"0"``
  .. ``"99"`` are different people. ``image`` uint8 ``[n, 32, 32, 3]``,
  ``label`` int64 (fine label, 0..99), ``coarse_label`` int64 (0..19).

What the loaded clients hold (the features the built-in sources produce, so
every model and config works on them):

* ``emnist``: ``x`` float32 ``[n, 28, 28, 1]``, ``y`` int32. By default
  ``x = 1 - pixels``: 0 is the background and 1 the ink, as in the ``mnist``
  source (pixels / 255) and in FedJAX's EMNIST preprocessing; the images are
  stored upright and row-major, like MNIST, so nothing is transposed.
  ``invert_pixels=False`` keeps TFF's values. ``num_classes`` is 10 when every
  label is a digit, else 62.
* ``shakespeare``: ``x``, ``y`` int32 ``[n, sequence_length]`` (default 80),
  tokenized by :mod:`fedjax_lab.data.sources.shakespeare` (its
  ``speeches_to_windows``): each snippet is ``[BOS] + chars + [EOS]`` cut into
  windows of ``sequence_length + 1``; bytes are decoded as UTF-8, a character
  outside the 86-character vocabulary is OOV. ``num_classes = 90``.
* ``stackoverflow``: next-word prediction as TFF's word-prediction baseline
  preprocesses it (:mod:`fedjax_lab.data.word_prediction`: ids pad 0, words
  ``1..V``, OOV ``V+1``, BOS ``V+2``, EOS ``V+3``, ``num_classes = V + 4``;
  one window ``[BOS] + ids[:L] (+ EOS)`` per post), with a vocabulary of
  ``vocab_size`` (default 10,000) words and ``L = sequence_length`` (default
  20); a post's words are split on ``" "``. A training client keeps its
  first ``max_examples_per_client`` posts (default 1,000, the per-user cap of
  the Reddi et al. 2021 / TFF research baselines; TFF's library default is no
  cap; 0 = no cap), test clients keep all. The vocabulary is the first
  ``vocab_size`` words of ``word_count_path`` (default:
  ``stackoverflow.word_count`` next to the train file, when present), else
  the ``vocab_size`` words used by the most loaded training clients (ties by
  word). Give the char-LSTM the ids: ``model.pad_id=0 model.oov_id=V+1
  model.bos_id=V+2 model.eos_id=V+3`` (``info`` lists them).
* ``cifar100``: ``x`` float32 ``[n, 32, 32, 3]`` = ``image / 255`` in
  ``[0, 1]`` (no per-channel normalisation; the ``mnist`` source's scaling),
  ``y`` int32 fine label; ``num_classes = 100``.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sqlite3
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

from fedjax_lab.data import word_prediction
from fedjax_lab.data.federated import ClientStore, FederatedDataset
from fedjax_lab.data.sources import shakespeare

KINDS = ("emnist", "shakespeare", "stackoverflow", "cifar100")

# The raw features each kind needs (and is recognised by).
REQUIRED_FEATURES: Mapping[str, tuple[str, ...]] = {
    "emnist": ("pixels", "label"),
    "shakespeare": ("snippets",),
    "stackoverflow": ("tokens",),
    "cifar100": ("image", "label"),
}
DEFAULT_SEQUENCE_LENGTH = {"shakespeare": 80, "stackoverflow": 20}
DEFAULT_VOCAB_SIZE = 10_000
DEFAULT_MAX_EXAMPLES_PER_CLIENT = 1000
# TFF counts the Stack Overflow vocabulary by clients only, ties by word.
STACKOVERFLOW_RANK_BY = ("clients",)


class FileLayoutError(ValueError):
  """A dataset file exists but is not laid out as its format requires; the
  message names the file and the expected layout."""


def expected_features_text() -> str:
  """The feature sets that identify each kind, for error messages."""
  return "; ".join(f"{kind}: {', '.join(names)}"
                   for kind, names in REQUIRED_FEATURES.items())


def check_kind(kind: str) -> str:
  """``kind`` if it is one of :data:`KINDS` or empty; else a ValueError."""
  if kind and kind not in KINDS:
    raise ValueError(f"unknown data.kind {kind!r}; valid kinds: "
                     f"{', '.join(KINDS)} (or '' to detect it from the "
                     "features).")
  return kind


def detect_kind(feature_names: Iterable[str], where: str) -> str:
  """The kind whose required features are all among ``feature_names``."""
  names = set(feature_names)
  for kind in ("emnist", "cifar100", "stackoverflow", "shakespeare"):
    if set(REQUIRED_FEATURES[kind]) <= names:
      return kind
  raise FileLayoutError(
      f"{where}: features {sorted(names)} match no known dataset; expected "
      f"one of: {expected_features_text()} (or set data.kind).")


def resolve_files(path: str, test_path: str, kind: str,
                  canonical: Mapping[str, Sequence[tuple[str, str]]],
                  source: str, layout: str) -> tuple[str, str]:
  """The (train, test) files ``path`` / ``test_path`` name.

  ``path`` is a folder holding one of the ``canonical`` (train, test) pairs
  (restricted to ``kind`` when given) or the train file itself; the test
  file is then ``test_path``, or the train file's name with its last
  ``_train`` replaced by ``_test``.

  Raises:
    ValueError: no ``path``, or a folder with several candidate datasets.
    FileNotFoundError: a file or folder that does not exist.
  """
  if not path:
    raise ValueError(
        f"data.name={source!r} needs data.path: a folder holding the "
        f"dataset's files or its train file ({layout}).")
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    kinds = [kind] if kind else list(canonical)
    found = [(train, test) for k in kinds for train, test in canonical[k]
             if os.path.isfile(os.path.join(path, train))]
    if not found:
      names = [train for k in kinds for train, _ in canonical[k]]
      raise FileNotFoundError(
          f"{path} holds none of the train files {names}; set data.path to "
          f"the train file itself (and data.test_path to the test file).")
    if len(found) > 1:
      raise ValueError(
          f"{path} holds several datasets ({[t for t, _ in found]}); set "
          "data.path to the train file you want.")
    train = os.path.join(path, found[0][0])
    test = test_path or os.path.join(path, found[0][1])
  elif os.path.exists(path):
    train = path
    test = test_path
    if not test:
      directory, name = os.path.split(path)
      stem, marker, rest = name.rpartition("_train")
      if not marker:
        raise ValueError(
            f"{path}: cannot tell the test file from this name (it has no "
            "'_train'); set data.test_path.")
      test = os.path.join(directory, f"{stem}_test{rest}")
  else:
    raise FileNotFoundError(f"{path} does not exist ({layout}).")
  test = os.path.expanduser(test)
  if not os.path.isfile(test):
    raise FileNotFoundError(
        f"test file {test} does not exist; set data.test_path to the test "
        "split's file.")
  return train, test


def open_sqlite(path: str, layout: str) -> sqlite3.Connection:
  """``path`` opened read-only (the SQLite formats' readers).

  Raises:
    FileNotFoundError: no such file (the message states ``layout``).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path} does not exist ({layout}).")
  uri = pathlib.Path(path).absolute().as_uri() + "?mode=ro"
  return sqlite3.connect(uri, uri=True)


class SplitReader:
  """One split's file: its client ids and their raw feature arrays.

  Subclasses implement :meth:`feature_names` (of the first client),
  :meth:`clients` and :meth:`close`.
  """

  path: str

  def feature_names(self) -> set[str]:
    raise NotImplementedError

  def clients(self, names: Sequence[str]
              ) -> Iterator[tuple[str, dict[str, np.ndarray]]]:
    """``(client_id, {name: array})`` for every client, in file order.

    Raises:
      FileLayoutError: a client lacks one of ``names``.
    """
    raise NotImplementedError

  def close(self) -> None:
    raise NotImplementedError


# ------------------------------------------------------------ conversion


def _texts(column: np.ndarray, where: str, feature: str) -> list[str]:
  """A column of byte (or str) strings as Python strings (UTF-8)."""
  column = np.asarray(column)
  if column.dtype.kind not in "OSU" or column.ndim != 1:
    raise FileLayoutError(
        f"{where}: feature {feature!r} is {column.dtype} {column.shape}; "
        "expected a 1-D array of byte strings.")
  texts = []
  for item in column.tolist():
    if isinstance(item, bytes):
      texts.append(item.decode("utf-8", errors="replace"))
    elif isinstance(item, str):
      texts.append(item)
    else:
      raise FileLayoutError(
          f"{where}: feature {feature!r} holds {type(item).__name__} "
          "values; expected byte strings.")
  return texts


def _labels(column: np.ndarray, num_rows: int, upper: int, where: str,
            feature: str = "label") -> np.ndarray:
  """An integer label column ``[n]`` (or ``[n, 1]``) in ``[0, upper)``."""
  column = np.asarray(column)
  if column.dtype.kind not in "iu":
    raise FileLayoutError(f"{where}: {feature!r} is {column.dtype}; expected "
                          "integer labels.")
  if column.size != num_rows or column.ndim not in (1, 2):
    raise FileLayoutError(f"{where}: {feature!r} has shape {column.shape}; "
                          f"expected [{num_rows}].")
  column = column.reshape(num_rows).astype(np.int32)
  if num_rows and (column.min() < 0 or column.max() >= upper):
    raise FileLayoutError(f"{where}: {feature!r} values outside [0, {upper}).")
  return column


def _emnist(raw: Mapping[str, np.ndarray], where: str,
            invert_pixels: bool) -> dict[str, np.ndarray]:
  pixels = np.asarray(raw["pixels"])
  if pixels.ndim == 4 and pixels.shape[-1] == 1:
    pixels = pixels[..., 0]
  if pixels.dtype.kind != "f" or pixels.shape[1:] != (28, 28):
    raise FileLayoutError(
        f"{where}: 'pixels' is {pixels.dtype} {pixels.shape}; expected "
        "float32 [n, 28, 28] in [0, 1] with 1.0 the background.")
  x = pixels.astype(np.float32)[..., None]
  if invert_pixels:
    x = 1.0 - x
  return {"x": x, "y": _labels(raw["label"], len(pixels), 62, where)}


def _cifar100(raw: Mapping[str, np.ndarray], where: str
              ) -> dict[str, np.ndarray]:
  image = np.asarray(raw["image"])
  if image.dtype.kind not in "iu" or image.shape[1:] != (32, 32, 3):
    raise FileLayoutError(
        f"{where}: 'image' is {image.dtype} {image.shape}; expected uint8 "
        "[n, 32, 32, 3].")
  return {"x": image.astype(np.float32) / np.float32(255.0),
          "y": _labels(raw["label"], len(image), 100, where)}


def _posts(raw: Mapping[str, np.ndarray], where: str) -> list[list[str]]:
  """A Stack Overflow client's posts as token lists."""
  return word_prediction.split_posts(_texts(raw["tokens"], where, "tokens"))


class _Converter:
  """Raw per-client features of one kind -> ``x``/``y`` arrays."""

  def __init__(self, kind: str, sequence_length: int, invert_pixels: bool,
               vocabulary: Sequence[str] | None):
    self.kind, self.sequence_length = kind, sequence_length
    self.invert_pixels = invert_pixels
    self.word_ids = (word_prediction.vocabulary_ids(vocabulary)
                     if vocabulary is not None else None)

  def __call__(self, raw: Mapping[str, np.ndarray], where: str,
               max_examples: int = 0) -> dict[str, np.ndarray]:
    if self.kind == "emnist":
      return _emnist(raw, where, self.invert_pixels)
    if self.kind == "cifar100":
      return _cifar100(raw, where)
    if self.kind == "shakespeare":
      x, y = shakespeare.speeches_to_windows(
          _texts(raw["snippets"], where, "snippets"), self.sequence_length)
      return {"x": x, "y": y}
    posts = _posts(raw, where)
    if max_examples:
      posts = posts[:max_examples]
    x, y = word_prediction.next_word_windows(posts, self.word_ids,
                                             self.sequence_length)
    return {"x": x, "y": y}


def _store(reader: SplitReader, names: Sequence[str],
           convert: Callable[..., dict[str, np.ndarray]],
           max_examples: int) -> ClientStore:
  ids, arrays = [], []
  for client_id, raw in reader.clients(names):
    ids.append(client_id)
    arrays.append(convert(raw, f"{reader.path}: client {client_id!r}",
                          max_examples))
  if not ids:
    raise FileLayoutError(f"{reader.path} holds no clients.")
  return ClientStore.from_client_arrays(ids, arrays)


def _stackoverflow_vocabulary(train: SplitReader, vocab_size: int,
                              word_count_path: str
                              ) -> tuple[Sequence[str], str]:
  """``(vocabulary, where it came from)``: the word-count file's first
  ``vocab_size`` words (``word_count_path``, else the file beside the train
  file if there), else the words the most training clients use."""
  beside = os.path.join(os.path.dirname(os.path.abspath(train.path)),
                        word_prediction.WORD_COUNT_FILE)
  if not word_count_path and os.path.isfile(beside):
    word_count_path = beside
  if word_count_path:
    try:
      vocabulary = word_prediction.read_word_counts(
          os.path.expanduser(word_count_path), vocab_size)
    except ValueError as e:
      raise FileLayoutError(str(e)) from None
    return vocabulary, os.path.abspath(word_count_path)
  vocabulary, _ = word_prediction.rank_vocabulary(
      (_posts(raw, f"{train.path}: client {cid!r}")
       for cid, raw in train.clients(REQUIRED_FEATURES["stackoverflow"])),
      vocab_size, rank_by=STACKOVERFLOW_RANK_BY)
  return vocabulary, "counted over the loaded training clients"


def build_dataset(prefix: str, kind: str, train: SplitReader,
                  test: SplitReader, *, sequence_length: int,
                  vocab_size: int, word_count_path: str,
                  max_examples_per_client: int, invert_pixels: bool,
                  info: Mapping[str, Any]) -> FederatedDataset:
  """Reads both splits and converts them (see the module docstring).

  The dataset is named ``<prefix>_<kind>``; ``kind`` may be empty
  (detected from the train file's first client); ``word_count_path`` may be
  empty (``stackoverflow.word_count`` beside the train file if present,
  else counted).
  """
  check_kind(kind)
  if sequence_length < 0 or vocab_size < 1 or max_examples_per_client < 0:
    raise ValueError(
        "data.sequence_length and data.max_examples_per_client must be >= 0 "
        f"and data.vocab_size >= 1; got {sequence_length}, "
        f"{max_examples_per_client} and {vocab_size}.")
  if not kind:
    kind = detect_kind(train.feature_names(), train.path)
  names = REQUIRED_FEATURES[kind]
  sequence_length = sequence_length or DEFAULT_SEQUENCE_LENGTH.get(kind, 0)
  info = {**info, "kind": kind, "train_file": os.path.abspath(train.path),
          "test_file": os.path.abspath(test.path)}
  vocabulary = None
  if kind == "stackoverflow":
    vocabulary, info["vocabulary_from"] = _stackoverflow_vocabulary(
        train, vocab_size, word_count_path)
  convert = _Converter(kind, sequence_length, invert_pixels, vocabulary)
  cap = max_examples_per_client if kind == "stackoverflow" else 0
  train_store = _store(train, names, convert, cap)
  test_store = _store(test, names, convert, 0)
  if kind == "emnist":
    labels = np.concatenate([train_store.features["y"],
                             test_store.features["y"]])
    num_classes = 10 if labels.max(initial=0) < 10 else 62
    input_shape = (28, 28, 1)
    info.update(only_digits=num_classes == 10, invert_pixels=invert_pixels,
                pixels=("1 - pixels: 0 background, 1 ink" if invert_pixels
                        else "TFF's pixels: 1 background, 0 ink"))
  elif kind == "cifar100":
    num_classes, input_shape = 100, (32, 32, 3)
    info["pixels"] = "image / 255 in [0, 1], not normalised per channel"
  elif kind == "shakespeare":
    num_classes, input_shape = shakespeare.VOCAB_SIZE, (sequence_length,)
    info.update(vocab=shakespeare.VOCAB, pad_id=shakespeare.PAD_ID,
                oov_id=shakespeare.OOV_ID, bos_id=shakespeare.BOS_ID,
                eos_id=shakespeare.EOS_ID, vocab_size=shakespeare.VOCAB_SIZE,
                sequence_length=sequence_length)
  else:
    num_classes = word_prediction.num_classes(len(vocabulary))
    input_shape = (sequence_length,)
    info.update(vocab=tuple(vocabulary),
                **word_prediction.special_ids(len(vocabulary)),
                vocab_size=num_classes, sequence_length=sequence_length,
                max_examples_per_client=max_examples_per_client)
  return FederatedDataset(name=f"{prefix}_{kind}",
                          train=train_store, test=test_store,
                          num_classes=num_classes, input_shape=input_shape,
                          info=info)


def load_split_files(
    open_split: Callable[[str, int], SplitReader], *, source: str,
    prefix: str, layout: str,
    canonical: Mapping[str, Sequence[tuple[str, str]]],
    info: Mapping[str, Any], path: str, test_path: str, kind: str,
    max_clients: int, sequence_length: int, vocab_size: int,
    word_count_path: str, max_examples_per_client: int,
    invert_pixels: bool) -> FederatedDataset:
  """A file format's dataset: its files found, opened, converted, closed.

  Args:
    open_split: ``(file, max_clients) -> SplitReader`` of the format.
    source: the format's ``data.name`` (for error messages).
    prefix: the dataset's name is ``<prefix>_<kind>``.
    layout: the format's layout in words (for error messages).
    canonical: kind -> the (train, test) file names the format uses.
    info: the format's entries of the dataset's ``info``.
    path, test_path, kind, max_clients, sequence_length, vocab_size,
    word_count_path, max_examples_per_client, invert_pixels: the options of
      :func:`fedjax_lab.data.sources.tff_h5.load`.

  Raises:
    FileNotFoundError, FileLayoutError, ValueError: as that ``load``.
  """
  check_kind(kind)
  if max_clients < 0:
    raise ValueError(f"data.max_clients must be >= 0, got {max_clients}.")
  if kind:
    canonical = {kind: canonical[kind]}
  train_file, test_file = resolve_files(path, test_path, kind, canonical,
                                        source, layout)
  with contextlib.ExitStack() as opened:
    train = open_split(train_file, max_clients)
    opened.callback(train.close)
    test = open_split(test_file, max_clients)
    opened.callback(test.close)
    return build_dataset(
        prefix, kind, train, test, sequence_length=sequence_length,
        vocab_size=vocab_size, word_count_path=word_count_path,
        max_examples_per_client=max_examples_per_client,
        invert_pixels=invert_pixels,
        info={**info, "max_clients": max_clients})
