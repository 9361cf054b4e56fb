"""One-shot empirical privacy estimation with random canary clients.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar, "One-shot Empirical Privacy
Estimation for Federated Learning", ICLR 2024 (arXiv:2302.03098).

The idea. A DP guarantee bounds how well an adversary can tell whether one
client took part in training. The audit adds ``k`` *canary clients* to the
population and measures, from the trained model alone, how visible they are:

* Canary ``i``'s update is a fixed random unit direction ``u_i`` scaled to
  the clip norm ``C``, the same in every round the canary is sampled.
  Canaries are sampled exactly like real clients and their updates go through
  the algorithm's aggregator (clipping, noise) like everyone else's.
* ``k'`` more directions from the same distribution are drawn but never
  inserted ("held-out" canaries).
* After training, with ``Delta = theta_T - theta_0``, the statistic of canary
  ``i`` is ``cos(Delta, u_i)``. A direction independent of ``Delta`` has
  cosine ~ ``N(0, 1/d)`` in ``d`` dimensions (the held-out cosines check
  this); an inserted canary pulls ``Delta`` towards itself every round it is
  sampled, shifting its cosine up.
* The empirical epsilon is the epsilon of telling apart two Gaussians: the
  fit of the inserted cosines and the null ``N(0, 1/d)`` (or the fit of the
  held-out cosines).

"One-shot": the canaries are all inserted into one training run (they are
nearly orthogonal in high dimension, so they barely interact), and the estimate
needs no retraining. It is an empirical *estimate* under the adversary that
sees only the final model, not a lower bound with a confidence level; it is
expected to lie below the accountant's (worst-case) epsilon.

Caveats:

* The estimate is for an adversary who sees the final model only (the
  paper's final-model variant; its "all iterates" variant, which scores every
  round's delta, is not implemented here).
* With few canaries the estimate is positive even without any signal (see
  :mod:`~fedjax_lab.privacy.empirical_epsilon`). The report therefore
  includes the same estimate on ``k`` held-out cosines
  (``held_out_as_inserted_epsilon``), the floor reached by chance. Use many
  canaries (hundreds to thousands) in a population large enough to hold
  them.
* Canaries enlarge the population, so the real clients' sampling differs
  slightly from the configured one (see :mod:`~fedjax_lab.audit.canaries`).

The pieces:

* :mod:`~fedjax_lab.audit.canaries` — the canary directions, their cosines
  with a model delta, and canary clients in an algorithm and an experiment.
* :mod:`~fedjax_lab.privacy.empirical_epsilon` — the estimate.
* :func:`audit_report` — the cosines of a trained model's delta and the
  estimate; :func:`run_audit` — train with canaries, then report (what
  ``experiments/audit.py`` runs); :func:`run_sampler` — the cohorts a run
  really drew (a DP run's secret seed read back from its checkpoint), for
  :func:`canary_participation`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.audit import canaries as canaries_lib
from fedjax_lab.data.sampling import ClientSampler
from fedjax_lab.privacy import clipping
from fedjax_lab.privacy import empirical_epsilon as epsilon_lib
from fedjax_lab.privacy import secret_seed
from fedjax_lab.training import loop
from fedjax_lab.training import metrics_io
from fedjax_lab.training import privacy_run
from fedjax_lab.training import setup
from fedjax_lab.training import workdir as workdir_lib
from fedjax_lab.training.setup import Experiment

PyTree = Any

# Written next to the run's files by run_audit.
AUDIT_FILE = "audit.json"


def _describe(values: np.ndarray) -> dict[str, float] | None:
  if len(values) == 0:
    return None
  values = np.asarray(values, np.float64)
  return {"mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
          "min": float(np.min(values)), "median": float(np.median(values)),
          "max": float(np.max(values))}


def run_sampler(experiment: Experiment, workdir: str) -> ClientSampler:
  """The cohort sampler a finished or interrupted run in ``workdir`` used.

  A non-private run's is the experiment's own; a DP run samples with a
  secret seed, kept only in its checkpoints, so its sampler is rebuilt from
  the newest checkpoint's record (for the curator's own analyses, such as
  :func:`canary_participation`; never for anything released).

  Raises:
    privacy_run.MissingSecretError: a DP run whose workdir holds no
      checkpoint with its seed.
  """
  if experiment.privacy is None:
    return experiment.sampler
  checkpoints = workdir_lib.RunCheckpoints(
      os.path.join(workdir, workdir_lib.CHECKPOINT_DIR))
  try:
    record = checkpoints.latest_record()
  finally:
    checkpoints.close()
  if record is None or privacy_run.SEED_RECORD_KEY not in record:
    raise privacy_run.MissingSecretError(
        f"{workdir} holds no checkpoint with the run's noise seed.")
  return setup.make_sampler(
      experiment.config, experiment.dataset.train.num_clients,
      secret_seed.sampling_seed(int(record[privacy_run.SEED_RECORD_KEY])))


def canary_participation(sampler: ClientSampler,
                         canaries: canaries_lib.CanarySetup,
                         num_rounds: int) -> np.ndarray:
  """How many of the first ``num_rounds`` cohorts each inserted canary was in."""
  counts = np.zeros([canaries.num_canaries], np.int64)
  for round_index in range(num_rounds):
    cohort = np.asarray(sampler.sample(round_index))
    rows = cohort[cohort >= canaries.num_real_clients]
    np.add.at(counts, rows - canaries.num_real_clients, 1)
  return counts


def audit_report(initial_params: PyTree, final_params: PyTree,
                 canaries: canaries_lib.CanarySetup, delta: float,
                 null: str = "theoretical") -> dict[str, Any]:
  """Cosines of ``theta_T - theta_0`` with every canary, and the estimate.

  Returns a dict: ``empirical_epsilon`` (with the chosen null),
  ``empirical_epsilon_held_out_null`` / ``..._theoretical_null`` (the other
  choice, when computable), ``held_out_as_inserted_epsilon`` (the estimate
  on the first ``k`` held-out cosines, which carry no signal: the floor the
  estimator reaches by chance with ``k`` canaries), ``delta``, ``d``, the
  fitted Gaussians, cosine statistics of inserted and held-out canaries,
  ``null_cosine_std`` (``1/sqrt(d)``), ``final_delta_norm``, and
  ``empirical_epsilon_mean_shift`` (equal-variance variant: the Gaussian
  mechanism whose effect size is the inserted cosines' mean times
  ``sqrt(d)``, with ``mean_shift_effect_size`` and its standard error).
  """
  model_delta = jax.tree.map(
      lambda a, b: jnp.asarray(a, jnp.float32) - jnp.asarray(b, jnp.float32),
      final_params, initial_params)
  d = clipping.num_parameters(model_delta)
  cosines = canaries_lib.canary_cosines(
      model_delta, np.concatenate([canaries.inserted_ids,
                                   canaries.held_out_ids]), canaries.seed)
  inserted = cosines[:canaries.num_canaries]
  held_out = cosines[canaries.num_canaries:]
  have_held_out = len(held_out) >= 2
  estimate = epsilon_lib.empirical_epsilon(
      inserted, delta, d, held_out if have_held_out else None, null)
  report = {
      "empirical_epsilon": estimate.epsilon,
      "delta": float(delta),
      "null": null,
      "d": d,
      "num_canaries": canaries.num_canaries,
      "num_held_out": canaries.num_held_out,
      "canary_seed": canaries.seed,
      "clip_norm": canaries.clip_norm,
      "fit": {"mu": estimate.mu, "sigma": estimate.sigma,
              "null_mu": estimate.null_mu,
              "null_sigma": estimate.null_sigma},
      "inserted_cosine": _describe(inserted),
      "held_out_cosine": _describe(held_out),
      "null_cosine_std": 1.0 / math.sqrt(d),
      "final_delta_norm": float(clipping.global_norm(model_delta)),
  }
  # The estimator's floor: the same fit on k never-inserted cosines (no
  # signal at all) against the theoretical null. The sample std of k cosines
  # misses 1/sqrt(d) by ~1/sqrt(2k) relatively, and unequal variances alone
  # give a positive epsilon; an inserted estimate near this value means the
  # canaries were not detected.
  floor_sample = held_out[:canaries.num_canaries]
  report["held_out_as_inserted_epsilon"] = (
      epsilon_lib.empirical_epsilon(floor_sample, delta, d).epsilon
      if len(floor_sample) >= 2 else None)
  # A steadier variant for few canaries: assume the inserted cosines share
  # the null's spread (true when the noise dominates the model delta) and
  # use only the mean shift, i.e. a Gaussian mechanism with effect size
  # mu * sqrt(d). Its sampling error comes from the mean alone (std error
  # sigma / sqrt(k)), not from the fitted std, whose error inflates epsilon.
  null_std = 1.0 / math.sqrt(d)
  shift = max(float(np.mean(inserted)), 0.0) if len(inserted) else 0.0
  report["empirical_epsilon_mean_shift"] = epsilon_lib.gaussians_epsilon(
      delta, shift, null_std, 0.0, null_std)
  report["mean_shift_effect_size"] = shift / null_std
  report["mean_shift_effect_size_stderr"] = (
      float(np.std(inserted, ddof=1)) / null_std / math.sqrt(len(inserted))
      if len(inserted) >= 2 else None)
  other = "held_out" if null == "theoretical" else "theoretical"
  if other == "theoretical" or have_held_out:
    report[f"empirical_epsilon_{other}_null"] = (
        epsilon_lib.empirical_epsilon(
            inserted, delta, d, held_out if have_held_out else None,
            other).epsilon)
  return report


def run_audit(experiment: Experiment, workdir: str, num_canaries: int,
              num_held_out: int, seed: int, delta: float | None = None,
              clip_norm: float | None = None, null: str = "theoretical",
              show_progress: bool = False) -> dict[str, Any]:
  """Trains ``experiment`` with canaries and estimates its empirical epsilon.

  Adds the canaries (:func:`~fedjax_lab.audit.canaries.add_canaries`),
  runs :func:`fedjax_lab.training.loop.run_experiment` in ``workdir`` (its
  usual files, including ``final_state.npz``), reloads the final server
  state, recomputes ``theta_0`` exactly as the loop draws it
  (``model.init(fold_in(key(config.seed), 0))``) and writes
  ``workdir/audit.json``: :func:`audit_report`'s keys plus ``rounds``,
  canary participation counts, ``accountant_epsilon`` (the run summary's
  ``epsilon``, ``None`` for a non-private run), the mechanism and noise
  multiplier.

  Args:
    experiment: a built experiment (without canaries).
    workdir: a new folder for the run and the report.
    num_canaries: ``k`` inserted canaries.
    num_held_out: ``k'`` never-inserted directions.
    seed: seed of the canary directions.
    delta: ``delta`` of the estimate; default
      :func:`~fedjax_lab.audit.canaries.resolve_delta`.
    clip_norm: canary norm; default
      :func:`~fedjax_lab.audit.canaries.resolve_clip_norm`.
    null: ``"theoretical"`` or ``"held_out"`` (see
      :func:`~fedjax_lab.privacy.empirical_epsilon.empirical_epsilon`).
    show_progress: show the loop's progress bar.

  Returns:
    The report written to ``audit.json`` (strict JSON values).
  """
  delta = canaries_lib.resolve_delta(experiment, delta)
  audited, canaries = canaries_lib.add_canaries(
      experiment, num_canaries, num_held_out, seed, clip_norm=clip_norm)
  summary = loop.run_experiment(audited, workdir, show_progress=show_progress)
  config = audited.config
  initial_params = audited.model.init(
      jax.random.fold_in(jax.random.key(config.seed), 0))
  final_params = loop.load_final_state(
      workdir, audited.algorithm.server_init(initial_params))
  if hasattr(final_params, "params"):  # a non-private run's server state
    final_params = final_params.params
  report = audit_report(initial_params, final_params, canaries, delta, null)
  rounds = int(summary["rounds"])
  # The cohorts the run really drew (a DP run samples with its secret seed).
  participation = canary_participation(
      run_sampler(audited, workdir), canaries, rounds)
  plan = getattr(audited, "privacy", None)
  report.update({
      "accountant_epsilon": summary.get("epsilon"),
      "rounds": rounds,
      "num_real_clients": canaries.num_real_clients,
      "canary_participation": {
          "mean": float(np.mean(participation)),
          "min": int(np.min(participation)),
          "max": int(np.max(participation)),
          "never_sampled": int(np.sum(participation == 0))},
      "mechanism": plan.mechanism if plan is not None else "none",
      "noise_multiplier": plan.noise_multiplier if plan is not None else 0.0,
      "algorithm": audited.algorithm.name,
      "dataset": audited.dataset.name,
      "final_eval_accuracy": summary.get("final_eval_accuracy"),
      "stopped_early": summary.get("stopped_early"),
  })
  report = to_json(report)
  metrics_io.write_json(os.path.join(workdir, AUDIT_FILE), report)
  return report


def to_json(obj: Any) -> Any:
  """``obj`` as strict-JSON values: numpy scalars become Python numbers and
  non-finite floats strings (``"inf"``)."""
  if isinstance(obj, dict):
    return {str(k): to_json(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, np.integer):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    value = float(obj)
    return value if math.isfinite(value) else str(value)
  return obj
