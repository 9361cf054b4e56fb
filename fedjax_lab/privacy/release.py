"""What a DP run may publish: the release policy of metrics and summaries.

A DP guarantee covers what the mechanism releases — the noised aggregate —
and anything computed from it and from public data (post-processing). A
training run computes much more (losses, update norms, the realised cohort,
per-client accuracies), and every such number written to a metrics file, a
TensorBoard log or a summary is a release of private data that the
accountant's epsilon does not cover. So in a DP run every metric is put in one
of four classes and only the first three are written:

* ``public``: a function of the config and public data only (epsilon, delta,
  the noise multiplier, the noise std, the tree step).
* ``privatised``: computed from the noised aggregate (the server update and
  everything it reports: parameter norms, domain weights, the adaptive clip
  norm) or itself noised and accounted (adaptive clipping's noisy unclipped
  fraction, part of the accounted Gaussian mechanism).
* ``evaluation``: the released model scored on the evaluation split. This is
  public only if the evaluation examples are: in the built-in datasets they
  are held-out examples *of the same users* (a per-client split), which
  epsilon does not cover. The privacy report says so; the DP-FL literature
  reports such numbers with that caveat.
* ``diagnostic``: computed from clients' data without noise (training loss,
  update norms, fraction clipped, the realised cohort size and total weight,
  padded shapes that reveal client sizes, wall-clock timings, evaluation on
  the training split, personalization, evaluations that pick a model with a
  client's training data). Not covered by epsilon: withheld unless
  ``privacy.release_diagnostics=True``, and then written as
  ``diagnostic/<name>`` in every sink and the summary.

Classification is fail-safe: a metric the policy does not know is a
diagnostic. Round metrics are classified by where the engine computed them
(:data:`fedjax_lab.engine.round.ORIGINS`, passed in as strings): anything the
clients or the per-client transform report is a diagnostic, anything the
server update reports is privatised (the engine and the config checks ensure
the server update sees only the aggregate in a DP run), and the aggregator's
own metrics are classified by name below.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

PUBLIC = "public"
PRIVATISED = "privatised"
EVALUATION = "evaluation"
DIAGNOSTIC = "diagnostic"
CLASSES = (PUBLIC, PRIVATISED, EVALUATION, DIAGNOSTIC)
DIAGNOSTIC_PREFIX = "diagnostic/"

# Round-record keys the runner adds beside the compiled round's metrics.
_HOST_KEYS = {
    "round": PUBLIC, "epsilon": PUBLIC, "delta": PUBLIC,
    "noise_multiplier": PUBLIC, "accounted_cohort_size": PUBLIC,
    "tree_step": PUBLIC, "dp_noise_std": PUBLIC, "dp_noise_std_on_mean": PUBLIC,
    "noise_seeded": PUBLIC,
    # Sizes of the padded cohort arrays: the largest sampled client's number
    # of steps and the realised (bucketed) cohort size.
    "cohort_padded_size": DIAGNOSTIC, "local_steps_padded": DIAGNOSTIC,
    # Wall-clock time of a round grows with the cohort's data.
    "seconds": DIAGNOSTIC, "host_prepare_seconds": DIAGNOSTIC,
    "host_wait_seconds": DIAGNOSTIC,
}
# Metrics of DP aggregators' finalize steps that may be released; every other
# aggregator metric (e.g. the norm of the un-noised clipped sum and the
# signal-to-noise ratio computed from it) is a diagnostic.
_AGGREGATOR_KEYS = {
    "dp_noise_std": PUBLIC, "dp_noise_std_on_mean": PUBLIC,
    "update_noise_multiplier": PUBLIC, "tree_step": PUBLIC,
    "clip_norm": PRIVATISED, "unclipped_fraction_noisy": PRIVATISED,
}
_ORIGIN_CLASS = {"client": DIAGNOSTIC, "client_transform": DIAGNOSTIC,
                 "server": PRIVATISED}
_ENGINE_KEYS = {"params_finite": PRIVATISED,  # of the released parameters
                "num_clients": DIAGNOSTIC, "total_weight": DIAGNOSTIC}
# Summary keys (beside final_eval_*, classified as evaluations).
_SUMMARY_KEYS = {
    "rounds": PUBLIC, "stopped_early": PUBLIC, "resumed_from_round": PUBLIC,
    "algorithm": PUBLIC, "dataset": PUBLIC, "model": PUBLIC,
    "strategy": PUBLIC, "devices": PUBLIC, "workdir": PUBLIC,
    "epsilon": PUBLIC, "delta": PUBLIC, "privacy": PUBLIC,
    "seconds": DIAGNOSTIC, "compilations": DIAGNOSTIC,
    "personalization": DIAGNOSTIC,
    # Which step loop ran depends on the padded step count (data sizes).
    "strategy_effective": DIAGNOSTIC,
}


@dataclasses.dataclass
class ReleasePolicy:
  """Filters a run's records and summary down to what it may publish.

  Attributes:
    private: a DP run. When False every record passes unchanged.
    release_diagnostics: also write diagnostics (as ``diagnostic/<name>``).
    evaluation_reads_train_data: the run's evaluation uses clients' training
      data (HypCluster picks each client's cluster with it), so its
      ``eval_*`` metrics are diagnostics too.
  """

  private: bool
  release_diagnostics: bool = False
  evaluation_reads_train_data: bool = False
  # name -> class of everything seen so far (for the summary's report).
  seen: dict[str, str] = dataclasses.field(default_factory=dict)

  def classify(self, name: str, origin: str | None = None) -> str:
    """The class (:data:`CLASSES`) of round metric ``name`` computed at
    ``origin`` (an engine origin, or None for keys the runner adds)."""
    if name.startswith(("train_eval_", "personalization_")):
      return DIAGNOSTIC
    if name.startswith("eval_") or name.startswith("final_eval_"):
      return DIAGNOSTIC if self.evaluation_reads_train_data else EVALUATION
    if origin == "aggregator":
      return _AGGREGATOR_KEYS.get(name, DIAGNOSTIC)
    if origin == "engine":
      return _ENGINE_KEYS.get(name, DIAGNOSTIC)
    if origin in _ORIGIN_CLASS:
      return _ORIGIN_CLASS[origin]
    return _HOST_KEYS.get(name, DIAGNOSTIC)

  def _filter(self, items: Mapping[str, Any], classify) -> dict[str, Any]:
    if not self.private:
      return dict(items)
    out = {}
    for name, value in items.items():
      kind = classify(name)
      self.seen[name] = kind
      if kind != DIAGNOSTIC:
        out[name] = value
      elif self.release_diagnostics:
        out[DIAGNOSTIC_PREFIX + name] = value
    return out

  def release_record(self, record: Mapping[str, Any],
                     origins: Mapping[str, str]) -> dict[str, Any]:
    """The part of one round's record the run may write (all of it when not
    private); ``origins`` is the round function's ``metric_origins()``."""
    return self._filter(record,
                        lambda name: self.classify(name, origins.get(name)))

  def release_summary(self, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The part of the run summary the run may write."""
    def classify(name):
      if name.startswith("final_eval_"):
        return self.classify(name)
      return _SUMMARY_KEYS.get(name, DIAGNOSTIC)
    return self._filter(summary, classify)

  def describe(self) -> dict[str, Any]:
    """For the summary: which names were released in which class, and which
    were withheld (or written as labelled diagnostics)."""
    by_class: dict[str, list[str]] = {kind: [] for kind in CLASSES}
    for name, kind in sorted(self.seen.items()):
      by_class[kind].append(name)
    diagnostics = by_class.pop(DIAGNOSTIC)
    out = {"released": {k: v for k, v in by_class.items() if v}}
    if self.release_diagnostics:
      out["diagnostics_released_not_private"] = diagnostics
    else:
      out["withheld"] = diagnostics
    return out
