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
order (as ``HDF5ClientData`` does). The files and features of each dataset
(``kind``), as TFF's loaders document them:

* ``emnist``: ``fed_emnist_{train,test}.h5`` (62 classes) or
  ``fed_emnist_digitsonly_{train,test}.h5`` (10 classes); the same writers in
  both files. ``pixels`` float32 ``[n, 28, 28]`` in ``[0, 1]`` with **1.0 the
  background** (the inverse of MNIST); ``label`` int32, one per example
  (TFF documents each as shape ``[1]``, so ``[n]`` and ``[n, 1]`` are read):
  0-9 digits, 10-35 upper case, 36-61 lower case.
* ``shakespeare``: ``shakespeare_{train,test}.h5``, one client per (play,
  character), the same clients in both files. ``snippets``: variable-length
  byte strings ``[n]``, one speech each.
* ``stackoverflow``: ``stackoverflow_{train,held_out,test}.h5`` plus the
  vocabulary file ``stackoverflow.word_count`` (lines ``"<word> <count>"``,
  most frequent first; the count is the number of training users using the
  word). Byte-string features ``tokens`` (a post's words separated by single
  spaces), ``title``, ``tags`` (``|``-separated), ``creation_date``, ``type``
  (``question`` / ``answer``) and int64 ``score``; only ``tokens`` is read.
* ``cifar100``: ``fed_cifar100_{train,test}.h5``; train clients ``"0"`` ..
  ``"499"`` and test clients ``"0"`` .. ``"99"`` are different people.
  ``image`` uint8 ``[n, 32, 32, 3]``, ``label`` int64 (fine label, 0..99),
  ``coarse_label`` int64 (0..19).

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
  preprocesses it: a vocabulary of ``vocab_size`` (default 10,000) words;
  ids pad 0, words ``1..V``, OOV ``V+1``, BOS ``V+2``, EOS ``V+3``
  (``num_classes = V + 4``). A post's words (split on ``" "``) are truncated
  to ``sequence_length`` (default 20); the window is ``[BOS] + ids``, then
  ``EOS`` only if the post had fewer than ``sequence_length`` words, padded
  with 0 to ``sequence_length + 1``; ``x = window[:-1]``,
  ``y = window[1:]``. One example per post; a training client keeps its
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

The shared pieces (kind detection, feature checks, tokenization, building the
stores) also serve :mod:`fedjax_lab.data.sources.fedjax_sqlite`, whose files
hold the same features.
"""

from __future__ import annotations

import collections
import os
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

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
WORD_COUNT_FILE = "stackoverflow.word_count"

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


class SplitReader:
  """One split's file: its client ids and their raw feature arrays.

  Subclasses implement :meth:`feature_names` (of the first client) and
  :meth:`clients`.
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


def word_prediction_windows(posts: Sequence[str], word_ids: Mapping[str, int],
                            sequence_length: int
                            ) -> tuple[np.ndarray, np.ndarray]:
  """TFF's Stack Overflow next-word windows of a client's posts.

  Args:
    posts: the posts' ``tokens`` strings (words separated by ``" "``).
    word_ids: word -> id in ``1..V`` (``V = len(word_ids)``).
    sequence_length: ``L``.

  Returns:
    ``(x, y)``, int32 ``[len(posts), L]``: per post the window
    ``[BOS] + ids(words[:L])`` plus ``EOS`` when it had fewer than ``L``
    words, right-padded with 0 to ``L + 1``; ``x`` drops its last token and
    ``y`` its first. OOV = ``V + 1``, BOS = ``V + 2``, EOS = ``V + 3``.
  """
  size = len(word_ids)
  oov_id, bos_id, eos_id = size + 1, size + 2, size + 3
  width = sequence_length + 1
  windows = np.zeros([len(posts), width], np.int32)
  if not posts:
    return windows[:, :-1], windows[:, 1:]
  words = [post.split(" ")[:sequence_length] if post else []
           for post in posts]
  lengths = np.fromiter((len(w) for w in words), np.int64, len(words))
  total = int(lengths.sum())
  ids = np.fromiter((word_ids.get(w, oov_id) for ws in words for w in ws),
                    np.int32, total)
  rows = np.repeat(np.arange(len(posts)), lengths)
  starts = np.cumsum(lengths) - lengths
  columns = np.arange(total) - np.repeat(starts, lengths) + 1
  windows[:, 0] = bos_id
  windows[rows, columns] = ids
  short = np.flatnonzero(lengths < sequence_length)
  windows[short, lengths[short] + 1] = eos_id
  return windows[:, :-1].copy(), windows[:, 1:].copy()


def read_word_counts(path: str, vocab_size: int) -> list[str]:
  """The first ``vocab_size`` words of a TFF word-count file (lines
  ``"<word> <count>"``, most frequent first)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"word-count file {path} does not exist.")
  words = []
  with open(path, encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if len(words) >= vocab_size:
        break
      fields = line.split()
      if not fields:
        continue
      if len(fields) != 2 or not fields[1].isdigit():
        raise FileLayoutError(
            f"{path}, line {number}: expected '<word> <count>' (TFF's "
            f"{WORD_COUNT_FILE} layout), got {line.strip()!r}.")
      words.append(fields[0])
  if not words:
    raise FileLayoutError(f"{path} holds no '<word> <count>' lines.")
  return words


def count_vocabulary(client_posts: Iterable[Sequence[str]],
                     vocab_size: int) -> list[str]:
  """The ``vocab_size`` words used by the most clients (ties by word), the
  statistic TFF's ``stackoverflow.word_count`` holds."""
  users = collections.Counter()
  for posts in client_posts:
    used = set()
    for post in posts:
      if post:
        used.update(post.split(" "))
    users.update(used)
  ranked = sorted(users.items(), key=lambda item: (-item[1], item[0]))
  return [word for word, _ in ranked[:vocab_size]]


class _Converter:
  """Raw per-client features of one kind -> ``x``/``y`` arrays."""

  def __init__(self, kind: str, sequence_length: int, invert_pixels: bool,
               vocabulary: Sequence[str] | None):
    self.kind, self.sequence_length = kind, sequence_length
    self.invert_pixels = invert_pixels
    self.word_ids = ({w: i + 1 for i, w in enumerate(vocabulary)}
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
    posts = _texts(raw["tokens"], where, "tokens")
    if max_examples:
      posts = posts[:max_examples]
    x, y = word_prediction_windows(posts, self.word_ids, self.sequence_length)
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
    beside = os.path.join(os.path.dirname(os.path.abspath(train.path)),
                          WORD_COUNT_FILE)
    if not word_count_path and os.path.isfile(beside):
      word_count_path = beside
    if word_count_path:
      vocabulary = read_word_counts(os.path.expanduser(word_count_path),
                                    vocab_size)
      info["vocabulary_from"] = os.path.abspath(word_count_path)
    else:
      vocabulary = count_vocabulary(
          (_texts(raw["tokens"], f"{train.path}: client {cid!r}", "tokens")
           for cid, raw in train.clients(names)), vocab_size)
      info["vocabulary_from"] = "counted over the loaded training clients"
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
    size = len(vocabulary)
    num_classes, input_shape = size + 4, (sequence_length,)
    info.update(vocab=tuple(vocabulary), pad_id=0, oov_id=size + 1,
                bos_id=size + 2, eos_id=size + 3, vocab_size=size + 4,
                sequence_length=sequence_length,
                max_examples_per_client=max_examples_per_client)
  return FederatedDataset(name=f"{prefix}_{kind}",
                          train=train_store, test=test_store,
                          num_classes=num_classes, input_shape=input_shape,
                          info=info)


# ------------------------------------------------------------- HDF5 files


class _H5Split(SplitReader):
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
         vocab_size: int = DEFAULT_VOCAB_SIZE, word_count_path: str = "",
         max_examples_per_client: int = DEFAULT_MAX_EXAMPLES_PER_CLIENT,
         invert_pixels: bool = True) -> FederatedDataset:
  """A TFF HDF5 dataset (see the module docstring for layouts and features).

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
  check_kind(kind)
  if max_clients < 0:
    raise ValueError(f"data.max_clients must be >= 0, got {max_clients}.")
  canonical = ({kind: CANONICAL_FILES[kind]} if kind else CANONICAL_FILES)
  train_file, test_file = resolve_files(path, test_path, kind, canonical,
                                        "tff_h5", H5_LAYOUT)
  train = _H5Split(train_file, max_clients)
  try:
    test = _H5Split(test_file, max_clients)
    try:
      return build_dataset(
          "tff", kind, train, test, sequence_length=sequence_length,
          vocab_size=vocab_size, word_count_path=word_count_path,
          max_examples_per_client=max_examples_per_client,
          invert_pixels=invert_pixels,
          info={"source": "TensorFlow Federated HDF5 client data (local "
                          "files)", "max_clients": max_clients})
    finally:
      test.close()
  finally:
    train.close()
