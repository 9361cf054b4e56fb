"""FedProx (Li et al., MLSys 2020): proximal steps and simulated stragglers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg
from fedjax_lab.algorithms import fedprox
from fedjax_lab.engine.round import build_round
from fedjax_lab.engine.strategy import Strategy

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(11)


@functools.lru_cache(maxsize=None)
def _round_fn(algorithm, strategy):
  return build_round(algorithm, strategy, donate=False)


def _run(algorithm, params, cohort, strategy=Strategy(), rounds=1, rng=RNG):
  fn = _round_fn(algorithm, strategy)
  state = algorithm.server_init(params)
  num = cohort["client_mask"].shape[0]
  metrics = None
  for _ in range(rounds):
    state, _, metrics = fn(state, cohort, jnp.zeros([num]), rng)
  return state, {k: float(v) for k, v in metrics.items()}


def _assert_trees_close(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                               rtol=1e-5)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _single(clients, i, batch_size, num_steps):
  """Client ``i`` alone (same rng as in any cohort), padded to ``num_steps``."""
  return build_cohort(clients, [i], batch_size, num_steps=num_steps)


@pytest.mark.parametrize("strategy", [Strategy("vmap", "scan"),
                                      Strategy("map", "unroll")],
                         ids=lambda s: s.label)
def test_mu_zero_is_fedavg(tiny_model, strategy):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(8)
  cohort = build_cohort(clients, [0, 3, 4, 7], batch_size=3, pad_clients=1)
  ref, ref_metrics = _run(fedavg.fedavg(tiny_model, optax.sgd(0.1)), params,
                          cohort, strategy, rounds=2)
  prox, metrics = _run(
      fedprox.fedprox(tiny_model, optax.sgd(0.1), optax.sgd(1.0), mu=0.0),
      params, cohort, strategy, rounds=2)
  for x, y in zip(jax.tree.leaves(ref.params), jax.tree.leaves(prox.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert metrics["train_loss"] == ref_metrics["train_loss"]
  assert metrics["straggler"] == 0.0
  steps = [-(-len(clients[i][1]) // 3) for i in [0, 3, 4, 7]]
  assert metrics["local_steps"] == pytest.approx(np.mean(steps))


def test_proximal_term_keeps_local_models_closer(deterministic_model):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  clients = make_clients(4, min_size=10, max_size=12)
  avg = fedavg.fedavg(model, optax.sgd(0.5))
  prox = fedprox.fedprox(model, optax.sgd(0.5), optax.sgd(1.0), mu=1.0)
  for i in range(4):
    cohort = _single(clients, i, 2, num_steps=6)  # 5-6 real steps
    _, m_avg = _run(avg, params, cohort)
    _, m_prox = _run(prox, params, cohort)
    assert 0 < m_prox["aggregate_delta_norm"] < m_avg["aggregate_delta_norm"]


def _loss_fn(model, batch):
  def loss(p):
    logits = model.apply(p, batch, None, False)
    return jnp.mean(model.example_loss(logits, batch)[0])
  return loss


def test_one_step_equals_fedavg_step(deterministic_model):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  clients = make_clients(1, min_size=5, max_size=5)
  cohort = build_cohort(clients, [0], batch_size=5)
  prox, _ = _run(fedprox.fedprox(model, optax.sgd(0.3), optax.sgd(1.0),
                                 mu=2.0), params, cohort)
  batch = {"x": jnp.asarray(clients[0][0]), "y": jnp.asarray(clients[0][1])}
  # mu * (w0 - w0) = 0: the first step is plain SGD.
  expected = jax.tree.map(lambda p, g: p - 0.3 * g, params,
                          jax.grad(_loss_fn(model, batch))(params))
  _assert_trees_close(prox.params, expected)


def test_second_step_includes_proximal_gradient(deterministic_model):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  clients = make_clients(1, min_size=10, max_size=10)
  cohort = build_cohort(clients, [0], batch_size=5)
  lr, mu = 0.3, 2.0
  prox, _ = _run(fedprox.fedprox(model, optax.sgd(lr), optax.sgd(1.0), mu=mu),
                 params, cohort)
  x, y = jnp.asarray(clients[0][0]), jnp.asarray(clients[0][1])
  loss0 = _loss_fn(model, {"x": x[:5], "y": y[:5]})
  loss1 = _loss_fn(model, {"x": x[5:], "y": y[5:]})
  w1 = jax.tree.map(lambda p, g: p - lr * g, params, jax.grad(loss0)(params))
  w2 = jax.tree.map(lambda w, g, w0: w - lr * (g + mu * (w - w0)), w1,
                    jax.grad(loss1)(w1), params)
  _assert_trees_close(prox.params, w2)
  # And the proximal pull is really there: FedAvg's second step differs.
  w2_avg = jax.tree.map(lambda w, g: w - lr * g, w1, jax.grad(loss1)(w1))
  assert _max_diff(w2, w2_avg) > 1e-4


def test_stragglers_do_fewer_steps(deterministic_model):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  clients = make_clients(5, min_size=6, max_size=12)
  full = fedprox.fedprox(model, optax.sgd(0.2), optax.sgd(1.0), mu=0.1)
  slow = fedprox.fedprox(model, optax.sgd(0.2), optax.sgd(1.0), mu=0.1,
                         straggler_fraction=1.0, straggler_min_steps=1)
  for i in range(5):
    cohort = _single(clients, i, 2, num_steps=6)
    num_steps = -(-len(clients[i][1]) // 2)
    full_state, m_full = _run(full, params, cohort)
    slow_state, m_slow = _run(slow, params, cohort)
    assert m_full["local_steps"] == num_steps
    assert m_full["straggler"] == 0.0
    assert 1 <= m_slow["local_steps"] < num_steps
    assert m_slow["straggler"] == 1.0
    assert _max_diff(full_state.params, slow_state.params) > 1e-6
  cohort = build_cohort(clients, range(5), batch_size=2)
  full_state, _ = _run(full, params, cohort)
  slow_state, m_slow = _run(slow, params, cohort)
  assert m_slow["straggler"] == 1.0
  assert _max_diff(full_state.params, slow_state.params) > 1e-6


def _local_steps_and_cut(algorithm, params, clients, i, batch_size, keys):
  """Runs client ``i``'s local training directly, once per key (vmapped)."""
  cohort = build_cohort(clients, [i], batch_size)
  features = jax.tree.map(lambda a: jnp.asarray(a[0]), cohort["features"])
  mask = jnp.asarray(cohort["example_mask"][0])

  def one(key):
    carry = algorithm.client_init(params, (), key)
    for s in range(mask.shape[0]):
      carry = algorithm.client_step(
          carry, jax.tree.map(lambda a, s=s: a[s], features), mask[s])
    update = algorithm.client_final(params, carry,
                                    jnp.asarray(cohort["num_examples"][0]))
    return update.metrics["local_steps"][0], update.metrics["straggler"][0]

  return jax.jit(jax.vmap(one))(keys)


def test_straggler_steps_are_uniform_and_fraction_holds(deterministic_model):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  clients = make_clients(1, min_size=10, max_size=10)  # 5 steps of 2
  keys = jax.random.split(jax.random.key(5), 4000)
  algorithm = fedprox.fedprox(model, optax.sgd(0.1), optax.sgd(1.0), mu=0.1,
                              straggler_fraction=0.3, straggler_min_steps=2)
  steps, cut = _local_steps_and_cut(algorithm, params, clients, 0, 2, keys)
  steps, cut = np.asarray(steps), np.asarray(cut)
  assert abs(cut.mean() - 0.3) < 0.03
  assert np.all(steps[cut == 0] == 5)
  # Stragglers stop after k ~ U{2, 3, 4} steps.
  counts = np.bincount(steps[cut == 1].astype(int), minlength=6)
  assert counts[0] == counts[1] == counts[5] == 0
  np.testing.assert_allclose(counts[2:5] / counts.sum(), 1 / 3, atol=0.04)


def test_short_clients_are_never_cut(deterministic_model):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  clients = make_clients(1, min_size=6, max_size=6)  # 3 steps of 2
  keys = jax.random.split(jax.random.key(6), 64)
  algorithm = fedprox.fedprox(model, optax.sgd(0.1), optax.sgd(1.0), mu=0.1,
                              straggler_fraction=1.0, straggler_min_steps=3)
  steps, cut = _local_steps_and_cut(algorithm, params, clients, 0, 2, keys)
  np.testing.assert_array_equal(np.asarray(steps), 3)
  np.testing.assert_array_equal(np.asarray(cut), 0)


@pytest.mark.parametrize("weighting", ["num_examples", "uniform"])
def test_dropping_every_straggler_leaves_params_unchanged(deterministic_model,
                                                          weighting):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  clients = make_clients(4, min_size=5, max_size=12)
  algorithm = fedprox.fedprox(model, optax.sgd(0.2), optax.sgd(1.0), mu=0.1,
                              weighting=weighting, straggler_fraction=1.0,
                              drop_stragglers=True)
  state, metrics = _run(algorithm, params,
                        build_cohort(clients, range(4), 2, pad_clients=1))
  for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert metrics["total_weight"] == 0.0
  assert metrics["aggregate_delta_norm"] == 0.0
  assert metrics["params_finite"] == 1.0
  assert metrics["straggler"] == 1.0


def test_dropping_stragglers_keeps_the_others(deterministic_model):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  # Clients 0-1 have one local step (nothing to cut), 2-3 have several.
  clients = (make_clients(2, seed=1, min_size=2, max_size=4)
             + make_clients(2, seed=2, min_size=8, max_size=10))
  dropping = fedprox.fedprox(model, optax.sgd(0.2), optax.sgd(1.0), mu=0.5,
                             straggler_fraction=1.0, drop_stragglers=True)
  plain = fedprox.fedprox(model, optax.sgd(0.2), optax.sgd(1.0), mu=0.5)
  state, metrics = _run(dropping, params, build_cohort(clients, range(4), 4))
  expected, _ = _run(plain, params, build_cohort(clients, [0, 1], 4))
  _assert_trees_close(state.params, expected)
  assert metrics["straggler"] == 0.5


def test_stragglers_are_deterministic_and_padding_is_a_no_op(tiny_model):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(8, min_size=4, max_size=12)
  algorithm = fedprox.fedprox(tiny_model, optax.sgd(0.1), optax.adam(0.01),
                              mu=0.3, straggler_fraction=0.5)
  plain = build_cohort(clients, [0, 2, 5, 6], batch_size=2)
  padded = build_cohort(clients, [0, 2, 5, 6], batch_size=2, pad_clients=3,
                        extra_steps=2)
  state_a, m_a = _run(algorithm, params, plain, rounds=2)
  state_b, m_b = _run(algorithm, params, plain, rounds=2)
  for x, y in zip(jax.tree.leaves(state_a.params),
                  jax.tree.leaves(state_b.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert m_a == m_b
  assert 0.0 < m_a["straggler"] and m_a["local_steps"] > 1.0
  for strategy in (Strategy("vmap", "scan"), Strategy("chunked", "unroll", 2),
                   Strategy("vmap", "host")):
    state_p, m_p = _run(algorithm, params, padded, strategy, rounds=2)
    _assert_trees_close(state_a.params, state_p.params, atol=1e-5)
    for key in ("train_loss", "straggler", "local_steps"):
      assert m_p[key] == pytest.approx(m_a[key], rel=1e-5), key
  assert m_p["num_clients"] == 4
  # Another run key gives other straggler draws.
  draws = {tuple(_run(algorithm, params, plain, rng=jax.random.key(k))[1][
      key] for key in ("straggler", "local_steps")) for k in range(6)}
  assert len(draws) > 1


def test_argument_checks(deterministic_model):
  sgd = optax.sgd(0.1)
  with pytest.raises(ValueError, match="mu"):
    fedprox.fedprox(deterministic_model, sgd, sgd, mu=-1.0)
  with pytest.raises(ValueError, match="straggler_fraction"):
    fedprox.fedprox(deterministic_model, sgd, sgd, mu=0.1,
                    straggler_fraction=1.5)
  with pytest.raises(ValueError, match="straggler_min_steps"):
    fedprox.fedprox(deterministic_model, sgd, sgd, mu=0.1,
                    straggler_min_steps=0)
  with pytest.raises(ValueError, match="weighting"):
    fedprox.fedprox(deterministic_model, sgd, sgd, mu=0.1, weighting="size")


def _rule_by_hand(rule, mu, losses):
  """The Appendix C.3.3 rule in plain Python: mu after each round."""
  previous, decreases, out = float("inf"), 0, []
  for loss in losses:
    if loss < previous:
      decreases += 1
      if decreases >= rule.decrease_after:
        mu, decreases = mu - rule.step_size, 0
    else:
      decreases, mu = 0, mu + rule.step_size
    mu = min(max(mu, rule.min_mu), rule.max_mu)
    previous = loss
    out.append(mu)
  return out


def test_adapt_mu_follows_the_paper_rule():
  rule = fedprox.AdaptiveMu(step_size=0.1, decrease_after=3, max_mu=0.5)
  losses = [2.0, 1.9, 1.8, 1.7, 1.75, 1.6, 1.5, 1.4, 1.3, 1.2, 1.1, 1.0, 1.2,
            1.3, 1.4, 1.5, 1.6, 1.7, 1.8]
  state = fedprox.AdaptiveMuState(jnp.float32(0.1), jnp.float32(jnp.inf),
                                  jnp.int32(0))
  got = []
  for loss in losses:
    state = fedprox.adapt_mu(rule, state, jnp.float32(loss))
    got.append(float(state.mu))
  np.testing.assert_allclose(got, _rule_by_hand(rule, 0.1, losses), atol=1e-6)
  assert max(got) == pytest.approx(0.5)  # capped at max_mu
  assert min(got) == pytest.approx(0.0, abs=1e-6)  # and floored at min_mu


def test_adaptive_mu_through_the_engine(tiny_model):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(8)
  cohort = build_cohort(clients, [0, 3, 4, 7], batch_size=3, pad_clients=1)
  rule = fedprox.AdaptiveMu(step_size=0.25, decrease_after=2)
  adaptive = fedprox.fedprox(tiny_model, optax.sgd(0.1), optax.sgd(1.0),
                             mu=0.5, adaptive_mu=rule)
  fixed = fedprox.fedprox(tiny_model, optax.sgd(0.1), optax.sgd(1.0), mu=0.5)
  assert adaptive.server_update_uses_client_metrics
  # Round 1 trains with the initial mu: identical to fixed mu.
  state, metrics = _run(adaptive, params, cohort)
  ref, _ = _run(fixed, params, cohort)
  _assert_trees_close(state.params, ref.params, atol=1e-7)
  # mu over rounds follows the rule applied to the rounds' train losses.
  fn = _round_fn(adaptive, Strategy())
  state = adaptive.server_init(params)
  losses, mus = [], []
  for _ in range(6):
    state, _, metrics = fn(state, cohort, jnp.zeros([5]), RNG)
    losses.append(float(metrics["train_loss"]))
    mus.append(float(metrics["mu"]))
  np.testing.assert_allclose(mus, _rule_by_hand(rule, 0.5, losses), atol=1e-6)
  assert float(state.extra.mu) == pytest.approx(mus[-1])
  # A changed mu is what the next round trains with: fixed mu at that value
  # from the same state gives the same round.
  pinned = fedprox.fedprox(tiny_model, optax.sgd(0.1), optax.sgd(1.0),
                           mu=mus[-1])
  next_adaptive, _, _ = fn(state, cohort, jnp.zeros([5]), RNG)
  next_pinned, _, _ = _round_fn(pinned, Strategy())(
      state._replace(extra=()), cohort, jnp.zeros([5]), RNG)
  _assert_trees_close(next_adaptive.params, next_pinned.params, atol=1e-6)


def test_adaptive_mu_rejects_bad_rules():
  with pytest.raises(ValueError, match="step_size"):
    fedprox.AdaptiveMu(step_size=0.0)
  with pytest.raises(ValueError, match="decrease_after"):
    fedprox.AdaptiveMu(decrease_after=0)
  with pytest.raises(ValueError, match="min_mu"):
    fedprox.AdaptiveMu(min_mu=2.0, max_mu=1.0)
