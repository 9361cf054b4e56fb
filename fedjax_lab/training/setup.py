"""From a config to the objects of an experiment (dataset, model, algorithm, ...).

The config schema (``configs/*.py`` return it; every key can be overridden
with ``--config.KEY=VALUE``):

* ``checkpoint_every`` (0 = only at the end), ``checkpoints_to_keep``,
  ``client_state_store`` (``"memory"`` or ``"disk"``),
  ``metrics_sinks`` (extra sinks: ``csv``, ``tensorboard``, ``wandb``),
  ``wandb_project``.
* ``seed``, ``num_rounds``, ``eval_every``, ``eval_batch_size``,
  ``eval_max_examples`` (0 = all), ``eval_train_split`` (also evaluate the
  global model on the training examples: ``train_eval_*`` keys),
  ``strategy`` (``"auto"`` or e.g. ``"vmap+scan"``), ``shard_clients``.
* ``algorithm``: a name registered in :mod:`fedjax_lab.algorithms`
  (``fedavg`` | ``fedopt`` | ``fedsgd`` | ``fedprox`` | ``scaffold`` |
  ``mime`` | ``mimelite`` | ``reptile`` | ``agnostic_fedavg`` |
  ``hypcluster``, or one registered later); its options are its config
  block (the keyword arguments of its recipe's ``build``, e.g.
  ``fedprox.mu``); ``compression`` block (``method`` none | quantize |
  top_k, applied to any algorithm); ``weighting``: ``num_examples`` |
  ``uniform``; ``personalization`` block (per-client fine-tuning
  evaluation).
* ``sampling``: ``fixed`` (``cohort_size`` clients without replacement) or
  ``poisson`` (each client with probability ``sampling_rate``).
* ``data``: ``name`` plus that dataset's ``load()`` keyword arguments.
* ``model``: ``name`` plus that model's keyword arguments.
* ``client``: ``optimizer``, ``learning_rate``, ``num_epochs``, ``batch_size``,
  ``max_steps`` (0 = no cap), ``hparams`` (extra optax arguments).
* ``server``: ``optimizer``, ``learning_rate``, ``hparams``.
* ``privacy``: the DP mechanism and its accounting
  (:mod:`fedjax_lab.privacy.plan` documents the keys).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from fedjax_lab import algorithms
from fedjax_lab import models
from fedjax_lab.algorithms import base as alg_base
from fedjax_lab.algorithms import compression
from fedjax_lab.algorithms.optimizers import build_optimizer
from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data import sampling
from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy, parse_strategy
from fedjax_lab.privacy import accounting
from fedjax_lab.privacy import mechanisms
from fedjax_lab.privacy import plan as privacy_plan
from fedjax_lab.privacy import refusals
from fedjax_lab.training import sinks

SAMPLING_KINDS = ("fixed", "poisson", "shuffle")
MODEL_FAMILIES = {"cnn": "conv", "char_lstm": "recurrent",
                  "word_lstm": "recurrent", "transformer_lm": "recurrent",
                  "resnet18": "conv"}
COMPRESSION_METHODS = ("none", "quantize", "top_k")
# Prefix of a DP run's algorithm name, per mechanism.
_DP_PREFIX = {"gaussian": "dp-", "adaptive": "dp-adaptive-", "tree": "dp-ftrl-",
              "local": "ldp-"}


class ConfigError(ValueError):
  """A config value is missing or invalid; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything a run needs, built from a config."""

  config: ml_collections.ConfigDict
  dataset: FederatedDataset
  model: models.Model
  algorithm: alg_base.FederatedAlgorithm
  sampler: Any
  strategy: Strategy
  model_family: str
  # Optional: (initial params, num_clients) -> every client's initial state
  # stacked on a leading axis (default: algorithm.client_state_init repeated).
  client_states_init: Any = None
  # The resolved DP mechanism and accounting; None for non-private runs.
  privacy: privacy_plan.PrivacyPlan | None = None
  # Optional (params, "test" | "train") -> metrics replacing the plain
  # evaluation of server_state.params (HypCluster's stacked cluster models).
  evaluate_params: Any = None
  # Local work per round: epochs over each client's data, and a step cap.
  local_epochs: int = 1
  local_max_steps: int | None = None
  # Local batching: shuffle each client's examples (False: in order), and
  # the allowed padded step counts (None: geometric buckets).
  shuffle_local_data: bool = True
  step_buckets: tuple[int, ...] | None = None


def _kwargs(block: ml_collections.ConfigDict) -> dict[str, Any]:
  out = block.to_dict()
  out.pop("name", None)
  return out


def _require(config, key):
  if key not in config or config[key] is None:
    raise ConfigError(f"config is missing '{key}'.")
  return config[key]


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks values a run cannot start with; raises ConfigError saying why."""
  for key in ("num_rounds", "seed", "eval_every", "data", "model", "client",
              "server"):
    _require(config, key)
  if config.num_rounds < 1:
    raise ConfigError(f"num_rounds must be >= 1, got {config.num_rounds}.")
  if config.eval_every < 0:
    raise ConfigError("eval_every must be >= 0 (0 = only at the end).")
  if config.sampling not in SAMPLING_KINDS:
    raise ConfigError(f"sampling must be one of {SAMPLING_KINDS}, got "
                      f"{config.sampling!r}.")
  if config.sampling == "poisson" and not 0 < config.sampling_rate <= 1:
    raise ConfigError("sampling='poisson' needs 0 < sampling_rate <= 1, got "
                      f"{config.sampling_rate}; set --config.sampling_rate.")
  if config.get("checkpoint_every", 0) < 0:
    raise ConfigError("checkpoint_every must be >= 0 (0 = only at the end), "
                      f"got {config.checkpoint_every}.")
  if config.get("client_state_store", "memory") not in ("memory", "disk"):
    raise ConfigError("client_state_store must be 'memory' or 'disk', got "
                      f"{config.client_state_store!r}.")
  if config.get("checkpoints_to_keep", 3) < 1:
    raise ConfigError("checkpoints_to_keep must be >= 1, got "
                      f"{config.checkpoints_to_keep}.")
  unknown_sinks = [s.strip() for s in config.get("metrics_sinks", "").split(",")
                   if s.strip() and s.strip() not in sinks.SINK_NAMES]
  if unknown_sinks:
    raise ConfigError(f"metrics_sinks has unknown {unknown_sinks}; choose "
                      f"from {', '.join(sinks.SINK_NAMES)}, comma-separated.")
  if config.client.batch_size < 1 or config.client.num_epochs < 1:
    raise ConfigError("client.batch_size and client.num_epochs must be >= 1.")
  mechanism = config.get("privacy", {}).get("mechanism", "none")
  context = _check_algorithm(config, mechanism)
  # Every unsafe DP combination is a row of privacy.refusals' table.
  enabled = []
  for key in refusals.DIAGNOSTIC_KEYS:
    block, _, name = key.rpartition(".")
    if (config.get(block, {}) if block else config).get(name, False):
      enabled.append(key)
  reason = refusals.first_refusal(refusals.Setting(
      mechanism=mechanism, algorithm=config.algorithm, context=context,
      compression=_compression_method(config), weighting=config.weighting,
      server_optimizer=config.server.optimizer, diagnostics=tuple(enabled),
      release_diagnostics=bool(config.get("privacy", {}).get(
          "release_diagnostics", False))), scopes=("algorithm", "config"))
  if reason is not None:
    raise ConfigError(reason)


def _check_algorithm(config, mechanism: str) -> algorithms.BuildContext:
  """The registered algorithm's own checks (its block's keys, its
  requirements) and the compression block's method; returns the context the
  refusal table reads (the algorithm's refusal of ``mechanism`` is a row)."""
  del mechanism  # refused by the table in validate
  try:
    recipe = algorithms.get(config.algorithm)
    context = algorithms.BuildContext(config, recipe.options(config))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  message = recipe.requires and recipe.requires(context)
  if message:
    raise ConfigError(message)
  method = _compression_method(config)
  if method not in COMPRESSION_METHODS:
    raise ConfigError(f"compression.method must be one of "
                      f"{COMPRESSION_METHODS}, got {method!r}.")
  return context


def _compression_method(config) -> str:
  block = config.get("compression", None)
  return block.method if block else "none"


def _compressor(config) -> compression.Compressor | None:
  """The ``compression`` block's compressor (None: uncompressed)."""
  method = _compression_method(config)
  block = config.get("compression", None)
  if method == "quantize":
    return compression.stochastic_quantization(
        block.num_bits, rotation=block.rotation, per_leaf=block.per_leaf)
  if method == "top_k":
    return compression.top_k(fraction=block.fraction,
                             error_feedback=block.error_feedback)
  return None


def build_model(config, dataset: FederatedDataset) -> models.Model:
  """The config's model shaped for the dataset."""
  return models.get_model(config.model.name, input_shape=dataset.input_shape,
                          num_classes=dataset.num_classes,
                          **_kwargs(config.model))


def build_context(config, model: models.Model | None = None,
                  privacy: privacy_plan.PrivacyPlan | None = None,
                  num_clients: int | None = None,
                  dataset: FederatedDataset | None = None
                  ) -> algorithms.BuildContext:
  """What the config's algorithm recipe builds from: its options, the
  optimizers (DP-FTRL's server optimizer under the tree mechanism) and the DP
  aggregator."""
  recipe = algorithms.get(config.algorithm)
  client_opt = build_optimizer(config.client.optimizer,
                               config.client.learning_rate,
                               config.client.get("hparams", {}))
  if privacy is not None and privacy.mechanism == "tree":
    server_opt = mechanisms.build_ftrl_server_optimizer(
        privacy, config.server.learning_rate)
  else:
    server_opt = build_optimizer(config.server.optimizer,
                                 config.server.learning_rate,
                                 config.server.get("hparams", {}))
  aggregator = (mechanisms.build_aggregator(privacy) if privacy is not None
                else None)
  return algorithms.BuildContext(
      config, recipe.options(config), model=model,
      client_optimizer=client_opt, server_optimizer=server_opt,
      aggregator=aggregator, privacy=privacy, num_clients=num_clients,
      dataset=dataset)


def _build_algorithm(context: algorithms.BuildContext
                     ) -> alg_base.FederatedAlgorithm:
  """The recipe's algorithm, named for its DP mechanism, its aggregation a
  chain with a compression link if the config says so."""
  config, privacy = context.config, context.privacy
  recipe = algorithms.get(config.algorithm)
  compressor = _compressor(config)
  if compressor is not None:
    # clip (central DP of fixed norm) -> compress -> the DP sum (or mean).
    context = dataclasses.replace(
        context, aggregator=mechanisms.build_aggregator(
            privacy, compression.compress(compressor)))
  algorithm = alg_base.pair_client_states(
      recipe.build(context, **context.options))
  prefix = _DP_PREFIX[privacy.mechanism] if privacy is not None else ""
  suffix = f"+{compressor.name}" if compressor is not None else ""
  return dataclasses.replace(algorithm,
                             name=prefix + algorithm.name + suffix)


def build_algorithm(config, model: models.Model,
                    privacy: privacy_plan.PrivacyPlan | None = None,
                    num_clients: int | None = None,
                    dataset: FederatedDataset | None = None
                    ) -> alg_base.FederatedAlgorithm:
  """The config's algorithm with its optimizers, DP aggregator, compression.

  ``num_clients`` (the population) and ``dataset`` are needed by some
  recipes (SCAFFOLD's server update, agnostic FL's domains, HypCluster's
  k-means init).
  """
  return _build_algorithm(build_context(config, model, privacy, num_clients,
                                        dataset))


def local_schedule(context: algorithms.BuildContext) -> tuple[int, int | None]:
  """``(num_epochs, max_steps)`` of the cohorts: the client block's, unless
  the recipe fixes its own (Reptile's inner steps)."""
  recipe = algorithms.get(context.config.algorithm)
  if recipe.local_schedule is not None:
    return recipe.local_schedule(context)
  client = context.config.client
  return client.num_epochs, client.max_steps or None


def _client_states_init(context: algorithms.BuildContext,
                        algorithm: alg_base.FederatedAlgorithm):
  """The recipe's per-client initial states (None: all start alike), paired
  with the compressor's states when the updates are compressed."""
  recipe = algorithms.get(context.config.algorithm)
  if recipe.client_states_init is None:
    return None
  inner_init = recipe.client_states_init(context)
  if inner_init is None or not alg_base.has_client_state(
      algorithm.aggregator):
    return inner_init

  def init(params, num_clients):
    # The aggregation chain's per-client state (the compressor's) beside
    # the recipe's states.
    aggregation_states = round_lib.stack_client_states(
        algorithm.client_state_init(params).aggregation, num_clients)
    return alg_base.ClientStates(algorithm=inner_init(params, num_clients),
                                 aggregation=aggregation_states)

  return init


def build_privacy(config, num_clients: int
                  ) -> privacy_plan.PrivacyPlan | None:
  """The config's DP plan for a population of ``num_clients`` (calibrates)."""
  if "privacy" not in config:
    return None
  try:
    return privacy_plan.build_plan(
        config.privacy, sampling=config.sampling, num_clients=num_clients,
        cohort_size=config.cohort_size, sampling_rate=config.sampling_rate,
        num_rounds=config.num_rounds)
  except accounting.PrivacyError as e:
    raise ConfigError(str(e)) from None


STEP_PADDINGS = ("bucketed", "fixed")


def _check_given(config, *, dataset, sampler, model, mechanism: str) -> None:
  """Refuses objects passed beside a config that would silently override
  (or be overridden by) one of its keys, and a given sampler in a DP run."""
  if dataset is not None and config.data.get("name", ""):
    raise ConfigError(
        f"a dataset was passed and config.data.name={config.data.name!r} "
        "names another; set data.name='' (the passed dataset is used) or "
        "pass no dataset.")
  if model is not None and config.model.get("name", ""):
    raise ConfigError(
        f"a model was passed and config.model.name={config.model.name!r} "
        "names another; set model.name='' or pass no model.")
  if model is None and not config.model.get("name", ""):
    raise ConfigError("config.model.name is empty and no model was passed; "
                      f"name one of {list(models.MODEL_NAMES)}.")
  if sampler is not None and mechanism != "none":
    raise ConfigError(
        f"privacy.mechanism={mechanism!r} samples cohorts itself, from the "
        "run's secret seed with the sampling its accountant assumes "
        f"(sampling={config.sampling!r}); a given sampler (e.g. a replayed "
        "schedule) has no amplification by sampling. Pass no sampler.")
  if sampler is not None and config.sampling == "poisson":
    raise ConfigError("sampling='poisson' pads cohorts to no fixed size; "
                      "with a given sampler leave sampling='fixed'.")


def build_experiment(config: ml_collections.ConfigDict, *,
                     dataset: FederatedDataset | None = None,
                     sampler: sampling.ClientSampler | None = None,
                     model: models.Model | None = None,
                     like: Experiment | None = None) -> Experiment:
  """Validates ``config`` and builds the dataset, model, algorithm, sampler.

  ``dataset`` (e.g. :meth:`FederatedDataset.from_client_arrays` of your own
  arrays), ``sampler`` (e.g. :class:`~fedjax_lab.data.sampling.
  ScheduleSampler` replaying a list of cohorts) and ``model`` replace what
  ``config.data`` / ``config.sampling`` / ``config.model`` would build; a
  config key that names something else is an error, never ignored.
  ``like``: an experiment built from a config with the same ``data`` and
  ``model`` blocks whose dataset and model objects are reused instead of
  loading and building them again (sweep members of one program).
  """
  validate(config)
  if like is not None:
    if (config.data.to_dict() != like.config.data.to_dict() or
        config.model.to_dict() != like.config.model.to_dict()):
      raise ConfigError("build_experiment(like=...) needs the same data and "
                        "model blocks as the experiment it reuses.")
  mechanism = config.get("privacy", {}).get("mechanism", "none")
  if like is None:
    _check_given(config, dataset=dataset, sampler=sampler, model=model,
                 mechanism=mechanism)
  else:
    _check_given(config, dataset=None, sampler=sampler, mechanism=mechanism,
                 model=None if config.model.get("name", "") else like.model)
    dataset, model = like.dataset, like.model
  if dataset is None:
    dataset = load_dataset(config.data.name, **_kwargs(config.data))
  num_clients = dataset.train.num_clients
  if sampler is not None:
    if sampler.num_clients != num_clients:
      raise ConfigError(
          f"the sampler draws from {sampler.num_clients} clients but the "
          f"dataset has {num_clients} training clients.")
    scheduled = getattr(sampler, "num_rounds", None)
    if scheduled is not None and scheduled < config.num_rounds:
      raise ConfigError(
          f"the sampler's schedule covers {scheduled} rounds but "
          f"num_rounds={config.num_rounds}; lower num_rounds or give a "
          "cohort for every round.")
  elif config.sampling != "poisson" and config.cohort_size > num_clients:
    raise ConfigError(
        f"cohort_size={config.cohort_size} but {dataset.name} has only "
        f"{num_clients} training clients; lower --config.cohort_size.")
  privacy = build_privacy(config, num_clients)
  if model is None:
    model = build_model(config, dataset)
  context = build_context(config, model, privacy, num_clients, dataset)
  algorithm = _build_algorithm(context)
  if privacy is not None:
    try:
      privacy_plan.check_private_algorithm(algorithm)
    except accounting.PrivacyError as e:
      raise ConfigError(str(e)) from None
  if sampler is None:
    sampler = make_sampler(config, num_clients, config.seed)
  family = MODEL_FAMILIES.get(config.model.name, "dense")
  strategy = parse_strategy(config.get("strategy", "auto"), family)
  local_epochs, local_max_steps = local_schedule(context)
  recipe = algorithms.get(config.algorithm)
  step_padding = config.client.get("step_padding", "bucketed")
  if step_padding not in STEP_PADDINGS:
    raise ConfigError(f"client.step_padding must be one of {STEP_PADDINGS}, "
                      f"got {step_padding!r}.")
  step_buckets = None
  if step_padding == "fixed":
    step_buckets = tuple(cohort_lib.fixed_step_padding(
        dataset.train, config.client.batch_size, local_epochs,
        local_max_steps))
  return Experiment(
      config, dataset, model, algorithm, sampler, strategy, family,
      client_states_init=_client_states_init(context, algorithm),
      privacy=privacy,
      evaluate_params=(recipe.evaluator(context) if recipe.evaluator
                       else None),
      local_epochs=local_epochs, local_max_steps=local_max_steps,
      shuffle_local_data=bool(config.client.get("shuffle", True)),
      step_buckets=step_buckets)


def make_sampler(config: ml_collections.ConfigDict, num_clients: int,
                 seed: int):
  """The config's cohort sampler over ``num_clients`` clients with ``seed``
  (``config.seed`` for a non-private run; a DP run's secret seed)."""
  if config.sampling != "poisson":
    return sampling.make_sampler(config.sampling, num_clients,
                                 cohort_size=config.cohort_size, seed=seed)
  return sampling.make_sampler("poisson", num_clients,
                               sampling_rate=config.sampling_rate, seed=seed)


def describe_devices() -> str:
  """One line naming the backend and devices, for logs and results."""
  devices = jax.devices()
  text = f"{jax.default_backend()} x{len(devices)} ({devices[0].device_kind})"
  if jax.process_count() > 1:
    text += f" over {jax.process_count()} processes"
  return text
