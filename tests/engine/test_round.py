"""Invariants of the compiled round: padding, strategies, FedAvg identities."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import base, fedavg
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.round import build_round
from fedjax_lab.engine.strategy import Strategy, parse_strategy

from tests.engine.conftest import build_cohort, make_clients

ALL_STRATEGIES = [
    Strategy("vmap", "scan"), Strategy("vmap", "unroll"),
    Strategy("vmap", "host"), Strategy("map", "scan"),
    Strategy("map", "unroll"), Strategy("chunked", "scan", chunk_size=2),
    Strategy("chunked", "unroll", chunk_size=3),
    Strategy("vmap", "unroll", max_unroll_steps=2),  # falls back to scan
]
RNG = jax.random.key(7)


def _run(algorithm, params, cohort, strategy=Strategy(), rounds=1):
  fn = build_round(algorithm, strategy, donate=False)
  state = algorithm.server_init(params)
  num = cohort["client_mask"].shape[0]
  metrics = None
  for _ in range(rounds):
    state, _, metrics = fn(state, cohort, jnp.zeros([num]), RNG)
  return state, {k: float(v) for k, v in metrics.items()}


def _assert_trees_close(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol,
                               rtol=1e-5)


@pytest.fixture
def algorithm(tiny_model):
  return fedavg.fedopt(tiny_model, optax.sgd(0.1), optax.adam(0.01))


def test_padded_cohort_equals_unpadded(tiny_model, algorithm):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(8)
  plain = build_cohort(clients, [0, 2, 5], batch_size=4)
  padded = build_cohort(clients, [0, 2, 5], batch_size=4, pad_clients=3,
                        extra_steps=2)
  state_a, metrics_a = _run(algorithm, params, plain)
  state_b, metrics_b = _run(algorithm, params, padded)
  _assert_trees_close(state_a.params, state_b.params)
  assert metrics_a["train_loss"] == pytest.approx(metrics_b["train_loss"],
                                                  rel=1e-6)
  assert metrics_b["num_clients"] == 3


def test_client_order_does_not_matter(tiny_model, algorithm):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(8)
  state_a, _ = _run(algorithm, params, build_cohort(clients, [0, 2, 5], 4))
  state_b, _ = _run(algorithm, params, build_cohort(clients, [5, 0, 2], 4))
  _assert_trees_close(state_a.params, state_b.params)


@pytest.mark.parametrize("strategy", ALL_STRATEGIES, ids=lambda s: s.label)
def test_every_strategy_gives_the_same_round(tiny_model, algorithm, strategy):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(10)
  cohort = build_cohort(clients, [1, 3, 4, 6, 9], batch_size=3, pad_clients=2)
  reference, ref_metrics = _run(algorithm, params, cohort, rounds=2)
  state, metrics = _run(algorithm, params, cohort, strategy, rounds=2)
  _assert_trees_close(reference.params, state.params, atol=1e-5)
  assert metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"],
                                                rel=1e-5)


def test_one_client_one_step_is_one_sgd_step(tiny_model):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(1, min_size=5, max_size=5)
  cohort = build_cohort(clients, [0], batch_size=5)
  algorithm = fedavg.fedavg(tiny_model, optax.sgd(0.3))
  state, _ = _run(algorithm, params, cohort)

  # The same step by hand, with the rng the engine gives client 0 in round 0.
  client_rng = jax.random.fold_in(jax.random.fold_in(RNG, 0), 0)
  _, step_rng = jax.random.split(client_rng)
  batch = {"x": jnp.asarray(clients[0][0]), "y": jnp.asarray(clients[0][1])}

  def loss(p):
    logits = tiny_model.apply(p, batch, step_rng, True)
    return jnp.mean(tiny_model.example_loss(logits, batch)[0])

  expected = jax.tree.map(lambda p, g: p - 0.3 * g, params,
                          jax.grad(loss)(params))
  _assert_trees_close(state.params, expected)


def test_server_sgd_lr1_averages_client_models(tiny_model):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(6)
  indices = [0, 2, 3, 5]
  algorithm = fedavg.fedavg(tiny_model, optax.sgd(0.2))
  state, _ = _run(algorithm, params, build_cohort(clients, indices, 4))
  # Each client alone (server lr 1 with one client = that client's model).
  local_models, sizes = [], []
  for i in indices:
    single = build_cohort(clients, [i], 4)
    single["client_indices"][:] = i  # same per-client rng as in the cohort
    local, _ = _run(algorithm, params, single)
    local_models.append(local.params)
    sizes.append(len(clients[i][1]))
  weights = np.asarray(sizes, np.float32) / sum(sizes)
  expected = jax.tree.map(
      lambda *ms: sum(w * m for w, m in zip(weights, ms)), *local_models)
  _assert_trees_close(state.params, expected, atol=1e-6)


def test_uniform_weighting_ignores_sizes(tiny_model):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(4, min_size=2, max_size=20)
  cohort = build_cohort(clients, [0, 1, 2, 3], 4)
  by_size, m1 = _run(fedavg.fedavg(tiny_model, optax.sgd(0.2)), params, cohort)
  uniform, m2 = _run(fedavg.fedavg(tiny_model, optax.sgd(0.2),
                                   weighting="uniform"), params, cohort)
  assert m1["total_weight"] == sum(len(c[1]) for c in clients)
  assert m2["total_weight"] == 4
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(by_size.params),
                 jax.tree.leaves(uniform.params)))
  assert diff > 1e-5


def test_fedsgd_equals_full_batch_gradient_step(deterministic_model):
  model = deterministic_model
  params = model.init(jax.random.key(0))
  clients = make_clients(3)
  algorithm = fedavg.fedsgd(model, optax.sgd(0.5))
  state, _ = _run(algorithm, params, build_cohort(clients, [0, 1, 2], 4))
  # Weighted by examples, the average of client mean-gradients is the
  # gradient of the mean loss over all examples of the cohort.
  batch = {"x": jnp.concatenate([jnp.asarray(c[0]) for c in clients]),
           "y": jnp.concatenate([jnp.asarray(c[1]) for c in clients])}

  def loss(p):
    logits = model.apply(p, batch, None, False)
    return jnp.mean(model.example_loss(logits, batch)[0])

  expected = jax.tree.map(lambda p, g: p - 0.5 * g, params,
                          jax.grad(loss)(params))
  _assert_trees_close(state.params, expected)


def test_no_recompilation_for_same_shapes(tiny_model, algorithm):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(10)
  fn = build_round(algorithm, Strategy(), donate=True)
  state = algorithm.server_init(params)
  for indices in ([0, 1, 2], [3, 4, 5], [6, 7, 8], [1, 5, 9]):
    cohort = build_cohort(clients, indices, 4, num_steps=4)
    state, _, _ = fn(state, cohort, jnp.zeros([3]), RNG)
  assert fn.trace_count() == 1


def test_parse_strategy():
  assert parse_strategy("chunked16+unroll", "dense") == Strategy(
      "chunked", "unroll", 16)
  with pytest.raises(ValueError, match="vmap\\+scan"):
    parse_strategy("fast", "dense")
  with pytest.raises(ValueError, match="host"):
    Strategy("map", "host")


_SHARDING_SCRIPT = r"""
import jax, jax.numpy as jnp, numpy as np, optax, sys
sys.path.insert(0, ".")
from tests.engine.conftest import TinyMLP, make_clients, build_cohort
from fedjax_lab.models import base as mb
from fedjax_lab.algorithms import fedavg
from fedjax_lab.engine import round as rl
from fedjax_lab.engine.strategy import Strategy
assert jax.device_count() == 4, jax.devices()
model = mb.from_flax(TinyMLP(), jnp.zeros([2, 8]))
alg = fedavg.fedopt(model, optax.sgd(0.1), optax.sgd(1.0))
params = model.init(jax.random.key(0))
cohort = build_cohort(make_clients(9), [0, 2, 3, 5, 8, 1], 3, pad_clients=2)
mesh = rl.client_mesh()
# map and chunk sizes that are not multiples of the device count: each
# chunk takes the same number of clients from every device.
for strategy in [Strategy("vmap", "scan"), Strategy("chunked", "unroll", 2),
                 Strategy("map", "scan"), Strategy("chunked", "scan", 3)]:
  one = rl.build_round(alg, strategy, donate=False)
  many = rl.build_round(alg, strategy, mesh=mesh, donate=False)
  s1, _, m1 = one(alg.server_init(params), cohort, jnp.zeros([8]),
                  jax.random.key(3))
  placed = rl.place_cohort(cohort, mesh)
  s4, _, m4 = many(alg.server_init(params), placed, jnp.zeros([8]),
                   jax.random.key(3))
  shards = {d.id for d in placed["example_mask"].sharding.device_set}
  assert len(shards) == 4, shards
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert abs(float(m1["train_loss"]) - float(m4["train_loss"])) < 1e-6
print("SHARDED_OK")
"""


def test_one_device_equals_four_simulated_devices():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
  result = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)
  assert "SHARDED_OK" in result.stdout, result.stderr[-3000:]


def test_per_client_state_round_trips_through_the_round(tiny_model):
  """The hook SCAFFOLD-style algorithms need: state in, updated state out."""
  inner = fedavg.fedavg(tiny_model, optax.sgd(0.1))

  def client_init(params, client_state, rng):
    return (client_state, inner.client_init(params, (), rng))

  def client_step(carry, batch, mask):
    return (carry[0], inner.client_step(carry[1], batch, mask))

  def client_final(params, carry, num_examples):
    update = inner.client_final(params, carry[1], num_examples)
    return update._replace(client_state=carry[0] + 1.0)  # participation count

  counting = dataclasses.replace(
      inner, client_init=client_init, client_step=client_step,
      client_final=client_final,
      client_state_init=lambda params: jnp.zeros([], jnp.float32))
  assert isinstance(counting, base.FederatedAlgorithm)
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(6)
  states = np.zeros([6], np.float32)
  state = counting.server_init(params)
  for strategy in (Strategy("vmap", "scan"), Strategy("chunked", "unroll", 2)):
    fn = build_round(counting, strategy, donate=False)
    for indices in ([0, 2, 4], [2, 3, 5]):
      cohort = build_cohort(clients, indices, 4, pad_clients=1)
      gathered = round_lib.gather_client_states(states,
                                                cohort["client_indices"])
      state, new_states, _ = fn(state, cohort, gathered, RNG)
      states = round_lib.scatter_client_states(
          states, cohort["client_indices"], new_states)
  np.testing.assert_array_equal(states, [2, 0, 4, 2, 2, 2])
