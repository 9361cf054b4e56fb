"""Federated datasets from a prepared TFDS dataset with a client-id feature.

A config with ``data.name = "tfds"``, ``data.tfds_name = NAME`` and
``data.data_dir = DIR`` reads a TensorFlow Datasets dataset already
prepared under ``DIR`` (``DIR/<name>/<version>/...``; nothing is downloaded
or prepared here) whose examples carry the id of the client that owns them,
and groups the examples of each split by that id into a
:class:`~fedjax_lab.data.federated.ClientStore`.

Requirements on the dataset:

* prepared with ``file_format="array_record"`` (or ``"parquet"``): it is read
  with ``builder.as_data_source``, which needs neither TensorFlow nor
  ``tf.data`` (a ``tfrecord`` dataset is refused with a message saying so);
* a feature ``client_id_feature`` (default ``"client_id"``): a string
  (``tfds.features.Text``) or an integer scalar;
* ``Tensor`` / ``Scalar`` / ``ClassLabel`` features for the model's inputs and
  labels (``tfds.features.Image`` decoding needs TensorFlow).

Features: by default every numeric feature but the client id, under its own
name (the datasets written from the built-in sources have ``x`` and ``y``;
string and nested features are left out);
``features="x=image,y=label"`` (or a mapping ``{"x": "image", "y":
"label"}``) picks and renames them. The result must have ``x`` and ``y``.
``uint8`` inputs are scaled to float32 in ``[0, 1]`` (``/ 255``, as the
``mnist`` source does) unless ``scale_uint8=False``.

Grouping: when the builder set ``disable_shuffling`` (examples stored in
generation order, as :mod:`fedjax_lab.data.tfds_builders` writes them),
clients come in the order of their first example and each keeps its
examples' order, so a dataset written from a source reads back as that
source's stores; otherwise (TFDS's hashed order) clients are sorted by id,
like TFF's client data. ``max_clients`` keeps the first clients of each
split in that order.

The dataset's ``name`` and ``info`` come from its metadata when it records
them (``metadata["name"]``, ``metadata["info"]``, as the builders of
:mod:`fedjax_lab.data.tfds_builders` do), else the TFDS name.

``num_classes``: the option when > 0; else the ``y`` feature's
``ClassLabel`` size, else ``num_classes`` in the dataset's metadata
(``tfds.core.MetadataDict``), else ``1 + max`` of ``y`` over both splits
(and of ``x`` too when ``y`` is a token sequence and ``x`` integer).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from fedjax_lab.data.federated import ClientStore, FederatedDataset
from fedjax_lab.data.sources.tff_h5 import FileLayoutError

_READ_CHUNK = 4096
TFDS_LAYOUT = (
    "a TFDS dataset prepared with file_format='array_record' (or 'parquet') "
    "under data_dir/<name>/<version>/, each example holding a client-id "
    "feature and Tensor/Scalar/ClassLabel features")


def parse_feature_map(features: str | Mapping[str, str] | None
                      ) -> dict[str, str]:
  """``"x=image,y=label"`` (or a mapping) -> ``{"x": "image", "y":
  "label"}``; empty -> ``{}`` (keep every feature under its name)."""
  if not features:
    return {}
  if isinstance(features, Mapping):
    return {str(ours): str(theirs) for ours, theirs in features.items()}
  mapping = {}
  for item in str(features).split(","):
    ours, equals, theirs = item.strip().partition("=")
    if not equals or not ours.strip() or not theirs.strip():
      raise ValueError(
          f"data.features={features!r}: expected 'ours=theirs' pairs "
          "separated by commas, e.g. 'x=image,y=label'.")
    mapping[ours.strip()] = theirs.strip()
  return mapping


def _is_numeric(feature) -> bool:
  """Whether a TFDS feature decodes to one numeric (or bool) array."""
  dtype = feature.np_dtype
  if isinstance(dtype, Mapping):
    return False
  return np.dtype(dtype).kind in "biuf"


def _builder(tfds_name: str, data_dir: str):
  """The prepared builder, or a FileNotFoundError saying what is missing."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  where = data_dir or "TFDS's default data_dir"
  try:
    builder = tfds.builder(tfds_name, data_dir=data_dir or None)
  except (tfds.core.registered.DatasetNotFoundError, FileNotFoundError) as e:
    raise FileNotFoundError(
        f"no TFDS dataset {tfds_name!r} under {where} ({type(e).__name__}); "
        f"expected {TFDS_LAYOUT}.") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {tfds_name!r} is not prepared under {where} (looked "
        f"in {builder.data_dir}); prepare it first, e.g. "
        "builder.download_and_prepare(file_format='array_record') with "
        "data_dir set; this loader never downloads.")
  return builder


def _read_split(builder, split: str, names: Mapping[str, str],
                client_id_feature: str, where: str
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """Every example of ``split``: client ids and the mapped features (in
  their declared dtypes: TFDS hands scalars back as Python numbers)."""
  dtypes = {ours: np.dtype(builder.info.features[theirs].np_dtype)
            for ours, theirs in names.items()}
  if split.split("[")[0] not in builder.info.splits:
    raise FileLayoutError(
        f"{where} has no split {split!r} (splits: "
        f"{sorted(builder.info.splits)}); set data.train_split / "
        "data.test_split.")
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise FileLayoutError(
        f"{where}: cannot read split {split!r} without TensorFlow ({e}); "
        f"expected {TFDS_LAYOUT}.") from None
  size = len(source)
  ids, columns = [], {ours: [] for ours in names}
  get_many = getattr(source, "__getitems__", None)
  for start in range(0, size, _READ_CHUNK):
    indices = list(range(start, min(start + _READ_CHUNK, size)))
    records = (get_many(indices) if get_many is not None
               else [source[i] for i in indices])
    ids.append(np.asarray([r[client_id_feature] for r in records]))
    for ours, theirs in names.items():
      columns[ours].append(np.stack([np.asarray(r[theirs], dtypes[ours])
                                     for r in records]))
  if not ids:
    raise FileLayoutError(f"{where}: split {split!r} has no examples.")
  client_ids = np.concatenate(ids)
  if client_ids.ndim != 1:
    raise FileLayoutError(
        f"{where}: {client_id_feature!r} is not a scalar per example "
        f"(shape {client_ids.shape[1:]}); expected a string or integer id.")
  if client_ids.dtype.kind == "S":
    client_ids = np.char.decode(client_ids, "utf-8")
  elif client_ids.dtype.kind == "O":
    client_ids = np.asarray([i.decode("utf-8") if isinstance(i, bytes)
                             else str(i) for i in client_ids])
  else:
    client_ids = client_ids.astype(str)
  return client_ids, {n: np.concatenate(c) for n, c in columns.items()}


def group_by_client(client_ids: np.ndarray, features: Mapping[str, np.ndarray],
                    max_clients: int = 0,
                    first_seen: bool = False) -> ClientStore:
  """A store of the examples grouped by ``client_ids`` (one per example).

  Clients come in sorted id order, or in the order of their first example
  (``first_seen``); each client's rows keep their given order. Vectorised:
  one ``np.unique`` and one stable ``argsort``.
  """
  unique, first, inverse, counts = np.unique(
      client_ids, return_index=True, return_inverse=True, return_counts=True)
  inverse = inverse.ravel()
  if first_seen:
    rank = np.argsort(first, kind="stable")
    position = np.empty_like(rank)
    position[rank] = np.arange(len(rank))
    unique, counts, inverse = unique[rank], counts[rank], position[inverse]
  order = np.argsort(inverse, kind="stable")
  offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
  if max_clients and max_clients < len(unique):
    unique, offsets = unique[:max_clients], offsets[:max_clients + 1]
    order = order[:offsets[-1]]
  return ClientStore(unique, offsets,
                     {n: np.asarray(a)[order] for n, a in features.items()})


def load(tfds_name: str = "", data_dir: str = "",
         client_id_feature: str = "client_id",
         features: Any = "", train_split: str = "train",
         test_split: str = "test", max_clients: int = 0,
         num_classes: int = 0, scale_uint8: bool = True) -> FederatedDataset:
  """A prepared TFDS dataset as a federated dataset (see the module doc).

  Args:
    tfds_name: the dataset's name, optionally ``name/config:version``.
    data_dir: the folder it was prepared under (default: TFDS's).
    client_id_feature: the feature holding each example's client id.
    features: ``"x=image,y=label"`` or a mapping ours -> theirs; empty:
      every numeric feature but the client id, under its own name.
    train_split, test_split: TFDS split names (slicing such as
      ``"train[:10%]"`` works).
    max_clients: keep the first this many clients (module doc) of each
      split; 0 = all.
    num_classes: output classes; 0 = from the dataset (module doc).
    scale_uint8: ``uint8`` features become float32 ``/ 255``.

  Raises:
    FileNotFoundError: the dataset is not prepared under ``data_dir``.
    FileLayoutError: no client-id feature, an unknown feature name, no ``x``
      or ``y``, a format needing TensorFlow.
    ValueError: no ``tfds_name`` or an invalid option.
  """
  if not tfds_name:
    raise ValueError("data.name='tfds' needs data.tfds_name (and "
                     "data.data_dir, the folder it was prepared under).")
  if max_clients < 0 or num_classes < 0:
    raise ValueError("data.max_clients and data.num_classes must be >= 0.")
  data_dir = os.path.expanduser(data_dir) if data_dir else ""
  builder = _builder(tfds_name, data_dir)
  where = f"TFDS dataset {builder.info.full_name} in {builder.data_dir}"
  available = dict(builder.info.features.items())
  if client_id_feature not in available:
    raise FileLayoutError(
        f"{where} has no client-id feature {client_id_feature!r} (features: "
        f"{sorted(available)}); set data.client_id_feature; expected "
        f"{TFDS_LAYOUT}.")
  names = parse_feature_map(features) or {
      n: n for n, f in available.items()
      if n != client_id_feature and _is_numeric(f)}
  unknown = sorted(t for t in names.values() if t not in available)
  if unknown:
    raise FileLayoutError(f"{where} has no feature(s) {unknown} (features: "
                          f"{sorted(available)}); fix data.features.")
  not_numeric = sorted(t for t in names.values()
                       if not _is_numeric(available[t]))
  if not_numeric:
    raise FileLayoutError(
        f"{where}: feature(s) {not_numeric} are strings or nested; map only "
        "numeric Tensor/Scalar/ClassLabel features in data.features.")
  if not {"x", "y"} <= set(names):
    raise FileLayoutError(
        f"{where}: the features {sorted(names)} lack 'x' or 'y'; map them "
        "with data.features='x=<input feature>,y=<label feature>'.")
  in_order = bool(getattr(builder.info, "disable_shuffling", False))
  metadata = dict(builder.info.metadata or {})
  stores = {}
  for split in (train_split, test_split):
    ids, columns = _read_split(builder, split, names, client_id_feature,
                               where)
    if scale_uint8:
      columns = {n: (c.astype(np.float32) / np.float32(255.0)
                     if c.dtype == np.uint8 else c)
                 for n, c in columns.items()}
    stores[split] = group_by_client(ids, columns, max_clients,
                                    first_seen=in_order)
  train, test = stores[train_split], stores[test_split]
  if not num_classes:
    label_feature = available[names["y"]]
    if getattr(label_feature, "num_classes", None):
      num_classes = int(label_feature.num_classes)
    elif metadata.get("num_classes"):
      num_classes = int(metadata["num_classes"])
    else:
      ys = [s.features["y"] for s in (train, test)]
      if ys[0].dtype.kind not in "iu":
        raise FileLayoutError(f"{where}: y is {ys[0].dtype}, not integer "
                              "labels; set data.num_classes.")
      if ys[0].ndim > 1 and train.features["x"].dtype.kind in "iu":
        ys += [s.features["x"] for s in (train, test)]
      num_classes = 1 + max(int(a.max(initial=0)) for a in ys)
  source_info = metadata.get("info")
  info = dict(source_info) if isinstance(source_info, Mapping) else {}
  info.update({"source": f"{where} (prepared TFDS dataset)",
               "tfds_name": builder.info.full_name,
               "data_dir": os.path.abspath(builder.data_dir),
               "client_id_feature": client_id_feature,
               "features": dict(names),
               "splits": {"train": train_split, "test": test_split},
               "max_clients": max_clients})
  if metadata:
    info["tfds_metadata"] = metadata
  return FederatedDataset(
      name=str(metadata.get("name") or builder.info.name),
      train=train, test=test,
      num_classes=int(num_classes),
      input_shape=tuple(train.features["x"].shape[1:]), info=info)
