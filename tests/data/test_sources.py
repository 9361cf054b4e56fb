"""Tests of the dataset sources: real content, shapes, invariants, determinism."""

import numpy as np
import pytest

from fedjax_lab.data import sources
from fedjax_lab.data.sources import digits, mnist, shakespeare, synthetic

# ---------------------------------------------------------------- Shakespeare


@pytest.fixture(scope="module")
def shakespeare_ds(tmp_path_factory):
  return shakespeare.load(cache_dir=str(tmp_path_factory.mktemp("cache")))


def _client_speeches(store, index):
  """Rebuilds a client's speech texts from its windows."""
  client = store.client(index)
  stream = []
  for x, y in zip(client["x"], client["y"]):
    window = np.concatenate([x[:1], y])
    stream.extend(window[window != shakespeare.PAD_ID].tolist())
  text = shakespeare.decode(stream)
  assert text.startswith("<bos>") and text.endswith("<eos>")
  return text[len("<bos>"):-len("<eos>")].split("<eos><bos>")


def test_vocabulary_constants():
  assert len(shakespeare.VOCAB) == 86
  assert len(set(shakespeare.VOCAB)) == 86
  assert shakespeare.VOCAB[:6] == tuple("dhlptx")
  assert shakespeare.VOCAB[-2:] == ("9", "\r")
  assert "\n" in shakespeare.VOCAB
  assert (shakespeare.PAD_ID, shakespeare.OOV_ID, shakespeare.BOS_ID,
          shakespeare.EOS_ID, shakespeare.VOCAB_SIZE) == (0, 87, 88, 89, 90)
  np.testing.assert_array_equal(shakespeare.encode("dh\r"), [1, 2, 86])
  assert shakespeare.encode("\u2014")[0] == shakespeare.OOV_ID


def test_parse_play_removes_headers_and_stage_directions():
  markdown = "\n".join([
      "# A Play", "", "## ACT I", "", "### SCENE I. A room.", "",
      "_Enter ALPHA and BETA,", "with others_", "",
      "**ALPHA**  ", "_\\[Aside]_  ", "Line one,  ", "line two\\--here.", "",
      "_Exit BETA_", "", "Still alpha after a direction.", "",
      "**Beta**  ", "[Within]_  ", "Who calls? _\\[ ]_ Me.  ",
      "*[He draws.]*", "",
      "**BETA**  ", "*Exeunt all,", "slowly.*", "Last words.",
      "", "## ACT II", "", "Nobody speaks this.",
  ])
  speeches, orphans = shakespeare.parse_play(markdown)
  assert speeches == [
      ("ALPHA", "Line one,\nline two--here.\nStill alpha after a direction."),
      ("BETA", "Who calls? Me."),
      ("BETA", "Last words."),
  ]
  assert orphans == 1


def test_shakespeare_structure(shakespeare_ds):
  ds = shakespeare_ds
  info = ds.info
  assert ds.name == "shakespeare"
  assert ds.num_classes == 90 and ds.input_shape == (80,)
  assert info["num_plays"] == 38
  # DESIGN notes ~1,400 (play, character) clients before dropping those with
  # a single speech; 1,154 remain with this parser.
  total_characters_clients = ds.train.num_clients + info["dropped_clients"]
  assert 1300 <= total_characters_clients <= 1500
  assert 1000 <= ds.train.num_clients <= 1300
  assert 4_000_000 <= info["total_characters"] <= 4_700_000
  assert info["oov_fraction"] < 0.01
  np.testing.assert_array_equal(ds.train.client_ids, ds.test.client_ids)
  assert "hamlet/HAMLET" in set(ds.train.client_ids.tolist())
  assert all(s >= 1 for s in ds.train.client_sizes)
  assert all(s >= 1 for s in ds.test.client_sizes)
  for store in (ds.train, ds.test):
    for name in ("x", "y"):
      assert store.features[name].dtype == np.int32
      assert store.features[name].shape[1] == 80
      assert store.features[name].min() >= 0
      assert store.features[name].max() < 90


def test_shakespeare_no_markup_leaks(shakespeare_ds):
  markup_ids = shakespeare.encode("_*#")  # (a backslash would be OOV)
  for store in (shakespeare_ds.train, shakespeare_ds.test):
    assert not np.isin(store.features["x"], markup_ids).any()
    assert np.mean(store.features["x"] == shakespeare.OOV_ID) < 0.01


def test_shakespeare_window_invariants(shakespeare_ds):
  x = shakespeare_ds.train.features["x"]
  y = shakespeare_ds.train.features["y"]
  # Shifted by one within a window.
  np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
  pad = shakespeare.PAD_ID
  # Pad only at the end: once a position is pad, everything after it is.
  full = np.concatenate([x[:, :1], y], axis=1)
  is_pad = full == pad
  assert not np.any(is_pad[:, :-1] & ~is_pad[:, 1:])
  # A window with padding has its EOS right before the padding.
  padded = is_pad[:, -1]
  first_pad = np.argmax(is_pad[padded], axis=1)
  assert np.all(full[padded][np.arange(padded.sum()), first_pad - 1]
                == shakespeare.EOS_ID)
  # BOS only at position 0 of a window, EOS only once per window.
  assert not np.any(full[:, 1:] == shakespeare.BOS_ID)
  assert np.all((full == shakespeare.EOS_ID).sum(axis=1) <= 1)
  # Every window of a client is either the first of a speech (BOS) or
  # continues a previous window that had no EOS.
  starts = shakespeare_ds.train.offsets[:-1]
  assert np.all(x[starts, 0] == shakespeare.BOS_ID)
  follows_eos = np.concatenate([[True], np.any(full[:-1] ==
                                               shakespeare.EOS_ID, axis=1)])
  follows_eos[starts] = True
  np.testing.assert_array_equal(x[:, 0] == shakespeare.BOS_ID, follows_eos)


def test_shakespeare_hamlet_round_trip(shakespeare_ds):
  ds = shakespeare_ds
  index = ds.train.index_of("hamlet/HAMLET")
  first = ds.train.client(index)["x"][0]
  assert shakespeare.decode(first).startswith(
      "<bos>A little more than kin, and less than kind.<eos>")
  train_speeches = _client_speeches(ds.train, index)
  test_speeches = _client_speeches(ds.test, index)
  # First 80% of speeches go to train, the rest to test.
  total = len(train_speeches) + len(test_speeches)
  assert len(train_speeches) == int(total * 0.8)
  text = "\n".join(train_speeches + test_speeches)
  assert "To be, or not to be: that is the question:" in text
  assert "The rest is silence." in test_speeches[-1]
  # Matches a direct parse of the play.
  play = next(p for p in shakespeare.play_files() if p.stem == "hamlet")
  speeches, _ = shakespeare.parse_play(play.read_text(encoding="utf-8"))
  assert [t for s, t in speeches if s == "HAMLET"] == (
      train_speeches + test_speeches)


def test_shakespeare_windows_of_long_speech():
  x, y = shakespeare.speeches_to_windows(["a" * 200, "b"], sequence_length=80)
  # 202 tokens -> 3 windows of 81; 3 tokens -> 1 window.
  assert x.shape == y.shape == (4, 80)
  assert x[0, 0] == shakespeare.BOS_ID and x[3, 0] == shakespeare.BOS_ID
  assert shakespeare.decode(x[3]) == "<bos>b<eos>"
  # Windows are consecutive, non-overlapping chunks of 81 tokens.
  chunks = [np.concatenate([x[i, :1], y[i]]) for i in range(3)]
  assert shakespeare.decode(np.concatenate(chunks)) == (
      "<bos>" + "a" * 200 + "<eos>")
  # The third window holds 202 - 2 * 81 = 40 tokens, the last being EOS.
  assert y[2, 38] == shakespeare.EOS_ID
  assert np.all(y[2, 39:] == shakespeare.PAD_ID)


def test_shakespeare_cache_round_trip_and_unwritable_dir(tmp_path):
  cache = tmp_path / "cache"
  first = shakespeare.load(sequence_length=40, cache_dir=str(cache))
  second = shakespeare.load(sequence_length=40, cache_dir=str(cache))
  assert first.info["loaded_from"] == "parsed"
  assert second.info["loaded_from"].startswith("cache")
  assert first.input_shape == (40,)
  np.testing.assert_array_equal(first.train.features["x"],
                                second.train.features["x"])
  np.testing.assert_array_equal(first.test.offsets, second.test.offsets)
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  unwritable = shakespeare.load(sequence_length=40,
                                cache_dir=str(blocker / "sub"))
  np.testing.assert_array_equal(unwritable.train.features["y"],
                                first.train.features["y"])


# ------------------------------------------------------------------ Synthetic


def test_synthetic_shapes_and_size_formula():
  ds = synthetic.load(seed=0)
  assert ds.train.num_clients == ds.test.num_clients == 30
  assert ds.input_shape == (60,) and ds.num_classes == 10
  assert ds.train.features["x"].dtype == np.float32
  assert ds.train.features["y"].dtype == np.int32
  assert ds.train.features["x"].shape[1] == 60
  sizes = ds.train.client_sizes + ds.test.client_sizes
  expected = (np.random.default_rng(0).lognormal(4, 2, 30).astype(int) + 50)
  np.testing.assert_array_equal(sizes, expected)
  assert sizes.min() >= 50
  assert np.all(np.abs(ds.test.client_sizes - 0.2 * sizes) <= 1)
  labels = ds.train.features["y"]
  assert labels.min() >= 0 and labels.max() <= 9


def test_synthetic_deterministic_from_seed():
  a, b = synthetic.load(seed=3), synthetic.load(seed=3)
  c = synthetic.load(seed=4)
  np.testing.assert_array_equal(a.train.features["x"], b.train.features["x"])
  np.testing.assert_array_equal(a.test.features["y"], b.test.features["y"])
  assert not np.array_equal(a.train.client_sizes, c.train.client_sizes)


def _client_label_histograms(store):
  return np.array([np.bincount(store.client(i)["y"], minlength=10) / size
                   for i, size in enumerate(store.client_sizes)])


def test_synthetic_iid_vs_non_iid_heterogeneity():
  non_iid = synthetic.load(alpha=1.0, beta=1.0, seed=0).train
  iid = synthetic.load(iid=True, seed=0).train

  def spread_of_means(store):
    means = [store.client(i)["x"].mean(axis=0)
             for i in range(store.num_clients)]
    return float(np.std(means, axis=0).mean())

  def label_distance(store):
    hist = _client_label_histograms(store)
    overall = np.bincount(store.features["y"], minlength=10) / len(
        store.features["y"])
    return float(0.5 * np.abs(hist - overall).sum(axis=1).mean())

  assert spread_of_means(non_iid) > 10 * spread_of_means(iid)
  assert label_distance(non_iid) > 3 * label_distance(iid)
  # IID inputs follow N(0, diag((j+1)^-1.2)).
  x = iid.features["x"]
  np.testing.assert_allclose(x.var(axis=0), synthetic.feature_variances(),
                             rtol=0.15)
  assert np.abs(x.mean(axis=0)).max() < 0.1


def _softmax_regression_train_accuracy(x, y, steps=200, learning_rate=5.0):
  """Full-batch gradient descent on standardized inputs; train accuracy."""
  x = (x - x.mean(axis=0)) / x.std(axis=0)
  inputs = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  weights = np.zeros((inputs.shape[1], 10))
  onehot = np.eye(10)[y]
  for _ in range(steps):
    logits = inputs @ weights
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    weights -= learning_rate * inputs.T @ (probs - onehot) / len(x)
  return float(np.mean(np.argmax(inputs @ weights, axis=1) == y))


def test_synthetic_iid_labels_are_linear_in_inputs():
  # Synthetic-IID: y = argmax(W x + b) with one global (W, b), so a linear
  # classifier separates the pooled data; shuffled labels are not separable.
  ds = synthetic.load(iid=True, seed=0)
  x = ds.train.features["x"][:1000].astype(np.float64)
  y = ds.train.features["y"][:1000]
  assert _softmax_regression_train_accuracy(x, y) > 0.98
  shuffled = np.random.default_rng(0).permutation(y)
  assert _softmax_regression_train_accuracy(x, shuffled) < 0.6


# -------------------------------------------------------------- MNIST, digits

_IMAGE_SOURCES = [
    (mnist, (28, 28, 1), 5000, [500] * 10),
    (digits, (8, 8, 1), 1797, [178, 182, 177, 183, 181, 182, 181, 179, 174,
                               180]),
]


@pytest.mark.parametrize("module,shape,total,label_counts", _IMAGE_SOURCES)
def test_image_sources_content(module, shape, total, label_counts):
  ds = module.load(num_clients=20, partition="iid", seed=0)
  assert ds.input_shape == shape and ds.num_classes == 10
  x_all = np.concatenate([ds.train.features["x"], ds.test.features["x"]])
  y_all = np.concatenate([ds.train.features["y"], ds.test.features["y"]])
  assert x_all.dtype == np.float32 and y_all.dtype == np.int32
  assert x_all.shape == (total,) + shape
  assert x_all.min() == 0.0 and x_all.max() == 1.0
  levels = 255 if module is mnist else 16
  np.testing.assert_allclose(x_all * levels, np.round(x_all * levels),
                             atol=1e-4)
  np.testing.assert_array_equal(np.bincount(y_all), label_counts)
  assert ds.info["label_counts"] == label_counts


@pytest.mark.parametrize("module,shape,total,label_counts", _IMAGE_SOURCES)
def test_image_sources_partitions(module, shape, total, label_counts):
  iid = module.load(num_clients=50, partition="iid", seed=1)
  sizes = iid.train.client_sizes + iid.test.client_sizes
  assert sizes.sum() == total and sizes.max() - sizes.min() <= 1
  np.testing.assert_array_equal(iid.train.client_ids, iid.test.client_ids)
  assert np.all(iid.train.client_sizes >= 1)
  assert np.all(iid.test.client_sizes >= 1)
  skewed = module.load(num_clients=50, partition="dirichlet", alpha=0.1,
                       seed=1)
  sizes = skewed.train.client_sizes + skewed.test.client_sizes
  assert sizes.sum() == total and sizes.min() >= 2
  assert (_client_label_histograms(skewed.train).max(axis=1).mean()
          > _client_label_histograms(iid.train).max(axis=1).mean() + 0.3)
  again = module.load(num_clients=50, partition="dirichlet", alpha=0.1,
                      seed=1)
  np.testing.assert_array_equal(again.train.features["x"],
                                skewed.train.features["x"])
  np.testing.assert_array_equal(again.test.offsets, skewed.test.offsets)


# ------------------------------------------------------------------- Registry


def test_registry_dispatches_and_reports_errors():
  ds = sources.load_dataset("digits", num_clients=10, partition="iid")
  assert ds.name == "digits" and ds.train.num_clients == 10
  assert sources.load_dataset("synthetic", iid=True).name == "synthetic"
  with pytest.raises(ValueError, match="digits, disk, fedjax_sqlite, mnist, shakespeare"):
    sources.load_dataset("cifar")
  with pytest.raises(TypeError, match="'synthetic'.*alhpa"):
    sources.load_dataset("synthetic", alhpa=0.5)
  # An option another source takes, left empty, is not passed on; set, it
  # is an error.
  assert sources.load_dataset("synthetic", iid=True, test_split="").name == (
      "synthetic")
  with pytest.raises(TypeError, match="'synthetic'.*test_split"):
    sources.load_dataset("synthetic", iid=True, test_split="heldout")
