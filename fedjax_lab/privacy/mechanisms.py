"""From a resolved privacy plan to what runs it: the aggregation chain (the
DP link, with clip and compression links before it) and DP-FTRL's server
optimizer.

The plan (:class:`fedjax_lab.privacy.plan.PrivacyPlan`) says which mechanism
and which noise; this module turns it into links of
:func:`fedjax_lab.algorithms.base.chain`:

* ``gaussian``: :func:`~fedjax_lab.privacy.aggregators.gaussian_sum`
  (McMahan et al. 2018, DP-FedAvg);
* ``adaptive``: :func:`~fedjax_lab.privacy.aggregators.adaptive_clipping`
  (Andrew et al. 2021);
* ``tree``: :func:`~fedjax_lab.privacy.tree.tree_aggregator` (Kairouz et al.
  2021, DP-FTRL) and SGD as the server optimizer;
* ``local``: :func:`~fedjax_lab.privacy.aggregators.local_gaussian`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import jax
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.privacy import aggregators
from fedjax_lab.privacy import clipping
from fedjax_lab.privacy import refusals
from fedjax_lab.privacy import tree

if TYPE_CHECKING:
  from fedjax_lab.privacy.plan import PrivacyPlan


def build_aggregator(plan: PrivacyPlan | None,
                     compress: base.Transform | None = None
                     ) -> base.Aggregator | base.Transform:
  """The aggregation implementing ``plan`` inside the compiled round.

  Without ``compress`` it is the plan's DP link (``plan`` must be given).
  With a compression link (``algorithms.compression.compress``) it is the
  chain ``clip(C) -> compress -> DP link`` for a fixed clip norm
  (``gaussian``, ``tree``), ``compress -> DP link`` for ``adaptive`` (its
  clip norm moves), ``compress -> weighted mean`` without DP (``plan`` None);
  ``local`` is refused (:mod:`fedjax_lab.privacy.refusals`).

  The plan's numbers (clip norm, noise multiplier, the ``adaptive`` block's
  values) may be traced: a sweep member's hyperparameters inside the member
  round (:mod:`fedjax_lab.engine.members`), e.g. ``dataclasses.replace`` of
  a concrete plan with tracers; every member's concrete plan must have been
  built (and so checked) first.
  """
  if compress is None:
    return _dp_link(plan)
  if plan is None:
    return base.chain(compress, base.weighted_mean())
  reason = refusals.first_refusal(refusals.Setting(
      mechanism=plan.mechanism, compression="compressed"), scopes=("config",))
  if reason is not None:
    raise ValueError(reason)
  if plan.mechanism in ("gaussian", "tree"):
    return base.chain(clipping.clip(plan.clip_norm), compress,
                      _dp_link(plan))
  return base.chain(compress, _dp_link(plan))


def _dp_link(plan: PrivacyPlan) -> base.Aggregator:
  """The plan's DP link: clip, sum with weight 1, noise, fixed denominator."""
  if plan is None:
    raise ValueError("a DP link needs a privacy plan (None: no DP; pass a "
                     "compression link for a plain weighted mean chain).")
  noise_cohort = (plan.noise_cohort_size if not math.isclose(
      plan.noise_cohort_size, plan.simulated_cohort_size) else 0)
  if plan.mechanism == "gaussian":
    return aggregators.gaussian_sum(plan.clip_norm, plan.noise_multiplier,
                                    plan.simulated_cohort_size, noise_cohort)
  if plan.mechanism == "adaptive":
    # The block's keys are the factory's keyword arguments; a key the block
    # lacks takes the factory's default (defaults live in its signature).
    adaptive = dict(plan.settings.get("adaptive", {}))
    return aggregators.adaptive_clipping(
        plan.clip_norm, plan.noise_multiplier, plan.simulated_cohort_size,
        noise_cohort_size=noise_cohort, **adaptive)
  if plan.mechanism == "tree":
    # DP-FTRL: clipped mean plus the increment of the tree's prefix-sum
    # noise; the server optimizer is plain SGD (with momentum) on it.
    return tree.tree_aggregator(
        plan.clip_norm, plan.noise_multiplier, plan.simulated_cohort_size,
        plan.spec.rounds_per_tree or plan.spec.rounds_per_epoch)
  if plan.mechanism == "local":
    return aggregators.local_gaussian(plan.clip_norm, plan.noise_multiplier)
  raise ValueError(f"no aggregator for mechanism {plan.mechanism!r}")


def build_ftrl_server_optimizer(plan: PrivacyPlan, learning_rate: float
                                ) -> optax.GradientTransformation:
  """DP-FTRL's server optimizer for ``plan`` (mechanism ``"tree"``): SGD
  with ``privacy.ftrl.momentum`` (DP-FTRLM) on the noisy increments of the
  tree's prefix sums that :func:`fedjax_lab.privacy.tree.tree_aggregator`
  releases; momentum carries over tree restarts, as in Kairouz et al.
  2021.

  A traced momentum (sweep members) always keeps optax's momentum trace (a
  member with momentum 0 then steps exactly as plain SGD does); a concrete
  0 keeps plain SGD's state (no trace)."""
  momentum = plan.settings.get("ftrl", {}).get("momentum", 0.0)
  if isinstance(momentum, jax.core.Tracer):
    return optax.sgd(learning_rate, momentum=momentum)
  return optax.sgd(learning_rate, momentum=momentum or None)
