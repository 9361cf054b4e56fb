"""TFF's next-word prediction rules: ids, windows, vocabulary, word counts."""

import numpy as np
import pytest

from fedjax_lab.data import word_prediction as wp


def test_ids():
  assert wp.special_ids(3) == {"pad_id": 0, "oov_id": 4, "bos_id": 5,
                               "eos_id": 6}
  assert wp.num_classes(3) == 7
  assert wp.vocabulary_ids(("b", "a", "c")) == {"b": 1, "a": 2, "c": 3}


def test_split_posts_on_single_spaces():
  assert wp.split_posts(["a b", "", "c", "a  b"]) == [
      ["a", "b"], [], ["c"], ["a", "", "b"]]


def test_windows_bos_truncation_eos_and_padding():
  ids = wp.vocabulary_ids(("a", "b"))  # oov 3, bos 4, eos 5
  examples = [["a", "b", "a", "z"],  # longer than L: truncated, no EOS
              ["b", "z", "a"],       # exactly L: no room for EOS
              ["a"],                 # shorter: EOS, then pad
              []]                    # empty: BOS, EOS
  x, y = wp.next_word_windows(examples, ids, 3)
  windows = np.array([[4, 1, 2, 1], [4, 2, 3, 1], [4, 1, 5, 0],
                      [4, 5, 0, 0]], np.int32)
  assert x.dtype == y.dtype == np.int32
  np.testing.assert_array_equal(x, windows[:, :-1])
  np.testing.assert_array_equal(y, windows[:, 1:])
  x, y = wp.next_word_windows([], ids, 3)
  assert x.shape == y.shape == (0, 3) and x.dtype == np.int32


def test_windows_match_a_per_example_loop():
  rng = np.random.default_rng(0)
  words = ["a", "b", "c", "d", ""]
  ids = wp.vocabulary_ids(words[:3])
  oov, bos, eos = 4, 5, 6
  for length in (1, 2, 5):
    examples = [list(rng.choice(words, rng.integers(0, 8)))
                for _ in range(30)]
    x, y = wp.next_word_windows(examples, ids, length)
    for row, tokens in enumerate(examples):
      kept = [ids.get(t, oov) for t in tokens[:length]]
      window = [bos] + kept + ([eos] if len(tokens) < length else [])
      window += [0] * (length + 1 - len(window))
      np.testing.assert_array_equal(x[row], window[:-1])
      np.testing.assert_array_equal(y[row], window[1:])


# Clients per word: b 3, a 2, c 2, d 1. Occurrences: c 4, a 2, b 3, d 1.
CLIENTS = [[["a", "b", "c"], ["c", "c"]], [["b"], ["a", "c"]],
           [["b", "d"]]]


def test_vocabulary_ranks_and_ties():
  # TFF's rule: clients, ties alphabetical.
  assert wp.rank_vocabulary(CLIENTS, 10, ("clients",)) == (
      ("b", "a", "c", "d"), 4)
  # Clients, then occurrences: c (4) before a (2).
  assert wp.rank_vocabulary(CLIENTS, 3) == (("b", "c", "a"), 4)
  assert wp.rank_vocabulary(CLIENTS, 2, ("occurrences", "clients")) == (
      ("c", "b"), 4)
  assert wp.rank_vocabulary([], 3) == ((), 0)
  with pytest.raises(ValueError, match="rank_by"):
    wp.rank_vocabulary(CLIENTS, 3, ("tfidf",))


def test_read_word_counts(tmp_path):
  path = tmp_path / "stackoverflow.word_count"
  path.write_text("the 90\n\nof 80\nand 70\n")
  assert wp.read_word_counts(str(path), 2) == ["the", "of"]
  assert wp.read_word_counts(str(path), 10) == ["the", "of", "and"]
  bad = tmp_path / "bad"
  bad.write_text("a 1\nb two\n")
  with pytest.raises(ValueError, match="bad, line 2: expected '<word> "):
    wp.read_word_counts(str(bad), 5)
  empty = tmp_path / "empty"
  empty.write_text("\n")
  with pytest.raises(ValueError, match="holds no"):
    wp.read_word_counts(str(empty), 5)
  with pytest.raises(FileNotFoundError):
    wp.read_word_counts(str(tmp_path / "nope"), 5)


def test_decode():
  vocab = ("a", "b")
  assert wp.decode([4, 1, 3, 2, 5, 0, 0, 9], vocab) == (
      "<bos> a <oov> b <eos> <?>")
