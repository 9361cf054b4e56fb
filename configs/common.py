"""Defaults shared by every experiment config, and the ``:tiny`` smoke mode."""

import ml_collections


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
  config.metrics_sinks = "csv,tensorboard"
  config.wandb_project = "fedjax_lab"
  config.strategy = "auto"
  config.shard_clients = True
  config.data = ml_collections.ConfigDict({"name": ""})
  config.model = ml_collections.ConfigDict({"name": ""})
  config.client = ml_collections.ConfigDict({
      "optimizer": "sgd", "learning_rate": 0.1, "num_epochs": 1,
      "batch_size": 10, "max_steps": 0, "hparams": {}})
  config.server = ml_collections.ConfigDict({
      "optimizer": "sgd", "learning_rate": 1.0, "hparams": {}})
  config.privacy = privacy_defaults()
  # FedProx (algorithm="fedprox"): proximal weight and systems heterogeneity.
  # adaptive_mu: Li et al.'s Appendix C.3.3 rule (mu starts at ``mu``, moves
  # by adaptive_step, lowered after adaptive_decrease_after falling losses).
  config.fedprox = ml_collections.ConfigDict({
      "mu": 0.0, "straggler_fraction": 0.0, "straggler_min_steps": 1,
      "drop_stragglers": False, "adaptive_mu": False, "adaptive_step": 0.1,
      "adaptive_decrease_after": 5, "adaptive_max_mu": 1.0})
  # SCAFFOLD (algorithm="scaffold"): client.optimizer must be sgd.
  config.scaffold = ml_collections.ConfigDict({"option": "II"})
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
      "adaptive": {"target_quantile": 0.5, "clip_learning_rate": 0.2,
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
