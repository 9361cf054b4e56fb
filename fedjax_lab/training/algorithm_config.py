"""From a config's algorithm keys to a FederatedAlgorithm (and what it needs).

One place maps ``config.algorithm`` and its block (``fedprox``, ``scaffold``,
``mime``, ``reptile``, ``agnostic_fedavg``, ``hypcluster``) plus the
``compression`` block onto the factories of :mod:`fedjax_lab.algorithms`, and
checks the combinations that cannot work (with a message naming the keys):

* ``fedavg`` | ``fedopt`` | ``fedsgd``: McMahan et al. 2017; Reddi et al. 2021.
* ``fedprox``: Li et al. 2020 (proximal term, stragglers, adaptive mu).
* ``scaffold``: Karimireddy et al. 2020 (control variates, options I/II).
* ``mime`` | ``mimelite``: Karimireddy et al. 2021 (``mime.base_optimizer``
  with its state on the server).
* ``reptile``: Nichol et al. 2018 / Jiang et al. 2019 (``reptile.
  num_inner_steps`` steps per client, meta step = ``server.learning_rate``).
* ``agnostic_fedavg``: Mohri et al. 2019 (one domain per client, from
  ``agnostic_fedavg.domain_kind``).
* ``hypcluster``: Mansour et al. 2020 (``hypcluster.num_clusters`` models).
* ``compression.method``: ``quantize`` (Suresh et al. 2017) or ``top_k``
  (Stich et al. 2018) applied to any of the above.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from fedjax_lab.algorithms import agnostic
from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import compression
from fedjax_lab.algorithms import fedavg
from fedjax_lab.algorithms import fedprox
from fedjax_lab.algorithms import hypcluster
from fedjax_lab.algorithms import mime
from fedjax_lab.algorithms import reptile
from fedjax_lab.algorithms import scaffold
from fedjax_lab.algorithms.optimizers import build_optimizer
from fedjax_lab.engine import round as round_lib
from fedjax_lab.privacy import plan as privacy_plan

ALGORITHMS = ("fedavg", "fedopt", "fedsgd", "fedprox", "scaffold", "mime",
              "mimelite", "reptile", "agnostic_fedavg", "hypcluster")
COMPRESSION_METHODS = ("none", "quantize", "top_k")
_DP_PREFIX = {"gaussian": "dp-", "adaptive": "dp-adaptive-", "tree": "dp-ftrl-",
              "local": "ldp-"}
# Mixed into the seed for HypCluster's initial cluster models.
_HYPCLUSTER_INIT_SALT = 0x4C05


def check_algorithm_config(config, mechanism: str, error: type) -> None:
  """Raises ``error`` for algorithm settings that cannot run as configured."""
  algorithm = config.algorithm
  if algorithm not in ALGORITHMS:
    raise error(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}.")
  if algorithm == "scaffold" and config.client.optimizer != "sgd":
    raise error(
        "algorithm='scaffold' corrects plain SGD local steps; set "
        f"client.optimizer='sgd', not {config.client.optimizer!r}.")
  if algorithm in ("mime", "mimelite") and config.server.optimizer != "sgd":
    raise error(
        f"algorithm={algorithm!r} steps x + server.learning_rate * mean(y - x)"
        "; the optimizer it mimics is mime.base_optimizer. Set "
        "server.optimizer='sgd'.")
  if algorithm == "mime" and mechanism != "none":
    raise error(
        "algorithm='mime' broadcasts the cohort's exact (un-noised) mean "
        "gradient before local training, which no DP mechanism covers; use "
        "algorithm='mimelite' (its gradient rides in the clipped, noised "
        "update).")
  if (algorithm in ("mimelite", "agnostic_fedavg", "hypcluster") and
      mechanism == "tree"):
    raise error(
        f"privacy.mechanism='tree' noises the server optimizer's input, but "
        f"{algorithm} updates its statistics outside it; use "
        "privacy.mechanism='gaussian' or 'adaptive'.")
  if (algorithm == "hypcluster" and mechanism != "none" and
      config.get("hypcluster", {}).get("init", "kmeans") != "random"):
    raise error(
        "hypcluster.init='kmeans' trains candidate clients without clipping "
        "or noise and starts the clusters from their local models, which "
        "would publish single clients' models (epsilon covers nothing of "
        "it); with privacy.mechanism="
        f"{mechanism!r} set --config.hypcluster.init=random.")
  method = config.get("compression", {}).get("method", "none")
  if method not in COMPRESSION_METHODS:
    raise error(f"compression.method must be one of {COMPRESSION_METHODS}, "
                f"got {method!r}.")
  if method != "none" and mechanism == "local":
    raise error(
        "compression with privacy.mechanism='local' would add the local noise "
        "after decoding, which is not what a device sends; use central DP "
        "('gaussian' or 'adaptive') or compression.method='none'.")


def _compressor(block) -> compression.Compressor | None:
  method = block.get("method", "none")
  if method == "quantize":
    return compression.stochastic_quantization(
        block.get("num_bits", 8), rotation=block.get("rotation", "none"),
        per_leaf=block.get("per_leaf", True))
  if method == "top_k":
    return compression.top_k(fraction=block.get("fraction", 0.01),
                             error_feedback=block.get("error_feedback", True))
  return None


def _hypcluster_init(config, model, client_opt, dataset, num_clients
                     ) -> Callable[[], Any]:
  """The K initial cluster models (computed once, on first use)."""
  block = config.hypcluster
  rng = jax.random.fold_in(jax.random.key(config.seed), _HYPCLUSTER_INIT_SALT)

  @functools.cache
  def clusters():
    if block.get("init", "kmeans") == "random":
      return hypcluster.random_init(model, block.num_clusters, rng)
    count = min(block.get("init_clients", 0) or config.cohort_size,
                num_clients)
    candidates = np.random.default_rng(
        [config.seed, _HYPCLUSTER_INIT_SALT]).choice(num_clients, count,
                                                     replace=False)
    return hypcluster.kmeans_init(
        model, client_opt, dataset.train, np.sort(candidates),
        block.num_clusters, rng, batch_size=config.client.batch_size,
        num_epochs=config.client.num_epochs,
        max_steps=config.client.max_steps or None)

  return clusters


def build_algorithm(config, model,
                    privacy: privacy_plan.PrivacyPlan | None = None,
                    num_clients: int | None = None,
                    dataset=None) -> base.FederatedAlgorithm:
  """The config's algorithm with its optimizers, DP aggregator, compression.

  ``num_clients`` (the population) is needed by SCAFFOLD's server update;
  ``dataset`` by agnostic FL's domains and HypCluster's k-means init.
  """
  client_opt = build_optimizer(config.client.optimizer,
                               config.client.learning_rate,
                               config.client.get("hparams", {}))
  if privacy is not None and privacy.mechanism == "tree":
    server_opt = privacy_plan.build_ftrl_server_optimizer(
        privacy, config.server.learning_rate)
  else:
    server_opt = build_optimizer(config.server.optimizer,
                                 config.server.learning_rate,
                                 config.server.get("hparams", {}))
  aggregator = (privacy_plan.build_aggregator(privacy) if privacy is not None
                else None)
  prefix = _DP_PREFIX[privacy.mechanism] if privacy is not None else ""
  algorithm = _uncompressed(config, model, client_opt, server_opt, aggregator,
                            privacy, num_clients, dataset)
  algorithm = dataclasses.replace(algorithm, name=prefix + algorithm.name)
  compressor = _compressor(config.get("compression", {}))
  if compressor is None:
    return algorithm
  pre_clip = (privacy.clip_norm if privacy is not None and
              privacy.mechanism in ("gaussian", "tree") else None)
  return compression.compressed(algorithm, compressor, pre_clip_norm=pre_clip)


def _uncompressed(config, model, client_opt, server_opt, aggregator, privacy,
                  num_clients, dataset) -> base.FederatedAlgorithm:
  name, weighting = config.algorithm, config.weighting
  if name == "fedsgd":
    return fedavg.fedsgd(model, server_opt, weighting=weighting,
                         aggregator=aggregator)
  if name == "scaffold":
    return scaffold.scaffold(  # named scaffold_I / scaffold_II
        model, config.client.learning_rate, server_opt,
        option=config.get("scaffold", {}).get("option", "II"),
        weighting=weighting, aggregator=aggregator, num_clients=num_clients,
        expected_cohort_size=(privacy.simulated_cohort_size
                              if privacy is not None else None))
  if name == "fedprox":
    prox = config.get("fedprox", {})
    return fedprox.fedprox(
        model, client_opt, server_opt, mu=prox.get("mu", 0.0),
        weighting=weighting, aggregator=aggregator,
        straggler_fraction=prox.get("straggler_fraction", 0.0),
        straggler_min_steps=prox.get("straggler_min_steps", 1),
        drop_stragglers=prox.get("drop_stragglers", False),
        adaptive_mu=fedprox.AdaptiveMu(
            step_size=prox.get("adaptive_step", 0.1),
            decrease_after=prox.get("adaptive_decrease_after", 5),
            max_mu=prox.get("adaptive_max_mu", 1.0))
        if prox.get("adaptive_mu", False) else None)
  if name in ("mime", "mimelite"):
    block = config.get("mime", {})
    base_opt = build_optimizer(block.get("base_optimizer", "momentum"), 1.0,
                               block.get("base_hparams", {"momentum": 0.9}))
    build = mime.mime if name == "mime" else mime.mimelite
    return build(model, base_opt, config.client.learning_rate,
                 server_learning_rate=config.server.learning_rate,
                 weighting=weighting, aggregator=aggregator)
  if name == "reptile":
    return reptile.reptile(
        model, client_opt, config.reptile.num_inner_steps,
        server_optimizer=server_opt, weighting=weighting,
        aggregator=aggregator)
  if name == "agnostic_fedavg":
    block = config.agnostic_fedavg
    ids, names = _client_domains(config, dataset)
    num_domains = len(names)
    sizes = (dataset.train.client_sizes if weighting == "num_examples"
             else None)
    # The population's domain shares are a statistic of every client's data:
    # a DP run starts from uniform shares instead.
    window = (agnostic.domain_fractions(ids, num_domains, sizes)
              if privacy is None else None)
    return agnostic.agnostic_fedavg(
        model, client_opt, server_opt, num_domains,
        block.domain_learning_rate,
        init_domain_window=window,
        window_size=block.window_size,
        min_window_fraction=block.min_window_fraction or None,
        weighting=weighting, aggregator=aggregator,
        self_normalize=privacy is None,
        loss_bound=block.loss_bound or None, stats_scale=block.stats_scale)
  if name == "hypcluster":
    block = config.hypcluster
    algorithm = hypcluster.hypcluster(
        model, client_opt, server_opt, block.num_clusters,
        weighting=weighting, aggregator=aggregator,
        min_cluster_share=block.min_cluster_share,
        stats_scale=block.stats_scale)
    clusters = _hypcluster_init(config, model, client_opt, dataset,
                                num_clients)
    # The loop initialises from one model; HypCluster starts from K.
    return dataclasses.replace(
        algorithm, server_init=lambda params: algorithm.server_init(
            clusters()))
  return fedavg.fedopt(model, client_opt, server_opt, weighting=weighting,
                       aggregator=aggregator, name=name)


def _client_domains(config, dataset) -> tuple[np.ndarray, tuple[str, ...]]:
  """Agnostic FL: each training client's domain id (``[num_clients]``) and
  the domain names. In a DP run majority-label domains are numbered by label
  over all ``num_classes`` (which labels occur is private); play and id-prefix
  domains come from client ids, which are public metadata."""
  block = config.agnostic_fedavg
  private = config.get("privacy", {}).get("mechanism", "none") != "none"
  return agnostic.domain_ids_from(
      dataset, block.domain_kind, block.get("domain_separator", "/"),
      num_labels=(dataset.num_classes if private and
                  block.domain_kind == "majority_label" else None))


def client_states_init(config, dataset, algorithm: base.FederatedAlgorithm
                       ) -> Callable[[Any, int], Any] | None:
  """``(params, num_clients) -> stacked states`` when clients do not all start
  alike (agnostic FL: each client's domain id), else None."""
  if config.algorithm != "agnostic_fedavg":
    return None
  ids, names = _client_domains(config, dataset)
  domains = agnostic.client_domain_states(ids, len(names))

  def init(params, num_clients):
    # A fresh store per call: the runner writes client rows in place.
    if not compression_enabled(config):
      return domains.copy()
    # compressed() pairs the inner state with the compressor's.
    _, compressor_states = round_lib.stack_client_states(
        algorithm.client_state_init(params), num_clients)
    return domains.copy(), compressor_states

  return init


def compression_enabled(config) -> bool:
  """Whether the config compresses client updates."""
  return config.get("compression", {}).get("method", "none") != "none"


def local_schedule(config) -> tuple[int, int | None]:
  """``(num_epochs, max_steps)`` of the cohorts: the client block's, except
  Reptile's fixed number of full inner steps."""
  if config.algorithm == "reptile":
    schedule = reptile.cohort_schedule(config.reptile.num_inner_steps,
                                       config.client.batch_size)
    return schedule["num_epochs"], schedule["max_steps"]
  return config.client.num_epochs, config.client.max_steps or None


def cluster_evaluator(config, model, dataset):
  """HypCluster's evaluation (each client uses its best cluster), built once:
  ``evaluate(params, split) -> metrics`` with split ``"test"`` or
  ``"train"``; None for other algorithms."""
  if config.algorithm != "hypcluster":
    return None
  evaluate = hypcluster.build_hypcluster_evaluator(model)
  max_examples = config.get("eval_max_examples", 0) or None
  train_batches = hypcluster.client_batches(
      dataset.train, config.eval_batch_size, max_examples=max_examples)
  test_batches = hypcluster.client_batches(
      dataset.test, config.eval_batch_size, reference=dataset.train,
      max_examples=max_examples)
  return lambda params, split: evaluate(
      params, train_batches, test_batches if split == "test"
      else train_batches)
