"""SCAFFOLD (Karimireddy et al. 2020): control variates through the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg, scaffold
from fedjax_lab.data.cohort import make_round_cohort
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.models import get_model

from tests.engine.conftest import build_cohort, make_clients

RNG = jax.random.key(3)
STRATEGIES = [Strategy("vmap", "scan"), Strategy("vmap", "unroll"),
              Strategy("vmap", "host"), Strategy("chunked", "scan", 2)]


def _stacked_states(algorithm, params, population):
  return jax.tree.map(
      lambda a: np.zeros((population,) + a.shape, np.float32),
      algorithm.client_state_init(params))


def _random_like(tree, seed, scale=0.1):
  leaves, treedef = jax.tree.flatten(tree)
  rng = np.random.default_rng(seed)
  return treedef.unflatten(
      [jnp.asarray(scale * rng.normal(size=np.shape(a)), jnp.float32)
       for a in leaves])


def _hand_gradient(params, x, y, mask):
  """Gradient of the masked mean softmax cross-entropy of a linear model."""
  dense = params["Dense_0"]
  w, b = np.asarray(dense["kernel"], np.float64), np.asarray(dense["bias"],
                                                             np.float64)
  logits = x.astype(np.float64) @ w + b
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  probs /= probs.sum(axis=1, keepdims=True)
  err = (probs - np.eye(w.shape[1])[y]) * mask[:, None] / mask.sum()
  return {"Dense_0": {"kernel": x.T @ err, "bias": err.sum(0)}}


def _assert_trees_close(a, b, **kwargs):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kwargs)


def test_invalid_arguments(deterministic_model):
  with pytest.raises(ValueError, match="num_clients"):
    scaffold.scaffold(deterministic_model, 0.1, optax.sgd(1.0))
  with pytest.raises(ValueError, match="option"):
    scaffold.scaffold(deterministic_model, 0.1, optax.sgd(1.0), option="III",
                      num_clients=4)
  with pytest.raises(ValueError, match="weighting"):
    scaffold.scaffold(deterministic_model, 0.1, optax.sgd(1.0),
                      weighting="x", num_clients=4)


@pytest.mark.parametrize("weighting", ["uniform", "num_examples"])
def test_first_round_with_zero_control_variates_is_fedavg(tiny_model,
                                                          weighting):
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(6, seed=1)
  cohort = build_cohort(clients, [0, 2, 3, 5], batch_size=4, pad_clients=1,
                        extra_steps=1)
  alg = scaffold.scaffold(tiny_model, 0.05, optax.sgd(1.0),
                          weighting=weighting, num_clients=6)
  avg = fedavg.fedavg(tiny_model, optax.sgd(0.05), weighting=weighting)
  states = _stacked_states(alg, params, 6)
  gathered = round_lib.gather_client_states(states, cohort["client_indices"])
  state, _, metrics = round_lib.build_round(alg, Strategy(), donate=False)(
      alg.server_init(params), cohort, gathered, RNG)
  ref, _, ref_metrics = round_lib.build_round(avg, Strategy(), donate=False)(
      avg.server_init(params), cohort, jnp.zeros([5]), RNG)
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref.params),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(metrics["train_loss"]) == float(ref_metrics["train_loss"])


@pytest.mark.parametrize("option", ["I", "II"])
def test_one_client_one_step_control_variates_by_hand(deterministic_model,
                                                      option):
  """c_i+ = grad f_i(x) (both options, one step); x+ = y; c+ = c + dc / N."""
  lr, population = 0.3, 4
  params = deterministic_model.init(jax.random.key(1))
  x, y = make_clients(1, seed=2, min_size=5, max_size=5)[0]
  cohort = build_cohort([(x, y)], [0], batch_size=8)  # one step, 3 masked
  alg = scaffold.scaffold(deterministic_model, lr, optax.sgd(1.0),
                          option=option, num_clients=population)
  server_control = _random_like(params, seed=5)
  client_control = _random_like(params, seed=6)
  state = alg.server_init(params)._replace(extra=server_control)
  gathered = jax.tree.map(lambda a: np.asarray(a)[None], client_control)
  new_state, new_states, _ = round_lib.build_round(
      alg, Strategy(), donate=False)(state, cohort, gathered, RNG)

  grad = _hand_gradient(params, x, y, np.ones(len(y)))
  local = jax.tree.map(lambda p, g, c, ci: p - lr * (g + c - ci), params, grad,
                       server_control, client_control)
  _assert_trees_close(new_state.params, local, rtol=1e-5, atol=1e-6)
  _assert_trees_close(jax.tree.map(lambda a: a[0], new_states), grad,
                      rtol=1e-4, atol=1e-5)
  expected_c = jax.tree.map(lambda c, g, ci: c + (g - ci) / population,
                            server_control, grad, client_control)
  _assert_trees_close(new_state.extra, expected_c, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=str)
def test_option_two_counts_only_real_steps(deterministic_model, strategy):
  """K excludes padded steps: c_i+ = c_i - c + (x - y) / (K lr), K = 3."""
  lr = 0.1
  params = deterministic_model.init(jax.random.key(2))
  clients = make_clients(1, seed=4, min_size=11, max_size=11)
  cohort = build_cohort(clients, [0], batch_size=4, extra_steps=2)
  assert cohort["example_mask"].any(axis=2).sum() == 3
  alg = scaffold.scaffold(deterministic_model, lr, optax.sgd(1.0),
                          num_clients=2)
  server_control = _random_like(params, seed=7)
  client_control = _random_like(params, seed=8)
  state = alg.server_init(params)._replace(extra=server_control)
  gathered = jax.tree.map(lambda a: np.asarray(a)[None], client_control)
  new_state, new_states, metrics = round_lib.build_round(
      alg, strategy, donate=False)(state, cohort, gathered, RNG)
  expected = jax.tree.map(lambda ci, c, x, y: ci - c + (x - y) / (3 * lr),
                          client_control, server_control, params,
                          new_state.params)
  _assert_trees_close(jax.tree.map(lambda a: a[0], new_states), expected,
                      rtol=1e-4, atol=1e-5)
  assert float(metrics["local_steps"]) == 3.0


@pytest.mark.parametrize("option", ["I", "II"])
def test_only_sampled_clients_change_and_c_is_their_mean(tiny_model, option):
  """Gather/round/scatter leaves unsampled c_i alone; with uniform weights
  the server's c stays exactly the mean of all N clients' c_i."""
  population = 7
  params = tiny_model.init(jax.random.key(0))
  clients = make_clients(population, seed=3)
  alg = scaffold.scaffold(tiny_model, 0.05, optax.sgd(1.0), option=option,
                          num_clients=population)
  states = _stacked_states(alg, params, population)
  state = alg.server_init(params)
  touched = set()
  for strategy, indices in ((Strategy("vmap", "scan"), [0, 2, 4]),
                            (Strategy("chunked", "unroll", 2), [2, 3, 5]),
                            (Strategy("vmap", "host"), [5, 0])):
    fn = round_lib.build_round(alg, strategy, donate=False)
    cohort = build_cohort(clients, indices, 4, pad_clients=2)
    gathered = round_lib.gather_client_states(states,
                                              cohort["client_indices"])
    state, new_states, _ = fn(state, cohort, gathered, RNG)
    before = states
    states = round_lib.scatter_client_states(states, cohort["client_indices"],
                                             new_states)
    for slot, k in enumerate(indices):
      _assert_trees_close(jax.tree.map(lambda a: a[k], states),
                          jax.tree.map(lambda a: a[slot], new_states),
                          rtol=0, atol=0)
    for k in set(range(population)) - set(indices):
      _assert_trees_close(jax.tree.map(lambda a: a[k], states),
                          jax.tree.map(lambda a: a[k], before),
                          rtol=0, atol=0)
    touched |= set(indices)
  for k in set(range(population)) - touched:  # client 1, 6: never sampled
    assert all(not np.any(a[k]) for a in jax.tree.leaves(states))
  assert any(np.any(a[0]) for a in jax.tree.leaves(states))
  _assert_trees_close(state.extra, jax.tree.map(lambda a: a.mean(0), states),
                      rtol=1e-4, atol=1e-6)


def _synthetic_train_loss(algorithm, model, store, params, rounds, cohort_size,
                          lr_steps):
  population = store.num_clients
  fn = round_lib.build_round(algorithm, Strategy(), donate=False)
  state = algorithm.server_init(params)
  states = _stacked_states(algorithm, params, population)
  stateful = algorithm.name.startswith("scaffold")
  for r in range(rounds):
    indices = np.random.default_rng([11, r]).choice(population, cohort_size,
                                                    replace=False)
    cohort = round_lib.cohort_arrays(make_round_cohort(
        store, indices, batch_size=10, num_epochs=20, max_steps=lr_steps,
        seed=0, round_index=r))
    if stateful:
      gathered = round_lib.gather_client_states(states,
                                                cohort["client_indices"])
    else:
      gathered = jnp.zeros(cohort["client_mask"].shape)
    state, new_states, _ = fn(state, cohort, gathered, RNG)
    if stateful:
      states = round_lib.scatter_client_states(
          states, cohort["client_indices"], new_states)

  @jax.jit
  def client_loss(p, batch):
    loss, weight = model.example_loss(model.apply(p, batch, None, False),
                                      batch)
    return jnp.sum(loss) / jnp.sum(weight)

  # The objective both algorithms optimise with uniform weighting: the mean
  # over clients of each client's mean training loss.
  return float(np.mean([client_loss(state.params, store.client(k))
                        for k in range(population)]))


def test_scaffold_beats_fedavg_on_heterogeneous_synthetic_data():
  """Synthetic(1, 1), 30 clients, 10 per round, 10 local steps, 20 rounds.

  The client step size 0.01 keeps local SGD stable (the largest client
  smoothness constant of the softmax loss here is ~160, so lr * L < 2).
  """
  data = load_dataset("synthetic", alpha=1.0, beta=1.0, iid=False,
                      num_clients=30, seed=0)
  model = get_model("logistic", input_shape=data.input_shape,
                    num_classes=data.num_classes)
  params = model.init(jax.random.key(0))
  lr, rounds = 0.01, 20
  run = lambda alg: _synthetic_train_loss(alg, model, data.train, params,
                                          rounds, 10, 10)
  fedavg_loss = run(fedavg.fedavg(model, optax.sgd(lr), weighting="uniform"))
  losses = {option: run(scaffold.scaffold(
      model, lr, optax.sgd(1.0), option=option, weighting="uniform",
      num_clients=data.train.num_clients)) for option in ("I", "II")}
  print(f"train loss after {rounds} rounds: fedavg {fedavg_loss:.4f}, "
        f"scaffold I {losses['I']:.4f}, II {losses['II']:.4f}")
  for loss in losses.values():
    assert loss < 0.8 * fedavg_loss
