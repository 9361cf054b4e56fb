"""The one-shot canary audit end to end (fedjax_lab.audit.one_shot)."""

import dataclasses
import json
import math

import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg
from fedjax_lab.audit import one_shot
from fedjax_lab.privacy import empirical_epsilon as epsilon_lib
from fedjax_lab.training import loop
from fedjax_lab.training import privacy_run
from fedjax_lab.training import setup

from tests.audit.test_canaries import noisy_sum, small_config


def inserted_mean(report):
  return report["inserted_cosine"]["mean"]


def _with_aggregator(experiment, clip_norm, noise_multiplier):
  config = experiment.config
  algorithm = fedavg.fedopt(
      experiment.model, optax.sgd(config.client.learning_rate),
      optax.sgd(1.0), weighting="uniform",
      aggregator=noisy_sum(clip_norm, noise_multiplier, config.cohort_size))
  return dataclasses.replace(experiment, algorithm=algorithm)


def test_end_to_end_audit_detects_canaries_without_noise(tmp_path):
  clip, delta = 1.0, 1e-5
  results = {}
  for name, noise in (("clean", 0.0), ("noisy", 20.0)):
    experiment = _with_aggregator(setup.build_experiment(small_config()),
                                  clip, noise)
    report = one_shot.run_audit(experiment, str(tmp_path / name),
                             num_canaries=30, num_held_out=200, seed=1,
                             delta=delta, clip_norm=clip)
    on_disk = json.loads((tmp_path / name / one_shot.AUDIT_FILE).read_text())
    assert on_disk == report
    results[name] = report
  clean, noisy = results["clean"], results["noisy"]
  for report in (clean, noisy):
    assert report["d"] == 610 and report["rounds"] == 8
    assert report["num_canaries"] == 30 and report["num_held_out"] == 200
    assert report["canary_participation"]["mean"] > 1
    # Held-out cosines follow the N(0, 1/d) null.
    held = report["held_out_cosine"]
    assert abs(held["mean"]) < 4 * report["null_cosine_std"] / math.sqrt(200)
    assert held["std"] == pytest.approx(report["null_cosine_std"], rel=0.2)
  inserted, held = clean["inserted_cosine"], clean["held_out_cosine"]
  standard_error = math.sqrt(inserted["std"]**2 / 30 + held["std"]**2 / 200)
  assert inserted["mean"] - held["mean"] > 4 * standard_error
  assert inserted["max"] > held["max"]
  assert clean["empirical_epsilon"] > 10
  assert clean["empirical_epsilon"] > 3 * clean["held_out_as_inserted_epsilon"]
  assert noisy["empirical_epsilon"] < clean["empirical_epsilon"] / 4
  assert clean["accountant_epsilon"] is None
  assert noisy["inserted_cosine"]["mean"] < 2 * clean["null_cosine_std"]
  # The mean-shift variant is the Gaussian mechanism of the effect size.
  for report in (clean, noisy):
    effect = report["mean_shift_effect_size"]
    assert effect == pytest.approx(max(inserted_mean(report), 0) /
                                   report["null_cosine_std"])
    if report["empirical_epsilon_mean_shift"] > 0:
      assert epsilon_lib.gaussian_mechanism_delta(
          report["empirical_epsilon_mean_shift"], effect) == pytest.approx(
              delta, rel=1e-3)
  assert (clean["empirical_epsilon_mean_shift"] >
          4 * noisy["empirical_epsilon_mean_shift"])



def test_run_sampler_replays_a_dp_runs_secret_cohorts(tmp_path):
  """A non-private run's sampler is the experiment's; a DP run's is keyed by
  the secret seed in its checkpoint (not the public config.seed), and a DP
  workdir without a checkpoint is refused."""
  public = setup.build_experiment(small_config(num_rounds=2))
  assert one_shot.run_sampler(public, str(tmp_path / "none")) is (
      public.sampler)

  config = small_config(num_rounds=3)
  config.weighting = "uniform"
  config.privacy.update({"mechanism": "gaussian", "clip_norm": 0.3,
                         "noise_multiplier": 1.0})
  private = setup.build_experiment(config)
  with pytest.raises(privacy_run.MissingSecretError, match="noise seed"):
    one_shot.run_sampler(private, str(tmp_path / "empty"))
  workdir = str(tmp_path / "dp")
  loop.run_experiment(private, workdir, show_progress=False)
  replayed = one_shot.run_sampler(private, workdir)
  again = one_shot.run_sampler(private, workdir)
  cohorts = [np.asarray(replayed.sample(r)) for r in range(3)]
  for r, cohort in enumerate(cohorts):
    np.testing.assert_array_equal(cohort, again.sample(r))
  assert any(not np.array_equal(cohort, private.sampler.sample(r))
             for r, cohort in enumerate(cohorts))
