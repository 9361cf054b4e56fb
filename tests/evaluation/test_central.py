"""Evaluation is exact whatever the batch size and padding."""

import jax
import jax.numpy as jnp
import pytest

from fedjax_lab.data.cohort import make_eval_batches
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.evaluation.central import build_evaluator

from tests.engine.conftest import make_clients


@pytest.mark.parametrize("batch_size", [1, 7, 64])
def test_eval_matches_direct_computation(deterministic_model, batch_size):
  model = deterministic_model
  clients = make_clients(5)
  store = ClientStore.from_client_arrays(
      [str(i) for i in range(5)], [{"x": x, "y": y} for x, y in clients])
  params = model.init(jax.random.key(1))
  features, mask = make_eval_batches(store, batch_size)
  metrics = build_evaluator(model)(params, features, mask)

  x = jnp.asarray(store.features["x"])
  y = jnp.asarray(store.features["y"])
  logits = model.apply(params, {"x": x}, None, False)
  expected_loss = float(jnp.mean(model.example_loss(logits, {"y": y})[0]))
  expected_acc = float(jnp.mean(jnp.argmax(logits, -1) == y))
  assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
  assert metrics["accuracy"] == pytest.approx(expected_acc, abs=1e-7)
  assert mask.sum() == store.num_examples
