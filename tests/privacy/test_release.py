"""The release policy of DP runs and the secret seeds of their noise."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg
from fedjax_lab.engine.round import ORIGINS, build_round
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.privacy import aggregators
from fedjax_lab.privacy import release
from fedjax_lab.privacy import secret_seed
from fedjax_lab.privacy.clipping import clip_to_norm

from tests.engine.conftest import build_cohort, make_clients

ROUND = {"round": 3, "train_loss": 0.5, "update_norm": 2.0,
         "fraction_clipped": 0.5, "clipped_sum_norm": 4.0,
         "signal_to_noise": 0.1, "dp_noise_std": 1.0, "clip_norm": 0.5,
         "aggregate_delta_norm": 0.3, "num_clients": 7.0, "total_weight": 7.0,
         "params_finite": 1.0, "epsilon": 1.2, "seconds": 0.4,
         "local_steps_padded": 4, "eval_accuracy": 0.8,
         "train_eval_loss": 0.6, "personalization_accuracy_p10": 0.5,
         "made_up_metric": 1.0}
ORIGIN = {"train_loss": "client", "update_norm": "client_transform",
          "fraction_clipped": "client_transform",
          "clipped_sum_norm": "aggregator", "signal_to_noise": "aggregator",
          "dp_noise_std": "aggregator", "clip_norm": "aggregator",
          "aggregate_delta_norm": "server", "num_clients": "engine",
          "total_weight": "engine", "params_finite": "engine"}


def test_a_dp_run_withholds_what_clients_computed_without_noise():
  policy = release.ReleasePolicy(private=True)
  out = policy.release_record(ROUND, ORIGIN)
  assert set(out) == {"round", "dp_noise_std", "clip_norm",
                      "aggregate_delta_norm", "params_finite", "epsilon",
                      "eval_accuracy"}
  described = policy.describe()
  assert "train_loss" in described["withheld"]
  assert "made_up_metric" in described["withheld"]  # unknown: fail-safe
  assert described["released"]["evaluation"] == ["eval_accuracy"]


def test_released_diagnostics_are_prefixed():
  policy = release.ReleasePolicy(private=True, release_diagnostics=True)
  out = policy.release_record(ROUND, ORIGIN)
  assert out["diagnostic/train_loss"] == 0.5 and "train_loss" not in out
  assert out["diagnostic/num_clients"] == 7.0 and out["epsilon"] == 1.2
  assert "seconds" in policy.describe()["diagnostics_released_not_private"]


def test_a_non_private_run_releases_everything_unchanged():
  policy = release.ReleasePolicy(private=False)
  assert policy.release_record(ROUND, ORIGIN) == ROUND
  assert policy.release_summary({"seconds": 3}) == {"seconds": 3}


def test_evaluations_that_read_training_data_are_diagnostics():
  policy = release.ReleasePolicy(private=True,
                                 evaluation_reads_train_data=True)
  assert policy.classify("eval_accuracy") == release.DIAGNOSTIC
  summary = policy.release_summary({"final_eval_accuracy": 0.9, "rounds": 3,
                                    "seconds": 1.0, "compilations": 2})
  assert summary == {"rounds": 3}


def test_every_engine_origin_has_a_class():
  policy = release.ReleasePolicy(private=True)
  for origin in ORIGINS:
    assert policy.classify("some_metric", origin) in release.CLASSES


def test_the_round_reports_where_each_metric_comes_from(tiny_model):
  clients = make_clients(4, seed=0)
  cohort = build_cohort(clients, [0, 1, 2, 3], batch_size=4)
  alg = fedavg.fedavg(tiny_model, optax.sgd(0.1), weighting="uniform",
                      aggregator=aggregators.gaussian_sum(1.0, 1.0, 4.0))
  fn = build_round(alg, Strategy(), donate=False)
  _, _, metrics = fn(alg.server_init(tiny_model.init(jax.random.key(0))),
                     cohort, jnp.zeros([4]), jax.random.key(1))
  origins = fn.metric_origins()
  assert set(origins) == set(metrics)
  assert origins["train_loss"] == "client"
  assert origins["update_norm"] == "client_transform"
  assert origins["clipped_sum_norm"] == "aggregator"
  assert origins["aggregate_delta_norm"] == "server"
  assert origins["num_clients"] == "engine"


def _dp_round(tiny_model, noise_rng):
  clients = make_clients(4, seed=0)
  cohort = build_cohort(clients, [0, 1, 2, 3], batch_size=4)
  alg = fedavg.fedavg(tiny_model, optax.sgd(1.0), weighting="uniform",
                      aggregator=aggregators.gaussian_sum(1.0, 1.0, 4.0))
  fn = build_round(alg, Strategy(), donate=False)
  state, _, metrics = fn(alg.server_init(tiny_model.init(jax.random.key(0))),
                         cohort, jnp.zeros([4]), jax.random.key(1),
                         noise_rng)
  return state.params, metrics


def test_the_noise_key_moves_the_noise_and_nothing_else(tiny_model):
  a, metrics_a = _dp_round(tiny_model, jax.random.key(10))
  b, metrics_b = _dp_round(tiny_model, jax.random.key(11))
  legacy, _ = _dp_round(tiny_model, None)  # noise keyed by the training rng
  assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(b)[0])
  assert not np.allclose(jax.tree.leaves(a)[0], jax.tree.leaves(legacy)[0])
  # Local training (its losses, its clipped sum) does not depend on it.
  for name in ("train_loss", "clipped_sum_norm", "update_norm"):
    assert float(metrics_a[name]) == float(metrics_b[name])


def test_non_finite_updates_contribute_zero():
  tree = {"w": jnp.array([1.0, jnp.nan]), "b": jnp.array([3.0])}
  clipped, norm = clip_to_norm(tree, 1.0)
  assert not np.isfinite(float(norm))
  for leaf in jax.tree.leaves(clipped):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  clipped, _ = clip_to_norm({"w": jnp.array([jnp.inf])}, 1.0)
  np.testing.assert_array_equal(np.asarray(clipped["w"]), 0.0)


def test_secret_seeds_are_fresh_and_use_all_their_bits():
  draws = {secret_seed.draw_secret_seed() for _ in range(20)}
  assert len(draws) == 20 and all(0 <= d < 2**64 for d in draws)
  # Seeds that differ only above bit 32 give different keys (jax.random.key
  # would keep the low 32 bits only).
  low = secret_seed.noise_key(12345)
  high = secret_seed.noise_key(12345 + 2**40)
  assert not np.array_equal(jax.random.key_data(low),
                            jax.random.key_data(high))
  np.testing.assert_array_equal(jax.random.key_data(low), jax.random.key_data(
      secret_seed.noise_key(12345)))
  assert secret_seed.resolve_seed(7) == (7, True)
  seed, seeded = secret_seed.resolve_seed(-1)
  assert not seeded and 0 <= seed < 2**64
  with pytest.raises(ValueError, match="noise seed"):
    secret_seed.noise_key(2**64)


def test_side_channels_to_the_server_are_refused_with_dp(tiny_model):
  """The engine's two paths around the aggregator: a pre-round pass (Mime)
  and client metrics in the server update (adaptive FedProx)."""
  from fedjax_lab.algorithms import fedprox, mime  # pylint: disable=g-import-not-at-top
  from fedjax_lab.privacy import accounting, plan  # pylint: disable=g-import-not-at-top
  dp = aggregators.gaussian_sum(1.0, 1.0, 4.0)
  with pytest.raises(accounting.PrivacyError, match="pre-round"):
    plan.check_private_algorithm(mime.mime(
        tiny_model, optax.sgd(1.0, momentum=0.9), 0.1, weighting="uniform",
        aggregator=dp))
  with pytest.raises(accounting.PrivacyError, match="client metrics"):
    plan.check_private_algorithm(fedprox.fedprox(
        tiny_model, optax.sgd(0.1), optax.sgd(1.0), mu=0.1,
        weighting="uniform", aggregator=dp,
        adaptive_mu=fedprox.AdaptiveMu()))
  plan.check_private_algorithm(mime.mimelite(
      tiny_model, optax.sgd(1.0, momentum=0.9), 0.1, weighting="uniform",
      aggregator=dp))
