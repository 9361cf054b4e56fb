"""The base config every run starts from, and the ``:tiny`` smoke mode.

Every experiment config (``configs/*.py``) starts from :func:`base_config`
and overrides what it needs; the public API
(:func:`fedjax_lab.training.api.default_config`) starts from it too.
``setup`` documents what each key does.
"""

import inspect
from typing import Any, Callable, Sequence

import ml_collections

from fedjax_lab import algorithms
from fedjax_lab.privacy import aggregators


def _keyword_defaults(factory: Callable[..., Any],
                      names: Sequence[str]) -> dict[str, Any]:
  """``factory``'s default values of the keyword arguments ``names``."""
  parameters = inspect.signature(factory).parameters
  return {name: parameters[name].default for name in names}


def base_config() -> ml_collections.ConfigDict:
  """Keys every run has; experiment configs override what they need."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.num_rounds = 100
  config.max_seconds = 0.0  # > 0: stop cleanly after the round that passes it
  config.algorithm = "fedavg"
  config.weighting = "num_examples"
  config.sampling = "fixed"
  config.cohort_size = 10
  config.sampling_rate = 0.0
  config.eval_every = 10
  config.eval_batch_size = 256
  config.eval_max_examples = 0
  config.eval_train_split = False  # also evaluate on the training examples
  # Research loop: checkpoints (also written at the end and on SIGINT/SIGTERM;
  # re-running a command on its workdir resumes), extra metrics sinks beside
  # metrics.jsonl ("csv", "tensorboard", "wandb").
  config.checkpoint_every = 25
  config.checkpoints_to_keep = 3
  # Per-client states (SCAFFOLD, error feedback): "memory", or "disk"
  # (memory-mapped in workdir/client_states, O(cohort) per round, never
  # copied whole into a checkpoint; for very large populations).
  config.client_state_store = "memory"
  config.metrics_sinks = "csv,tensorboard"
  config.wandb_project = "fedjax_lab"
  config.strategy = "auto"
  config.shard_clients = True
  config.data = ml_collections.ConfigDict({"name": ""})
  config.model = ml_collections.ConfigDict({"name": ""})
  config.client = ml_collections.ConfigDict({
      "optimizer": "sgd", "learning_rate": 0.1, "num_epochs": 1,
      "batch_size": 10, "max_steps": 0, "hparams": {},
      # Local batching: shuffle each client's examples every epoch (False:
      # in stored order); pad local steps to geometric buckets ("bucketed",
      # few compilations) or to the largest client's count ("fixed", one).
      "shuffle": True, "step_padding": "bucketed"})
  config.server = ml_collections.ConfigDict({
      "optimizer": "sgd", "learning_rate": 1.0, "hparams": {}})
  config.privacy = privacy_defaults()
  # One block per algorithm with options (fedprox, scaffold, mime, reptile,
  # agnostic_fedavg, hypcluster, and any registered later): its keys and
  # defaults are the keyword arguments of the recipe's build function in
  # fedjax_lab/algorithms/<module>.py (documented there); an unknown key is
  # refused when the config is validated.
  for block, defaults in algorithms.config_blocks().items():
    config[block] = ml_collections.ConfigDict(defaults)
  # Compression of client updates (any algorithm): none | quantize | top_k.
  config.compression = ml_collections.ConfigDict({
      "method": "none", "num_bits": 8, "rotation": "none", "per_leaf": True,
      "fraction": 0.01, "error_feedback": True})
  # Per-client fine-tuning evaluation (personalization_* metrics): after the
  # last round and every `every` rounds (0 = last only), on max_clients
  # clients (0 = all), fine-tuning with SGD at learning_rate.
  config.personalization = ml_collections.ConfigDict({
      "enabled": False, "every": 0, "num_epochs": 1, "learning_rate": 0.01,
      "batch_size": 10, "max_clients": 0, "clients_per_chunk": 16,
      "eval_batch_size": 32})
  return config


def privacy_defaults() -> ml_collections.ConfigDict:
  """The ``privacy`` block (see fedjax_lab/privacy/plan.py); off by default."""
  return ml_collections.ConfigDict({
      "mechanism": "none",  # none | gaussian | adaptive | tree | local
      "clip_norm": 1.0,
      "noise_multiplier": 1.0,
      "delta": 0.0,  # 0 = 1 / population**1.1
      "accountant": "rdp",  # rdp | pld
      "target_epsilon": 0.0,  # > 0: stop before exceeding (or calibrate to)
      "calibrate": False,
      "noise_cohort_size": 0,
      "accounting_population": 0,
      # < 0: DP noise and cohort sampling from a secret seed (kept only in
      # checkpoints); >= 0: reproducible from this seed (not a private release).
      "noise_seed": -1,
      # Also write un-noised diagnostics (train loss, update norms, cohort
      # size, ...) as diagnostic/<name>; not covered by epsilon.
      "release_diagnostics": False,
      # Adaptive clipping (Andrew et al. 2021): the keyword arguments of
      # privacy.aggregators.adaptive_clipping, with their defaults there;
      # clipped_count_stddev 0 = Andrew et al.'s cohort/20 (at least z).
      "adaptive": {**_keyword_defaults(aggregators.adaptive_clipping,
                                       ("target_quantile",
                                        "clip_learning_rate")),
                   "clipped_count_stddev": 0.0},
      "ftrl": {"rounds_per_tree": 0, "momentum": 0.0},
  })


def apply_mode(config: ml_collections.ConfigDict,
               mode: str) -> ml_collections.ConfigDict:
  """``mode='tiny'``: the same pipeline shrunk to a few seconds (smoke tests)."""
  if not mode:
    return config
  if mode != "tiny":
    raise ValueError(f"unknown config mode {mode!r}; use ':tiny' or nothing.")
  config.num_rounds = 2
  config.eval_every = 1
  config.eval_max_examples = 64
  config.client.max_steps = 2
  if config.sampling == "poisson":
    config.sampling_rate = min(config.sampling_rate, 0.02)
  if config.sampling in ("fixed", "shuffle"):
    config.cohort_size = min(config.cohort_size, 3)
  return config


def set_dotted(config: ml_collections.ConfigDict, key: str,
               value: Any) -> None:
  """Sets the dotted ``key`` (``"client.learning_rate"``) of ``config``."""
  *parents, leaf = key.split(".")
  block = config
  for name in parents:
    block = block[name]
  block[leaf] = value
