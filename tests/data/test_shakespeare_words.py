"""Tests of the Shakespeare next-word task: tokens, vocabulary, ids, windows."""

import numpy as np
import pytest

from fedjax_lab.data import sources, word_prediction
from fedjax_lab.data.sources import shakespeare, shakespeare_words as words

# A hand-written corpus: two clients, speeches already split like the plays'.
_TINY = shakespeare.SpeakerClients(
    clients=(
        shakespeare.SpeakerClient(
            "play/A",
            train=("To be, or not to be.\nBe brave, be bold!", "Go now, go."),
            test=("Not now.",)),
        shakespeare.SpeakerClient(
            "play/B", train=("Go to bed.",),
            test=("Zebra zebra zebra zebra.",)),
    ),
    speeches=(), num_plays=1, dropped_clients=0, orphan_lines=0)


@pytest.fixture
def tiny(monkeypatch, tmp_path):
  """``load`` on the hand-written corpus (fresh cache dir per test)."""
  monkeypatch.setattr(shakespeare, "speaker_clients", lambda _: _TINY)

  def load(**kwargs):
    kwargs.setdefault("cache_dir", str(tmp_path / "cache"))
    return words.load(**kwargs)

  return load


@pytest.fixture(scope="module")
def words_ds(tmp_path_factory):
  return words.load(cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_tokenize_like_stack_overflow():
  text = "O, 'Tis step-dame's\u2014here--there &amp; TH' END.\nAy!"
  assert words.tokenize(text) == [
      "o", ",", "'tis", "step-dame's", "here", "--", "there", "&", "th'",
      "end", ".", "ay", "!"]


def test_example_units():
  speech = "Go now,\ngo. Stay! Who\ncomes?"
  assert words.split_examples(speech, "line") == [
      ["go", "now", ","], ["go", ".", "stay", "!", "who"], ["comes", "?"]]
  assert words.split_examples(speech, "sentence") == [
      ["go", "now", ",", "go", "."], ["stay", "!"], ["who", "comes", "?"]]
  assert words.split_examples(speech, "speech") == [
      words.tokenize(speech)]
  assert words.split_examples("Last words", "sentence") == [
      ["last", "words"]]
  with pytest.raises(ValueError, match="example_unit"):
    words.split_examples(speech, "word")


def test_vocabulary_from_train_clients_only(tiny):
  ds = tiny(sequence_length=6, vocab_size=100)
  # "zebra" is the most frequent test word but never said in training.
  assert ds.info["vocab"] == (
      ".", "go", "to", "be", ",", "!", "bed", "bold", "brave", "not", "now",
      "or")
  assert ds.info["distinct_train_words"] == 12
  assert ds.info["num_words"] == 12 and ds.num_classes == 16
  assert ds.info["oov_id"] == 13
  np.testing.assert_array_equal(
      ds.test.client(1)["x"][0], [14, 13, 13, 13, 13, 1])
  # Ranked by total occurrences instead: "be" (4, one client) comes first.
  by_count = tiny(sequence_length=6, vocab_size=5, vocab_rank="count")
  assert by_count.info["vocab"] == ("be", ".", "go", "to", ",")


def test_ids_special_tokens_and_windows(tiny):
  ds = tiny(sequence_length=6, vocab_size=5)
  info = ds.info
  # Words 1..5 in rank order, then OOV, BOS, EOS; pad 0.
  assert info["vocab"] == (".", "go", "to", "be", ",")
  assert (info["pad_id"], info["oov_id"], info["bos_id"],
          info["eos_id"]) == (0, 6, 7, 8)
  assert ds.num_classes == info["vocab_size"] == 9
  assert ds.input_shape == (6,)
  np.testing.assert_array_equal(ds.train.client_ids, ["play/A", "play/B"])
  np.testing.assert_array_equal(ds.train.client_sizes, [3, 1])
  windows = {
      # "to be , or not to be ." (8 tokens): truncated to 6, so no EOS.
      ("train", 0, 0): [7, 3, 4, 5, 6, 6, 3],
      # "be brave , be bold !" (exactly 6 tokens): no room for EOS.
      ("train", 0, 1): [7, 4, 6, 5, 4, 6, 6],
      # "go now , go ." (5 tokens) + EOS.
      ("train", 0, 2): [7, 2, 6, 5, 2, 1, 8],
      ("train", 1, 0): [7, 2, 3, 6, 1, 8, 0],
      ("test", 0, 0): [7, 6, 6, 1, 8, 0, 0],
      ("test", 1, 0): [7, 6, 6, 6, 6, 1, 8],
  }
  for (split, client, row), window in windows.items():
    arrays = getattr(ds, split).client(client)
    np.testing.assert_array_equal(arrays["x"][row], window[:-1])
    np.testing.assert_array_equal(arrays["y"][row], window[1:])
  for store in (ds.train, ds.test):
    assert store.features["x"].dtype == store.features["y"].dtype == np.int32
  assert word_prediction.decode(ds.train.client(0)["y"][2], info["vocab"]) == (
      "go <oov> , go . <eos>")
  assert info["train_truncated_examples"] == 1
  assert info["train_tokens_truncated"] == 2


def test_per_client_cap(tiny):
  full = tiny(sequence_length=6, vocab_size=5, max_examples_per_client=None)
  capped = tiny(sequence_length=6, vocab_size=5, max_examples_per_client=2)
  np.testing.assert_array_equal(capped.train.client_sizes, [2, 1])
  np.testing.assert_array_equal(capped.train.client(0)["x"],
                                full.train.client(0)["x"][:2])
  # The cap is for training examples only, and the vocabulary is counted
  # before it.
  np.testing.assert_array_equal(capped.test.features["x"],
                                full.test.features["x"])
  assert capped.info["vocab"] == full.info["vocab"]
  assert capped.info["train_examples_before_cap"] == 4


def test_bad_arguments(tiny):
  for kwargs, match in [({"sequence_length": 0}, "sequence_length"),
                        ({"vocab_size": 0}, "vocab_size"),
                        ({"max_examples_per_client": -1}, "max_examples"),
                        ({"test_fraction": 1.0}, "test_fraction"),
                        ({"example_unit": "word"}, "example_unit"),
                        ({"vocab_rank": "tfidf"}, "vocab_rank")]:
    with pytest.raises(ValueError, match=match):
      tiny(**kwargs)


def test_registered(tiny, tmp_path):
  ds = sources.load_dataset("shakespeare_words", sequence_length=6,
                            vocab_size=5, cache_dir=str(tmp_path / "other"))
  assert ds.name == "shakespeare_words" and ds.num_classes == 9


# ----------------------------------------------------------- the real plays


def test_same_clients_as_character_task(words_ds, tmp_path):
  chars = shakespeare.load(sequence_length=20, cache_dir=str(tmp_path))
  np.testing.assert_array_equal(words_ds.train.client_ids,
                                chars.train.client_ids)
  np.testing.assert_array_equal(words_ds.test.client_ids,
                                chars.test.client_ids)
  assert words_ds.train.num_clients == chars.train.num_clients
  assert words_ds.info["dropped_clients"] == chars.info["dropped_clients"]
  assert np.all(words_ds.train.client_sizes >= 1)
  assert np.all(words_ds.test.client_sizes >= 1)


def test_real_vocabulary_and_ids(words_ds):
  info = words_ds.info
  vocab = info["vocab"]
  assert len(vocab) == len(set(vocab)) == 10_000
  assert 20_000 <= info["distinct_train_words"] <= 35_000
  assert words_ds.num_classes == 10_004 and words_ds.input_shape == (20,)
  assert (info["pad_id"], info["oov_id"], info["bos_id"],
          info["eos_id"]) == (0, 10_001, 10_002, 10_003)
  assert vocab[:4] == (".", ",", "the", "and")
  # The vocabulary is exactly the ranking of the training speeches' words.
  corpus = shakespeare.speaker_clients(0.2)
  train = [[e for s in c.train for e in words.split_examples(s)]
           for c in corpus.clients]
  assert word_prediction.rank_vocabulary(
      train, 10_000, words.VOCAB_RANK_BY["clients"]) == (
          vocab, info["distinct_train_words"])
  assert info["train_oov_fraction"] < 0.05
  for store in (words_ds.train, words_ds.test):
    for name in ("x", "y"):
      assert store.features[name].dtype == np.int32
      assert store.features[name].min() >= 0
      assert store.features[name].max() < words_ds.num_classes


def test_real_windows_and_padding(words_ds):
  info = words_ds.info
  for store in (words_ds.train, words_ds.test):
    x, y = store.features["x"], store.features["y"]
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    full = np.concatenate([x[:, :1], y], axis=1)
    assert np.all(full[:, 0] == info["bos_id"])
    assert not np.any(full[:, 1:] == info["bos_id"])
    is_pad = full == info["pad_id"]
    # Pad only after the end: once a position is pad, every later one is.
    assert not np.any(is_pad[:, :-1] & ~is_pad[:, 1:])
    # Every padded window has its EOS right before the first pad.
    padded = is_pad[:, -1]
    first_pad = np.argmax(is_pad[padded], axis=1)
    assert np.all(full[padded][np.arange(padded.sum()), first_pad - 1]
                  == info["eos_id"])
    assert np.all((full == info["eos_id"]).sum(axis=1) <= 1)
  # No line is longer than 20 tokens: nothing is truncated.
  assert info["train_truncated_examples"] == 0


def test_real_cap_and_content(words_ds):
  sizes = words_ds.train.client_sizes
  assert sizes.max() == 1000
  index = words_ds.train.index_of("hamlet/HAMLET")
  assert sizes[index] == 1000
  assert words_ds.info["train_examples_before_cap"] > sizes.sum()
  hamlet = words_ds.train.client(index)
  vocab = words_ds.info["vocab"]
  assert word_prediction.decode(hamlet["x"][0], vocab) == (
      "<bos> a little more than kin , and less than kind . <eos>")
  corpus = shakespeare.speaker_clients(0.2)
  client = corpus.clients[index]
  lines = [e for s in client.train for e in words.split_examples(s)]
  x, y = word_prediction.next_word_windows(
      lines[:1000], word_prediction.vocabulary_ids(vocab), 20)
  np.testing.assert_array_equal(hamlet["x"], x)
  np.testing.assert_array_equal(hamlet["y"], y)


def test_deterministic_and_cached(words_ds, tmp_path):
  again = words.load(cache_dir=str(tmp_path))
  cached = words.load(cache_dir=str(tmp_path))
  assert again.info["loaded_from"] == "parsed"
  assert cached.info["loaded_from"].startswith("cache")
  for other in (again, cached):
    assert other.info["vocab"] == words_ds.info["vocab"]
    for split in ("train", "test"):
      mine, theirs = getattr(words_ds, split), getattr(other, split)
      np.testing.assert_array_equal(mine.offsets, theirs.offsets)
      np.testing.assert_array_equal(mine.client_ids, theirs.client_ids)
      for name in ("x", "y"):
        np.testing.assert_array_equal(mine.features[name],
                                      theirs.features[name])
