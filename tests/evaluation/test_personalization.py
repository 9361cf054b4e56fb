"""Personalization evaluation (Wang et al. 2019): per-client fine-tuning."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import fedavg
from fedjax_lab.data.cohort import make_cohort, make_eval_batches
from fedjax_lab.data.cohort import make_round_cohort
from fedjax_lab.data.federated import ClientStore, FederatedDataset
from fedjax_lab.data.sources import load_dataset
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.strategy import Strategy
from fedjax_lab.evaluation import personalization
from fedjax_lab.evaluation.central import build_evaluator
from fedjax_lab.models import get_model

from tests.engine.conftest import make_clients

NUM_CLIENTS = 7
EMPTY_TEST_CLIENT = 4  # holds train examples only: skipped
EMPTY_TRAIN_CLIENT = 5  # holds test examples only: 0 fine-tuning steps


def _stores(seed=0, min_train_size=3):
  """Train and test stores of the same 7 clients (ids "c0".."c6")."""
  ids = [f"c{i}" for i in range(NUM_CLIENTS)]
  train = make_clients(NUM_CLIENTS, seed=seed, min_size=min_train_size,
                       max_size=14)
  test = make_clients(NUM_CLIENTS, seed=seed + 100, min_size=2, max_size=9)
  train[EMPTY_TRAIN_CLIENT] = (train[EMPTY_TRAIN_CLIENT][0][:0],
                               train[EMPTY_TRAIN_CLIENT][1][:0])
  test[EMPTY_TEST_CLIENT] = (test[EMPTY_TEST_CLIENT][0][:0],
                             test[EMPTY_TEST_CLIENT][1][:0])
  as_store = lambda clients: ClientStore.from_client_arrays(
      ids, [{"x": x, "y": y} for x, y in clients])
  return as_store(train), as_store(test)


def _metrics_by_id(result):
  return {cid: {"global": {k: v[i] for k, v in result.global_metrics.items()},
                "personalized": {k: v[i] for k, v in
                                 result.personalized_metrics.items()},
                "steps": result.num_fine_tune_steps[i]}
          for i, cid in enumerate(result.client_ids)}


def _assert_same_per_client(a, b, atol=1e-6):
  by_id_a, by_id_b = _metrics_by_id(a), _metrics_by_id(b)
  assert set(by_id_a) == set(by_id_b)
  for cid, entry in by_id_a.items():
    assert entry["steps"] == by_id_b[cid]["steps"]
    for phase in ("global", "personalized"):
      for name, value in entry[phase].items():
        np.testing.assert_allclose(value, by_id_b[cid][phase][name],
                                   atol=atol, rtol=1e-6,
                                   err_msg=f"{cid} {phase} {name}")


@pytest.mark.parametrize("num_epochs, learning_rate", [(0, 0.1), (2, 0.0)])
def test_no_fine_tuning_gives_the_global_models_per_client_evaluation(
    deterministic_model, num_epochs, learning_rate):
  model = deterministic_model
  train, test = _stores()
  params = model.init(jax.random.key(1))
  evaluate = personalization.build_personalization_evaluator(
      model, optax.sgd(learning_rate), num_epochs=num_epochs, batch_size=4,
      eval_batch_size=3, clients_per_chunk=4)
  result = evaluate(params, train, test)

  assert result.num_skipped_no_test_examples == 1
  assert f"c{EMPTY_TEST_CLIENT}" not in result.client_ids
  assert list(result.client_indices) == [0, 1, 2, 3, 5, 6]
  reference = build_evaluator(model)
  for i, k in enumerate(result.client_indices):
    expected = reference(params, *make_eval_batches(test.subset([k]), 5))
    assert result.num_test_examples[i] == test.client_sizes[k]
    for name in ("loss", "accuracy"):
      assert result.global_metrics[name][i] == pytest.approx(
          expected[name], rel=1e-5, abs=1e-7)
    np.testing.assert_array_equal(result.personalized_metrics["accuracy"],
                                  result.global_metrics["accuracy"])
    np.testing.assert_allclose(result.personalized_metrics["loss"],
                               result.global_metrics["loss"], rtol=1e-6)
  # The example-weighted mean pools every test example: the global model's
  # central test metric.
  pooled = reference(params, *make_eval_batches(test, 8))
  summary = result.summary()
  assert summary["global_accuracy_mean_example_weighted"] == pytest.approx(
      pooled["accuracy"], abs=1e-6)
  assert summary["global_loss_mean_example_weighted"] == pytest.approx(
      pooled["loss"], rel=1e-5)
  assert summary["fraction_clients_improved_accuracy"] == 0.0
  assert summary["num_clients_skipped_no_test_examples"] == 1.0
  expected_steps = (0 if num_epochs == 0 else
                    -(-train.client_sizes[result.client_indices] * 2 // 4))
  np.testing.assert_array_equal(result.num_fine_tune_steps, expected_steps)


def _hand_gradient(params, x, y, mask):
  """Gradient of the masked mean softmax cross-entropy of a linear model."""
  dense = params["Dense_0"]
  w = np.asarray(dense["kernel"], np.float64)
  b = np.asarray(dense["bias"], np.float64)
  probs = _softmax(x.astype(np.float64) @ w + b)
  err = (probs - np.eye(w.shape[1])[y]) * mask[:, None] / mask.sum()
  return {"kernel": x.T @ err, "bias": err.sum(0)}


def _softmax(logits):
  probs = np.exp(logits - logits.max(axis=1, keepdims=True))
  return probs / probs.sum(axis=1, keepdims=True)


def test_per_client_metrics_match_a_direct_computation(deterministic_model):
  """Three clients, two epochs of SGD on shuffled batches of 4, by hand."""
  model = deterministic_model
  train, test = _stores(seed=3)
  params = model.init(jax.random.key(2))
  lr, batch_size, num_epochs, seed = 0.4, 4, 2, 5
  evaluate = personalization.build_personalization_evaluator(
      model, optax.sgd(lr), num_epochs=num_epochs, batch_size=batch_size,
      eval_batch_size=4, clients_per_chunk=2, shuffle_seed=seed)
  chosen = [6, 0, 2]
  result = evaluate(params, train, test, client_indices=chosen)
  np.testing.assert_array_equal(result.client_indices, chosen)

  for i, k in enumerate(chosen):
    # The client's own batches (its shuffle depends on (seed, k) only).
    batches = make_cohort(train, [k], batch_size=batch_size,
                          num_epochs=num_epochs, seed=seed, round_index=0)
    w = np.asarray(params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(params["Dense_0"]["bias"], np.float64)
    steps = 0
    for s in range(batches.example_mask.shape[1]):
      mask = batches.example_mask[0, s]
      if not mask.any():
        continue
      grad = _hand_gradient({"Dense_0": {"kernel": w, "bias": b}},
                            batches.features["x"][0, s],
                            batches.features["y"][0, s], mask)
      w, b, steps = w - lr * grad["kernel"], b - lr * grad["bias"], steps + 1
    x, y = test.client(k)["x"].astype(np.float64), test.client(k)["y"]
    for phase, (kernel, bias) in (
        ("global", (np.asarray(params["Dense_0"]["kernel"]),
                    np.asarray(params["Dense_0"]["bias"]))),
        ("personalized", (w, b))):
      probs = _softmax(x @ kernel + bias)
      metrics = getattr(result, f"{phase}_metrics")
      assert metrics["accuracy"][i] == pytest.approx(
          np.mean(probs.argmax(1) == y), abs=1e-7)
      assert metrics["loss"][i] == pytest.approx(
          -np.mean(np.log(probs[np.arange(len(y)), y])), rel=1e-4)
    assert result.num_fine_tune_steps[i] == steps == -(
        -train.client_sizes[k] * num_epochs // batch_size)


def test_result_does_not_depend_on_the_chunk(tiny_model):
  """Chunk size, chunk neighbours and padding leave each client unchanged
  (dropout on: each client's key is fold_in(rng, client index)).

  Clients hold 9..14 train examples, so with batches of 3 and a cap of 4
  steps they take 3 or 4 steps (one takes none) in chunks padded to 4 steps:
  few shapes to compile, yet chunks mix step counts.
  """
  model = tiny_model
  train, test = _stores(seed=7, min_train_size=9)
  params = model.init(jax.random.key(3))
  rng = jax.random.key(9)
  build = lambda clients_per_chunk: (
      personalization.build_personalization_evaluator(
          model, optax.adam(0.05), num_epochs=1, batch_size=3, max_steps=4,
          eval_batch_size=16, clients_per_chunk=clients_per_chunk))
  evaluate = build(2)
  by_pairs = evaluate(params, train, test, rng=rng)
  all_at_once = build(8)(params, train, test, rng=rng)
  assert set(by_pairs.num_fine_tune_steps) == {0, 3, 4}
  assert np.any(by_pairs.personalized_accuracy != by_pairs.global_accuracy)
  _assert_same_per_client(by_pairs, all_at_once)
  # One client alone, and a reordered subset (a pair, then one alone).
  alone = evaluate(params, train, test, client_indices=[2], rng=rng)
  subset = evaluate(params, train, test, client_indices=[6, 2, 1], rng=rng)
  np.testing.assert_array_equal(subset.client_indices, [6, 2, 1])
  full = _metrics_by_id(by_pairs)
  for part in (alone, subset):
    for cid, entry in _metrics_by_id(part).items():
      for phase in ("global", "personalized"):
        for name, value in entry[phase].items():
          np.testing.assert_allclose(value, full[cid][phase][name],
                                     rtol=1e-6, atol=1e-6)


def test_test_clients_are_matched_by_id():
  """A test store in another order, lacking one client, gives the same
  per-client results; the missing client is skipped."""
  model = get_model("logistic", input_shape=(8,), num_classes=3)
  train, test = _stores(seed=11)
  params = model.init(jax.random.key(4))
  evaluate = personalization.build_personalization_evaluator(
      model, optax.sgd(0.2), num_epochs=1, batch_size=4, eval_batch_size=4,
      clients_per_chunk=4)
  aligned = evaluate(params, train, test)
  shuffled_test = test.subset([6, 3, 1, 0, 5, 4])  # "c2" is missing
  matched = evaluate(params, train, shuffled_test)
  assert matched.num_skipped_no_test_examples == 2
  assert "c2" not in matched.client_ids
  full = _metrics_by_id(aligned)
  for cid, entry in _metrics_by_id(matched).items():
    for name, value in entry["personalized"].items():
      np.testing.assert_allclose(value, full[cid]["personalized"][name],
                                 rtol=1e-6)


def test_invalid_arguments(deterministic_model):
  build = personalization.build_personalization_evaluator
  with pytest.raises(ValueError, match="num_epochs"):
    build(deterministic_model, optax.sgd(0.1), num_epochs=-1, batch_size=2)
  with pytest.raises(ValueError, match="clients_per_chunk"):
    build(deterministic_model, optax.sgd(0.1), num_epochs=1, batch_size=2,
          clients_per_chunk=0)
  train, test = _stores()
  evaluate = build(deterministic_model, optax.sgd(0.1), num_epochs=1,
                   batch_size=2)
  with pytest.raises(IndexError):
    evaluate(deterministic_model.init(jax.random.key(0)), train, test,
             client_indices=[NUM_CLIENTS])


def test_fine_tuning_helps_on_heterogeneous_synthetic_data():
  """Synthetic(1, 1) gives every client its own softmax model: after 5 FedAvg
  rounds (8 local steps) the global model fits few clients, one epoch of
  local SGD fits most."""
  data = load_dataset("synthetic", alpha=1.0, beta=1.0, iid=False,
                      num_clients=30, seed=0)
  model = get_model("logistic", input_shape=data.input_shape,
                    num_classes=data.num_classes)
  algorithm = fedavg.fedavg(model, optax.sgd(0.01))
  round_fn = round_lib.build_round(algorithm, Strategy(), donate=False)
  state = algorithm.server_init(model.init(jax.random.key(0)))
  for r in range(5):
    indices = np.random.default_rng([1, r]).choice(30, 10, replace=False)
    cohort = round_lib.cohort_arrays(make_round_cohort(
        data.train, indices, batch_size=10, num_epochs=1, max_steps=8,
        seed=0, round_index=r, fixed_cohort_size=10))
    state, _, _ = round_fn(state, cohort,
                           jnp.zeros(cohort["client_mask"].shape),
                           jax.random.key(1))
  evaluate = personalization.build_personalization_evaluator(
      model, optax.sgd(0.01), num_epochs=1, batch_size=10,
      eval_batch_size=64, clients_per_chunk=32)
  summary = evaluate(state.params, data.train, data.test).summary()
  print({k: round(v, 3) for k, v in summary.items()})
  assert summary["num_clients_evaluated"] == 30
  assert (summary["personalized_accuracy_mean_client_uniform"] >
          summary["global_accuracy_mean_client_uniform"] + 0.15)
  assert (summary["personalized_accuracy_median"] >
          summary["global_accuracy_median"])
  assert summary["fraction_clients_improved_accuracy"] >= 0.7


def test_runner_evaluates_a_fixed_subset_and_describe_lists_each_client(
    deterministic_model):
  """build_runner: the config block's subset (the same every call) and
  settings; describe: the summary plus per-client values."""
  train, test = _stores()
  dataset = FederatedDataset("tiny", train, test, num_classes=3,
                             input_shape=(8,))
  config = ml_collections.ConfigDict({"seed": 3, "personalization": {
      "learning_rate": 0.1, "num_epochs": 1, "batch_size": 4,
      "max_clients": 4, "eval_batch_size": 3, "clients_per_chunk": 2,
      "every": 5}})
  runner = personalization.build_runner(config, deterministic_model, dataset)
  assert runner.every == 5
  params = deterministic_model.init(jax.random.key(1))
  first, again = runner(params), runner(params)
  np.testing.assert_array_equal(first.client_ids, again.client_ids)
  assert first.num_clients + first.num_skipped_no_test_examples == 4
  direct = personalization.build_personalization_evaluator(
      deterministic_model, optax.sgd(0.1), num_epochs=1, batch_size=4,
      eval_batch_size=3, clients_per_chunk=2, shuffle_seed=3)(
          params, train, test, first.client_indices,
          rng=jax.random.fold_in(jax.random.key(3), 0x9E25))
  _assert_same_per_client(first, direct)

  described = personalization.describe(first)
  assert described["client_ids"] == [str(c) for c in first.client_ids]
  assert described["personalized_accuracy_per_client"] == list(
      first.personalized_accuracy)
  assert described["num_clients_evaluated"] == first.num_clients
