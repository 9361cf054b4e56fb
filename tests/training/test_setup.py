"""Every algorithm from a config through setup: refusals, client states, DP
composition, local schedules, evaluators."""


import numpy as np
import pytest

from fedjax_lab import algorithms
from fedjax_lab.algorithms import agnostic
from fedjax_lab.training import loop, metrics_io, setup
from tests.config_helpers import tiny_config as _config


def _private(config, mechanism="gaussian"):
  config.privacy.mechanism = mechanism
  config.privacy.clip_norm = 0.5
  config.privacy.noise_multiplier = 0.5
  config.weighting = "uniform"
  return config


@pytest.mark.parametrize("name, overrides, match", [
    ("synthetic_mime", {"server.optimizer": "adam"}, "server.optimizer='sgd'"),
    ("synthetic_scaffold", {"client.optimizer": "adam"}, "client.optimizer"),
    ("synthetic_logreg_fedavg", {"algorithm": "fedcool"}, "algorithm must be"),
    ("synthetic_logreg_fedavg", {"compression.method": "zip"},
     "compression.method"),
    ("synthetic_logreg_fedavg", {"metrics_sinks": "csv,excel"}, "excel"),
    ("synthetic_logreg_fedavg", {"checkpoint_every": -1}, "checkpoint_every"),
])
def test_impossible_settings_are_refused_by_name(name, overrides, match):
  with pytest.raises(setup.ConfigError, match=match):
    setup.validate(_config(name, **overrides))


@pytest.mark.parametrize("name, mechanism, match", [
    ("synthetic_mime", "gaussian", "mimelite"),
    ("synthetic_mime", "adaptive", "mimelite"),
    ("mnist_cnn_compressed", "local", "compression"),
    ("mnist_hypcluster", "tree", "gaussian"),
    # k-means init starts the clusters from single clients' raw models.
    ("mnist_hypcluster", "gaussian", "hypcluster.init=random"),
    # Per-client fine-tuning scores are un-noised statistics of private data.
    ("synthetic_reptile", "gaussian", "release_diagnostics"),
])
def test_dp_combinations_that_would_leak_are_refused(name, mechanism, match):
  config = _private(_config(name), mechanism)
  with pytest.raises(setup.ConfigError, match=match):
    setup.validate(config)


@pytest.mark.parametrize("name, overrides", [
    ("synthetic_mime", {"algorithm": "mimelite"}),
    ("synthetic_reptile", {"personalization.enabled": False}),
    ("synthetic_fedprox", {"server.optimizer": "adam",
                           "server.learning_rate": 0.01}),
    ("synthetic_scaffold", {}),
    # The MNIST-model configs (tens of seconds each) are slow; the leak
    # tests (test_privacy_leaks) run these algorithms under DP by default.
    pytest.param("mnist_agnostic", {"agnostic_fedavg.loss_bound": 10.0},
                 marks=pytest.mark.slow),
    pytest.param("mnist_hypcluster", {"hypcluster.min_cluster_share": 0.05,
                                      "hypcluster.init": "random"},
                 marks=pytest.mark.slow),
    pytest.param("mnist_cnn_compressed", {}, marks=pytest.mark.slow),
    pytest.param("mnist_cnn_compressed", {"compression.method": "top_k"},
                 marks=pytest.mark.slow),
])
def test_every_algorithm_runs_under_dp(name, overrides, tmp_path):
  config = _private(_config(name, **overrides))
  summary = loop.run_experiment(setup.build_experiment(config),
                                str(tmp_path), show_progress=False)
  records = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))
  assert summary["rounds"] == 2 and summary["epsilon"] > 0
  assert summary["algorithm"].startswith("dp-")
  for record in records:
    assert record["params_finite"] == 1.0
    assert record["clip_norm"] == 0.5 and record["epsilon"] > 0
    # Client-side statistics are withheld; server-side ones are released.
    assert "train_loss" not in record and "num_clients" not in record
  if name == "mnist_hypcluster":
    # Its evaluation picks each client's cluster with its training data.
    assert "eval_accuracy" not in records[-1]
    assert "final_eval_accuracy" not in summary
  else:
    assert np.isfinite(records[-1]["eval_loss"])


@pytest.mark.parametrize("key", ["eval_train_split",
                                 "personalization.enabled"])
def test_dp_diagnostic_evaluations_need_release_diagnostics(key):
  config = _private(_config("synthetic_logreg_fedavg", **{key: True}))
  with pytest.raises(setup.ConfigError, match="release_diagnostics"):
    setup.validate(config)
  config.privacy.release_diagnostics = True
  setup.validate(config)


def test_dp_scaffold_moves_c_by_the_noised_sum_over_the_population():
  """|S| in c += |S|/N * mean is the expected cohort under DP, so the
  control variate is a function of the noised sum alone."""
  config = _private(_config("synthetic_scaffold"))
  config.sampling, config.sampling_rate = "poisson", 0.3
  experiment = setup.build_experiment(config)
  algorithm = experiment.algorithm
  params = experiment.model.init(__import__("jax").random.key(0))
  state = algorithm.server_init(params)
  import jax  # pylint: disable=g-import-not-at-top
  noisy_mean = jax.tree.map(lambda p: 0.01 + 0 * p, params)
  aggregate, _, _ = algorithm.aggregator.finalize(
      (noisy_mean, noisy_mean), 3.0, 3.0, state.aggregator_state,
      jax.random.key(1))
  (_, _), cohort_size = aggregate
  # 30 clients at q = 0.3: 9 expected, whatever the realised count (3).
  assert float(cohort_size) == pytest.approx(9.0)


def test_dp_agnostic_domains_do_not_depend_on_which_labels_occur():
  config = _private(_config("mnist_agnostic"))
  experiment = setup.build_experiment(config)
  stats = experiment.algorithm.server_init(
      experiment.model.init(__import__("jax").random.key(0))).extra
  num_classes = experiment.dataset.num_classes
  # One domain per class (not per label some client happens to hold), and a
  # uniform initial window (not the population's private shares).
  np.testing.assert_allclose(np.asarray(stats.domain_window),
                             np.full((1, num_classes), 1 / num_classes),
                             rtol=1e-6)


def test_agnostic_clients_start_with_their_domain(tmp_path):
  for method in ("none", "quantize"):
    config = _config("mnist_agnostic", **{"compression.method": method})
    experiment = setup.build_experiment(config)
    ids, _ = agnostic.domain_ids_from(experiment.dataset, "majority_label")
    params = experiment.model.init(__import__("jax").random.key(0))
    states = experiment.client_states_init(
        params, experiment.dataset.train.num_clients)
    domains = states if method == "none" else states[0]
    np.testing.assert_array_equal(np.asarray(domains), ids)
  summary = loop.run_experiment(experiment, str(tmp_path),
                                show_progress=False)
  assert summary["algorithm"] == "agnostic_fedavg+q8"


def _local_schedule(config):
  recipe = algorithms.get(config.algorithm)
  return setup.local_schedule(
      algorithms.BuildContext(config, recipe.options(config)))


def test_reptile_cohorts_give_every_client_the_same_inner_steps():
  config = _config("synthetic_reptile", **{"reptile.num_inner_steps": 3})
  epochs, max_steps = _local_schedule(config)
  assert max_steps == 3 and epochs >= 3
  assert _local_schedule(_config("synthetic_scaffold")) == (
      20, 2)  # the client block's (tiny mode caps steps at 2)


def test_personalization_is_recorded_with_per_client_accuracies(tmp_path):
  config = _config("synthetic_reptile")
  summary = loop.run_experiment(setup.build_experiment(config),
                                str(tmp_path), show_progress=False)
  block = summary["personalization"]
  accuracies = np.asarray(block["personalized_accuracy_per_client"])
  assert len(accuracies) == block["num_clients_evaluated"] == 30
  assert block["personalized_accuracy_worst"] == pytest.approx(
      accuracies.min())
  last = metrics_io.read_jsonl(str(tmp_path / "metrics.jsonl"))[-1]
  assert last["personalization_personalized_accuracy_p10"] == pytest.approx(
      np.percentile(accuracies, 10))


def test_hypcluster_evaluates_each_client_with_its_cluster(tmp_path):
  config = _config("mnist_hypcluster")
  summary = loop.run_experiment(setup.build_experiment(config),
                                str(tmp_path), show_progress=False)
  counts = [summary[f"final_eval_cluster_clients_{k}"] for k in range(2)]
  assert sum(counts) > 0
  config.personalization.enabled = True
  with pytest.raises(ValueError, match="single global model"):
    loop.run_experiment(setup.build_experiment(config),
                        str(tmp_path / "p"), show_progress=False)
