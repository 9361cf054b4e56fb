"""The privacy side of a run: its secret seed, what it releases, its report.

The round loop (:mod:`fedjax_lab.training.loop`) asks this module three
things. Which seed keys the DP noise and the cohort sampling (a secret drawn
at the start, or restored from the checkpoint on resume:
:mod:`fedjax_lab.privacy.secret_seed`). Which of a round's metrics, and of
the summary, it may write (:mod:`fedjax_lab.privacy.release`). And what to
tell the user about the guarantee: the privacy report printed at the start
and written into ``summary.json``.

A non-private run has a :class:`PrivacyRun` too, whose policy releases
everything and which adds nothing to the records.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax

from fedjax_lab.privacy import accounting
from fedjax_lab.privacy import plan as privacy_plan
from fedjax_lab.privacy import release
from fedjax_lab.privacy import secret_seed

# The key of the secret seed in a checkpoint's JSON record.
SEED_RECORD_KEY = "noise_seed"


class MissingSecretError(ValueError):
  """A DP checkpoint without its noise seed (written before seeds were
  secret): resuming it could not reproduce its noise."""


@dataclasses.dataclass
class PrivacyRun:
  """One run's privacy state (host side).

  Attributes:
    plan: the resolved DP plan, or None for a non-private run.
    policy: what the run may write.
    seed: the seed of the DP noise and cohort sampling (None when not
      private). Never written outside the checkpoint.
    accountant: composes epsilon every round (None when not private).
  """

  plan: privacy_plan.PrivacyPlan | None
  policy: release.ReleasePolicy
  seed: int | None = None
  accountant: accounting.RoundAccountant | None = None

  @classmethod
  def start(cls, plan: privacy_plan.PrivacyPlan | None, *,
            evaluation_reads_train_data: bool,
            checkpoint_record: dict[str, Any] | None,
            accountant: accounting.RoundAccountant | None = None
            ) -> "PrivacyRun":
    """The run's privacy state: a fresh secret seed for a new run, the
    checkpoint's seed for a resumed one (``checkpoint_record`` not None).
    ``accountant`` (built from the plan when None) is reused if the caller
    already has one.

    Raises:
      MissingSecretError: a resumed DP checkpoint holds no seed.
    """
    if plan is None:
      return cls(plan=None, policy=release.ReleasePolicy(private=False))
    if checkpoint_record is not None:
      if SEED_RECORD_KEY not in checkpoint_record:
        raise MissingSecretError(
            "this DP run's checkpoint has no noise seed (it was written by a "
            "version whose noise derived from config.seed, so anyone could "
            "regenerate it); it cannot be resumed as a private run. Pass a "
            "new --workdir.")
      seed = int(checkpoint_record[SEED_RECORD_KEY])
    else:
      seed, _ = secret_seed.resolve_seed(plan.noise_seed)
    policy = release.ReleasePolicy(
        private=True, release_diagnostics=plan.release_diagnostics,
        evaluation_reads_train_data=evaluation_reads_train_data)
    return cls(plan=plan, policy=policy, seed=seed,
               accountant=accountant or accounting.RoundAccountant(
                   plan.spec, plan.delta))

  @property
  def private(self) -> bool:
    return self.plan is not None

  def noise_key(self) -> jax.Array | None:
    """The base key of the round's DP noise (None when not private)."""
    return None if self.seed is None else secret_seed.noise_key(self.seed)

  def sampling_seed(self, public_seed: int) -> int:
    """The cohort sampler's seed: secret in a DP run, else ``public_seed``."""
    if self.seed is None:
      return public_seed
    return secret_seed.sampling_seed(self.seed)

  def checkpoint_fields(self) -> dict[str, Any]:
    """What the checkpoint's record must hold to resume this run exactly."""
    return {} if self.seed is None else {SEED_RECORD_KEY: self.seed}

  def round_metrics(self, round_index: int) -> dict[str, float]:
    """Host-side privacy metrics of 0-based round ``round_index``."""
    if not self.private:
      return {}
    plan = self.plan
    out = {"epsilon": self.accountant.epsilon(round_index + 1),
           "delta": plan.delta, "noise_multiplier": plan.noise_multiplier,
           **plan.round_metrics(round_index)}
    if plan.noise_seeded:
      out["noise_seeded"] = 1.0
    return out

  def release_record(self, record: dict[str, Any],
                     origins: dict[str, str]) -> dict[str, Any]:
    """The part of a round's record the run may write."""
    return self.policy.release_record(record, origins)

  def show_training_loss(self) -> bool:
    """Whether the progress bar may show the (un-noised) training loss."""
    return not self.private or self.plan.release_diagnostics

  def summary_fields(self, rounds_done: int) -> dict[str, Any]:
    """``epsilon``, ``delta`` and the ``privacy`` report for the summary."""
    if not self.private:
      return {}
    plan = self.plan
    report = plan.describe()
    epsilon = self.accountant.epsilon(rounds_done)
    if plan.hypothetical:
      report["epsilon_simulated_run"] = plan.epsilon_simulated_run(
          rounds_done)
    if epsilon > privacy_plan.EPSILON_WARN_ABOVE:
      report["warnings"].append(
          f"epsilon={epsilon:.4g} > {privacy_plan.EPSILON_WARN_ABOVE:g}: a "
          "weak guarantee (the bound on how much more likely any output "
          f"becomes is e^{epsilon:.3g}).")
    return {"epsilon": epsilon, "delta": plan.delta, "privacy": report}

  def release_summary(self, summary: dict[str, Any]) -> dict[str, Any]:
    """The part of the summary the run may write; a DP run's ``privacy``
    report then lists what was released and withheld (records and
    summary)."""
    out = self.policy.release_summary(summary)
    if self.private and "privacy" in out:
      out["privacy"]["release"] = self.policy.describe()
    return out

  def report(self, num_rounds: int) -> str:
    """The privacy report printed when the run starts (several lines)."""
    if not self.private:
      return ""
    plan = self.plan
    info = plan.describe()
    spec = plan.spec
    sampled = (f"Poisson q={spec.sampling_rate:.4g}" if
               spec.sampling == "poisson" else
               f"{spec.sampling} cohorts of {spec.cohort_size}")
    lines = [
        f"privacy: {plan.mechanism} mechanism, user-level DP under "
        f"{info['neighboring_relation']}",
        f"privacy: {spec.accountant.upper()} accountant, population "
        f"{spec.population}, {sampled}, z={plan.noise_multiplier:.4g}"
        f"{' (calibrated)' if plan.calibrated else ''}, clip "
        f"{plan.clip_norm:g}, delta={plan.delta:.3g} ({info['delta_chosen']})",
        f"privacy: epsilon after {num_rounds} rounds would be "
        f"{self.accountant.epsilon(num_rounds):.4g}"
        + (f"; target {plan.target_epsilon:g} stops training before it is "
           "exceeded" if plan.target_epsilon else ""),
        f"privacy: noise {info['noise']}",
        "privacy: released: epsilon, the noised model and what is computed "
        "from it, evaluation on the eval split; "
        + ("diagnostics (training loss, update norms, cohort size, timings) "
           "are WRITTEN as diagnostic/<name> and are NOT private"
           if plan.release_diagnostics else
           "withheld: training loss, update norms, fraction clipped, cohort "
           "size, padded shapes, timings (privacy.release_diagnostics=True "
           "writes them, labelled not private)"),
        f"privacy: evaluation: {info['evaluation']}",
    ]
    if plan.hypothetical:
      lines.append(
          f"privacy: WARNING {info['note']}: "
          f"{plan.epsilon_simulated_run(num_rounds):.4g} after {num_rounds} "
          "rounds at the same delta")
    lines += [f"privacy: WARNING {w}" for w in info["warnings"]]
    return "\n".join(lines)


def resolved_config(config_dict: dict[str, Any],
                    plan: privacy_plan.PrivacyPlan | None) -> dict[str, Any]:
  """``config_dict`` with the privacy block's resolved delta (what
  ``config.json`` records)."""
  if plan is None or "privacy" not in config_dict:
    return config_dict
  out = json.loads(json.dumps(config_dict))
  out["privacy"]["delta"] = plan.delta
  return out
