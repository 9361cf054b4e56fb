"""FedProx: FedAvg with a proximal term and tolerance for partial local work.

Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith 2020, "Federated Optimization in
Heterogeneous Networks", MLSys.

Each client of a round minimises its loss plus ``(mu / 2) * ||w - w_t||^2``
around the broadcast global model ``w_t``. Every local step therefore adds the
proximal gradient ``mu * (w - w_t)`` to the loss gradient before the client
optimizer sees it (with ``optax.sgd`` this is the paper's local solver). With
``mu = 0`` and no stragglers the round is exactly FedAvg's. The server side
(delta aggregation, FedOpt server step) is FedOpt's.

Systems heterogeneity (paper Sec. 5.2): each round a fraction of the clients
are stragglers that only manage a random number of local steps, uniform in
``[straggler_min_steps, N)`` where ``N`` is the client's full number of local
steps this round. FedProx aggregates the stragglers' partial updates; FedAvg
as run in the paper drops them (``drop_stragglers=True``).

Engine mapping of stragglers: whether a client straggles is drawn in
``client_init`` from the client's own key (``fold_in(round_key, client)``), so
it is deterministic and independent of the client's slot in the cohort. The
client's ``N`` is not known when local training starts (``client_init`` sees
no data), so the truncation point is drawn online by reservoir sampling: the
carry keeps a frozen copy of the local model. Before local step ``t + 1`` the
state after ``t >= straggler_min_steps`` steps replaces that copy with
probability ``1 / (t - straggler_min_steps + 1)``; after the last step the
copy is the state after ``k`` steps with ``k`` uniform over
``[straggler_min_steps, N)``, and from step ``k`` on the copy stays unchanged,
as if the later steps were skipped. A selected client with
``N <= straggler_min_steps`` has nothing to cut and does its full work; it does
not count as a straggler. The engine makes padded (all-masked) steps no-ops,
so they neither count as steps nor touch the copy.

Adaptive ``mu`` (paper Appendix C.3.3; pfl-research's ``AdaptMuOnMetricCallback``
implements the same rule): after every round the server compares the
round's mean client training loss with the previous round's; a rise adds
``step_size`` to ``mu``, and ``decrease_after`` consecutive decreases
subtract ``step_size`` (then the count restarts), ``mu`` kept in
``[min_mu, max_mu]``. ``mu`` then lives in the server state and is broadcast.
The rule reads the clients' un-noised training loss, so it is not a DP
release: configs refuse it together with a privacy mechanism.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms import fedavg
from fedjax_lab.algorithms import local
from fedjax_lab.algorithms import recipe
from fedjax_lab.models import base as model_base

# Folded into a client's key for its straggler draws (training keeps the key
# itself, so with no stragglers local training is bit-identical to FedAvg's).
_STRAGGLER_RNG_TAG = 0x5EED


class Snapshot(NamedTuple):
  """A straggler's local training frozen after ``num_steps`` steps."""

  params: base.PyTree
  loss_sum: jax.Array
  loss_weight: jax.Array
  num_steps: jax.Array


class StragglerCarry(NamedTuple):
  """Straggler bookkeeping during local training.

  Attributes:
    selected: whether this client is a straggler this round.
    rng: key for the reservoir draws (folded with the step count).
    snapshot: the local state at the truncation point chosen so far.
    has_snapshot: whether a truncation point exists (``N >
      straggler_min_steps`` so far).
  """

  selected: jax.Array
  rng: jax.Array
  snapshot: Snapshot
  has_snapshot: jax.Array


class ProxCarry(NamedTuple):
  """Per-client state during FedProx's local training.

  Attributes:
    local: the live local training state (FedAvg's carry).
    global_params: the broadcast model ``w_t`` the proximal term pulls to.
    num_steps: local steps taken (steps with at least one real example).
    straggler: a :class:`StragglerCarry`, or ``()`` without stragglers.
    mu: this round's proximal coefficient.
  """

  local: local.LocalCarry
  global_params: base.PyTree
  num_steps: jax.Array
  straggler: StragglerCarry | tuple
  mu: jax.Array


@dataclasses.dataclass(frozen=True)
class AdaptiveMu:
  """The adaptive-``mu`` rule of Li et al. 2020, Appendix C.3.3.

  Attributes:
    step_size: how much ``mu`` moves per adjustment (paper: 0.1).
    decrease_after: consecutive rounds of decreasing training loss before
      ``mu`` is lowered (paper: 5).
    min_mu: lower bound of ``mu``.
    max_mu: upper bound of ``mu`` (pfl-research caps at 1).
  """

  step_size: float = 0.1
  decrease_after: int = 5
  min_mu: float = 0.0
  max_mu: float = 1.0

  def __post_init__(self):
    if self.step_size <= 0:
      raise ValueError(f"step_size must be > 0, got {self.step_size}.")
    if self.decrease_after < 1:
      raise ValueError(
          f"decrease_after must be >= 1, got {self.decrease_after}.")
    if not 0 <= self.min_mu <= self.max_mu:
      raise ValueError("need 0 <= min_mu <= max_mu, got "
                       f"{self.min_mu}, {self.max_mu}.")


class AdaptiveMuState(NamedTuple):
  """Server-side state of the adaptive-``mu`` rule (in ``ServerState.extra``).

  Attributes:
    mu: the proximal coefficient broadcast next round.
    previous_loss: last round's mean client training loss (inf before any).
    decreases: consecutive rounds whose loss went down since the last change.
  """

  mu: jax.Array
  previous_loss: jax.Array
  decreases: jax.Array


def adapt_mu(rule: AdaptiveMu, state: AdaptiveMuState,
             train_loss: jax.Array) -> AdaptiveMuState:
  """One step of the adaptive-``mu`` rule given this round's training loss."""
  went_down = train_loss < state.previous_loss
  decreases = jnp.where(went_down, state.decreases + 1, 0)
  lower = went_down & (decreases >= rule.decrease_after)
  mu = jnp.where(went_down,
                 jnp.where(lower, state.mu - rule.step_size, state.mu),
                 state.mu + rule.step_size)
  return AdaptiveMuState(
      mu=jnp.clip(mu, rule.min_mu, rule.max_mu).astype(jnp.float32),
      previous_loss=train_loss.astype(jnp.float32),
      decreases=jnp.where(lower, 0, decreases).astype(jnp.int32))


def _where(cond: jax.Array, new: base.PyTree, old: base.PyTree) -> base.PyTree:
  return jax.tree.map(lambda n, o: jnp.where(cond, n, o), new, old)


def fedprox(model: model_base.Model,
            client_optimizer: optax.GradientTransformation,
            server_optimizer: optax.GradientTransformation,
            mu: float,
            weighting: str = "num_examples",
            aggregator: base.Aggregator | None = None,
            straggler_fraction: float = 0.0,
            straggler_min_steps: int = 1,
            drop_stragglers: bool = False,
            adaptive_mu: AdaptiveMu | None = None) -> base.FederatedAlgorithm:
  """FedProx (Li et al., MLSys 2020): proximal local objective, stragglers.

  Args:
    model: the model to train.
    client_optimizer: optax transformation for local steps, fed the gradient
      of ``loss + (mu / 2) * ||w - w_t||^2`` (re-initialised every round).
    server_optimizer: optax transformation applied to ``-(aggregate of client
      deltas)``, as in FedOpt; ``optax.sgd(1.0)`` is the paper's server.
    mu: proximal coefficient (``>= 0``; 0 is FedAvg).
    weighting: ``"num_examples"`` or ``"uniform"`` aggregation weights.
    aggregator: how deltas are combined; default weighted mean.
    straggler_fraction: probability, per client and round, that the client is
      a straggler doing only ``k ~ U[straggler_min_steps, N)`` of its ``N``
      local steps (paper Sec. 5.2; 0 disables stragglers).
    straggler_min_steps: fewest local steps a straggler does (``>= 1``).
    drop_stragglers: give stragglers' updates zero weight and a zero delta
      (FedAvg's treatment in the paper) instead of aggregating their partial
      work. The zero delta keeps them out of aggregators that reset weights
      (e.g. DP ones).
    adaptive_mu: adapt ``mu`` (starting from ``mu``) with this rule after
      every round; ``None`` keeps ``mu`` fixed.

  Returns:
    The algorithm. Client metrics: ``train_loss`` (over the steps actually
    taken), ``straggler`` (fraction of clients whose work was cut) and
    ``local_steps`` (mean local steps actually taken); with ``adaptive_mu``
    the server metric ``mu`` (the value for the next round).
  """
  if mu < 0:
    raise ValueError(f"mu must be >= 0, got {mu}.")
  if not 0.0 <= straggler_fraction <= 1.0:
    raise ValueError("straggler_fraction must be in [0, 1], got "
                     f"{straggler_fraction}.")
  if straggler_min_steps < 1:
    raise ValueError("straggler_min_steps must be >= 1, got "
                     f"{straggler_min_steps}.")
  with_stragglers = straggler_fraction > 0
  # Server side (init, broadcast, aggregation, server step) is FedOpt's.
  server_side = fedavg.fedopt(model, client_optimizer, server_optimizer,
                              weighting, aggregator, name="fedprox")

  if adaptive_mu is None:
    broadcast = server_side.broadcast
    split_broadcast = lambda b: (b, mu)
  else:
    broadcast = lambda state: (state.params, state.extra.mu)
    split_broadcast = lambda b: b

  def server_init(params):
    state = server_side.server_init(params)
    if adaptive_mu is None:
      return state
    return state._replace(extra=AdaptiveMuState(
        mu=jnp.asarray(mu, jnp.float32),
        previous_loss=jnp.asarray(jnp.inf, jnp.float32),
        decreases=jnp.zeros([], jnp.int32)))

  def server_update(state, aggregate, client_metrics=None):
    new_state, metrics = server_side.server_update(state, aggregate)
    if adaptive_mu is None:
      return new_state, metrics
    extra = adapt_mu(adaptive_mu, state.extra, client_metrics["train_loss"])
    return new_state._replace(extra=extra), {**metrics, "mu": extra.mu}

  def client_init(broadcast_value, client_state, rng):
    del client_state
    global_params, round_mu = split_broadcast(broadcast_value)
    zero = jnp.zeros([], jnp.float32)
    no_steps = jnp.zeros([], jnp.int32)
    local_carry = local.local_init(client_optimizer, global_params, rng)
    straggler = ()
    if with_stragglers:
      select_rng, reservoir_rng = jax.random.split(
          jax.random.fold_in(rng, _STRAGGLER_RNG_TAG))
      straggler = StragglerCarry(
          selected=jax.random.uniform(select_rng) < straggler_fraction,
          rng=reservoir_rng,
          snapshot=Snapshot(global_params, zero, zero, no_steps),
          has_snapshot=jnp.zeros([], bool))
    return ProxCarry(local_carry, global_params, no_steps, straggler,
                     jnp.asarray(round_mu, jnp.float32))

  def offer_snapshot(carry):
    """Reservoir step: the state before this step may become the cut point."""
    straggler, live, steps = carry.straggler, carry.local, carry.num_steps
    candidates = (steps - straggler_min_steps + 1).astype(jnp.float32)
    u = jax.random.uniform(jax.random.fold_in(straggler.rng, steps))
    take = straggler.selected & (candidates >= 1) & (u * candidates < 1.0)
    current = Snapshot(live.params, live.loss_sum, live.loss_weight, steps)
    return straggler._replace(
        snapshot=_where(take, current, straggler.snapshot),
        has_snapshot=straggler.has_snapshot | take)

  def client_step(carry, batch, mask):
    straggler = offer_snapshot(carry) if with_stragglers else ()
    live = carry.local
    rng, step_rng = jax.random.split(live.rng)
    grads, loss_sum, weight_sum = local.masked_loss_and_grad(
        model, live.params, batch, mask, step_rng)
    if mu or adaptive_mu is not None:  # static: mu = 0 is FedAvg exactly
      grads = jax.tree.map(lambda g, w, w0: g + carry.mu * (w - w0), grads,
                           live.params, carry.global_params)
    updates, opt_state = client_optimizer.update(grads, live.opt_state,
                                                 live.params)
    params = optax.apply_updates(live.params, updates)
    live = local.LocalCarry(params, opt_state, rng, live.loss_sum + loss_sum,
                            live.loss_weight + weight_sum)
    return ProxCarry(live, carry.global_params, carry.num_steps + 1,
                     straggler, carry.mu)

  def client_final(broadcast_value, carry, num_examples):
    global_params, _ = split_broadcast(broadcast_value)
    live = carry.local
    done = Snapshot(live.params, live.loss_sum, live.loss_weight,
                    carry.num_steps)
    cut = jnp.zeros([], bool)
    if with_stragglers:
      cut = carry.straggler.selected & carry.straggler.has_snapshot
      done = _where(cut, carry.straggler.snapshot, done)
    delta = jax.tree.map(jnp.subtract, done.params, global_params)
    weight = local.client_weight(weighting, num_examples)
    if drop_stragglers:
      delta = jax.tree.map(lambda d: jnp.where(cut, jnp.zeros_like(d), d),
                           delta)
      weight = jnp.where(cut, jnp.zeros_like(weight), weight)
    one = jnp.ones([], jnp.float32)
    return base.ClientUpdate(
        delta=delta, weight=weight, client_state=(),
        metrics={"train_loss": (done.loss_sum, done.loss_weight),
                 "straggler": (cut.astype(jnp.float32), one),
                 "local_steps": (done.num_steps.astype(jnp.float32), one)})

  return dataclasses.replace(
      server_side, server_init=server_init, broadcast=broadcast,
      client_init=client_init, client_step=client_step,
      client_final=client_final, server_update=server_update,
      server_update_uses_client_metrics=adaptive_mu is not None)


# ---- recipe ------------------------------------------------------------------

_FACTORY = recipe.keyword_defaults(fedprox)


def from_config(context: recipe.BuildContext, *,
                mu: float = 0.0,
                straggler_fraction: float = _FACTORY["straggler_fraction"],
                straggler_min_steps: int = _FACTORY["straggler_min_steps"],
                drop_stragglers: bool = _FACTORY["drop_stragglers"],
                adaptive_mu: bool = False,
                adaptive_step: float = AdaptiveMu.step_size,
                adaptive_decrease_after: int = AdaptiveMu.decrease_after,
                adaptive_max_mu: float = AdaptiveMu.max_mu
                ) -> base.FederatedAlgorithm:
  """FedProx from the ``fedprox`` config block (keys = these keywords).

  ``mu`` and the straggler keys are :func:`fedprox`'s arguments.
  ``adaptive_mu`` switches on Li et al.'s Appendix C.3.3 rule
  (:class:`AdaptiveMu`): ``mu`` starts at ``mu`` and moves by
  ``adaptive_step``, lowered after ``adaptive_decrease_after`` falling
  losses, capped at ``adaptive_max_mu``; it is refused with DP.
  """
  rule = (AdaptiveMu(step_size=adaptive_step,
                     decrease_after=adaptive_decrease_after,
                     max_mu=adaptive_max_mu) if adaptive_mu else None)
  return fedprox(context.model, context.client_optimizer,
                 context.server_optimizer, mu=mu,
                 weighting=context.weighting, aggregator=context.aggregator,
                 straggler_fraction=straggler_fraction,
                 straggler_min_steps=straggler_min_steps,
                 drop_stragglers=drop_stragglers, adaptive_mu=rule)


def _refuse(context: recipe.BuildContext, mechanism: str) -> str | None:
  if context.options["adaptive_mu"]:
    return ("fedprox.adaptive_mu reads the clients' un-noised training loss "
            "every round, which no DP mechanism accounts for; set "
            "--config.fedprox.adaptive_mu=False with "
            f"privacy.mechanism={mechanism!r}.")
  return None


RECIPE = recipe.Recipe("fedprox", build=from_config, block="fedprox",
                       refuse=_refuse)
