"""Next-word prediction examples, built the way TFF builds Stack Overflow's.

The rules every word-level source shares, in one place: the Stack Overflow
files (:mod:`fedjax_lab.data.sources.federated_files`, read by ``tff_h5``,
``tff_sqlite`` and ``fedjax_sqlite``) and Shakespeare's words
(:mod:`fedjax_lab.data.sources.shakespeare_words`). They follow TensorFlow
Federated's word-prediction baseline
(``tff.simulation.baselines.stackoverflow.create_word_prediction_task``).

Ids (TFF's ``get_special_tokens`` with one out-of-vocabulary bucket), with
``V`` the vocabulary's length: pad 0, the words ``1..V`` in rank order, OOV
``V + 1``, BOS ``V + 2``, EOS ``V + 3``; ``num_classes = V + 4``.

Windows (TFF's ``to_ids`` + ``padded_batch`` + ``split_input_target``): an
example's tokens are truncated to ``L = sequence_length``; the window is
``[BOS] + ids``, then ``EOS`` only if the example had fewer than ``L`` tokens
(one of exactly ``L`` tokens, or a truncated one, has no room for it), then
right-padded with 0 to ``L + 1``; ``x = window[:-1]``, ``y = window[1:]``.
Tokens past ``L`` are dropped (TFF does not cut an example into several
windows).

Vocabulary: ranked by the number of clients whose examples use a word (the
statistic of TFF's ``stackoverflow.word_count``: "counts of unique users who
have at least one example in the training set containing that token"),
optionally then by other statistics, ties last broken alphabetically; or
read from such a word-count file (lines ``"<word> <count>"``, most frequent
first).
"""

from __future__ import annotations

import collections
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

PAD_ID = 0
NUM_SPECIAL_IDS = 4  # pad, OOV, BOS, EOS
# The statistics a vocabulary can be ranked by (see rank_vocabulary).
RANK_STATISTICS = ("clients", "occurrences")
# TFF's Stack Overflow vocabulary file.
WORD_COUNT_FILE = "stackoverflow.word_count"


def special_ids(num_words: int) -> dict[str, int]:
  """``pad_id``, ``oov_id``, ``bos_id``, ``eos_id`` for a vocabulary of
  ``num_words`` words (ids 0, ``V + 1``, ``V + 2``, ``V + 3``)."""
  return {"pad_id": PAD_ID, "oov_id": num_words + 1,
          "bos_id": num_words + 2, "eos_id": num_words + 3}


def num_classes(num_words: int) -> int:
  """The number of ids (``V + 4``) for a vocabulary of ``num_words`` words."""
  return num_words + NUM_SPECIAL_IDS


def vocabulary_ids(vocab: Sequence[str]) -> dict[str, int]:
  """word -> id: the ``i``-th word of ``vocab`` gets id ``i + 1``."""
  return {word: i + 1 for i, word in enumerate(vocab)}


def split_posts(posts: Sequence[str]) -> list[list[str]]:
  """Stack Overflow ``tokens`` strings (words separated by single spaces) as
  token lists; an empty string has no tokens, and two adjacent spaces make
  an empty token (TFF splits on ``" "``)."""
  return [post.split(" ") if post else [] for post in posts]


def next_word_windows(examples: Sequence[Sequence[str]],
                      word_ids: Mapping[str, int], sequence_length: int
                      ) -> tuple[np.ndarray, np.ndarray]:
  """TFF's next-word windows of a client's examples (see the module doc).

  Args:
    examples: token lists, one per example.
    word_ids: word -> id in ``1..V`` (``V = len(word_ids)``, which fixes the
      special ids); other tokens get ``OOV = V + 1``.
    sequence_length: model input length ``L``.

  Returns:
    ``(x, y)``, both int32 ``[len(examples), L]``: per example the window
    ``[BOS] + ids(tokens[:L])`` plus ``EOS`` when it had fewer than ``L``
    tokens, right-padded with 0 to ``L + 1``; ``x`` drops its last token
    and ``y`` its first.
  """
  ids = special_ids(len(word_ids))
  oov_id = ids["oov_id"]
  kept = [tokens[:sequence_length] for tokens in examples]
  lengths = np.fromiter((len(tokens) for tokens in kept), np.int64, len(kept))
  total = int(lengths.sum())
  tokens_ids = np.fromiter(
      (word_ids.get(token, oov_id) for tokens in kept for token in tokens),
      np.int32, total)
  # Row and column of every kept token: column 0 holds BOS.
  rows = np.repeat(np.arange(len(kept)), lengths)
  starts = np.cumsum(lengths) - lengths
  columns = np.arange(total) - np.repeat(starts, lengths) + 1
  windows = np.full([len(kept), sequence_length + 1], PAD_ID, np.int32)
  windows[:, 0] = ids["bos_id"]
  windows[rows, columns] = tokens_ids
  short = np.flatnonzero(lengths < sequence_length)
  windows[short, lengths[short] + 1] = ids["eos_id"]
  return windows[:, :-1].copy(), windows[:, 1:].copy()


def rank_vocabulary(client_examples: Iterable[Sequence[Sequence[str]]],
                    vocab_size: int,
                    rank_by: Sequence[str] = ("clients", "occurrences")
                    ) -> tuple[tuple[str, ...], int]:
  """The ``vocab_size`` top-ranked words of a set of (training) clients.

  Args:
    client_examples: per client, its examples as token lists.
    vocab_size: at most this many words are kept.
    rank_by: the statistics to rank by, most significant first, each
      descending: ``"clients"`` (the number of clients using the word) and
      ``"occurrences"`` (its total count over all examples); ties after
      them are broken alphabetically. TFF's Stack Overflow counts rank by
      ``("clients",)``.

  Returns:
    ``(vocab, num_distinct)``: the kept words in rank order (word ``i`` gets
    id ``i + 1``) and how many distinct words the clients use.

  Raises:
    ValueError: ``rank_by`` names an unknown statistic.
  """
  unknown = [s for s in rank_by if s not in RANK_STATISTICS]
  if unknown:
    raise ValueError(f"rank_by must name statistics among {RANK_STATISTICS}, "
                     f"got {tuple(rank_by)!r}.")
  clients: collections.Counter[str] = collections.Counter()
  occurrences: collections.Counter[str] = collections.Counter()
  for examples in client_examples:
    if "occurrences" in rank_by:
      counts = collections.Counter(t for tokens in examples for t in tokens)
      occurrences.update(counts)
      clients.update(counts.keys())
    else:
      used: set[str] = set()
      for tokens in examples:
        used.update(tokens)
      clients.update(used)
  statistics = {"clients": clients, "occurrences": occurrences}
  columns = [statistics[s] for s in rank_by]
  ranked = sorted(clients,
                  key=lambda w: (*(-column[w] for column in columns), w))
  return tuple(ranked[:vocab_size]), len(ranked)


def read_word_counts(path: str, vocab_size: int) -> list[str]:
  """The first ``vocab_size`` words of a TFF word-count file.

  The file holds lines ``"<word> <count>"``, most frequent first (blank lines
  are skipped); word ``i`` of the result gets id ``i + 1``.

  Raises:
    FileNotFoundError: ``path`` does not exist.
    ValueError: a line is not ``"<word> <count>"``, or there is none; the
      message names the file (and the line).
  """
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
        raise ValueError(
            f"{path}, line {number}: expected '<word> <count>' (TFF's "
            f"{WORD_COUNT_FILE} layout), got {line.strip()!r}.")
      words.append(fields[0])
  if not words:
    raise ValueError(f"{path} holds no '<word> <count>' lines.")
  return words


def decode(ids: Iterable[int], vocab: Sequence[str]) -> str:
  """Space-joined words of ``ids`` for debugging: pad dropped, the special
  ids as ``<oov>``, ``<bos>``, ``<eos>``, any other id as ``<?>``."""
  special = {v: f"<{k[:-3]}>" for k, v in special_ids(len(vocab)).items()
             if k != "pad_id"}
  words = []
  for i in (int(i) for i in ids):
    if i == PAD_ID:
      continue
    words.append(special.get(i) or (vocab[i - 1] if 0 < i <= len(vocab)
                                    else "<?>"))
  return " ".join(words)
