"""The public API (training/api.py): a run from a user's own arrays."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab import models
from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.data.sampling import ScheduleSampler
from fedjax_lab.training import api, callbacks, setup

NUM_FEATURES, NUM_CLASSES = 4, 3
# Client sizes: the last one ends in a partial batch of 1 (batch size 2).
CLIENT_SIZES = {"ann": 6, "bo": 4, "cy": 5}
SCHEDULE = [[0, 2], [1], [0, 1, 2], [2]]


def _user_arrays(seed: int = 0):
  rng = np.random.default_rng(seed)
  weights = rng.normal(size=(NUM_FEATURES, NUM_CLASSES))

  def client(n):
    x = rng.normal(size=(n, NUM_FEATURES)).astype(np.float32)
    return {"x": x, "y": np.argmax(x @ weights, axis=1).astype(np.int32)}

  train = {name: client(n) for name, n in CLIENT_SIZES.items()}
  test = {name: client(3) for name in CLIENT_SIZES}
  return train, test


def _config(**overrides):
  base = {"model.name": "logistic", "num_rounds": len(SCHEDULE),
          "eval_every": 1, "client.batch_size": 2,
          "client.learning_rate": 0.3, "client.shuffle": False,
          "server.learning_rate": 1.0, "metrics_sinks": "",
          "checkpoint_every": 0}
  base.update(overrides)
  return api.default_config(**base)


def _hand_written_fedavg(train, model, config):
  """FedAvg written out: every scheduled client runs in-order SGD over its
  batches (the mean loss of each batch, the last one partial), the server
  adds the example-weighted mean of the client deltas."""
  params = model.init(jax.random.fold_in(jax.random.key(config.seed), 0))
  names = list(train)
  batch_size, lr = config.client.batch_size, config.client.learning_rate

  def batch_loss(p, x, y):
    logits = model.apply(p, {"x": x, "y": y}, None, True)
    loss, weight = model.example_loss(logits, {"x": x, "y": y})
    return jnp.sum(loss) / jnp.sum(weight)

  grad = jax.jit(jax.grad(batch_loss))
  for cohort in SCHEDULE:
    deltas, weights = [], []
    for position in cohort:
      data = train[names[position]]
      local = params
      for start in range(0, len(data["y"]), batch_size):
        g = grad(local, data["x"][start:start + batch_size],
                 data["y"][start:start + batch_size])
        local = jax.tree.map(lambda p, g_: p - lr * g_, local, g)
      deltas.append(jax.tree.map(lambda a, b: a - b, params, local))
      weights.append(len(data["y"]))
    total = sum(weights)
    mean_delta = jax.tree.map(
        lambda *d: sum(w * x for w, x in zip(weights, d)) / total, *deltas)
    params = jax.tree.map(
        lambda p, d: p - config.server.learning_rate * d, params, mean_delta)
  return params


def test_simulate_with_a_replayed_schedule_matches_a_hand_written_loop(
    tmp_path):
  train, test = _user_arrays()
  dataset = FederatedDataset.from_client_arrays(train, test,
                                                num_classes=NUM_CLASSES)
  config = _config()
  result = api.simulate(config, dataset=dataset,
                        sampler=ScheduleSampler(3, SCHEDULE),
                        workdir=str(tmp_path / "run"))
  model = models.get_model("logistic", input_shape=(NUM_FEATURES,),
                           num_classes=NUM_CLASSES)
  expected = _hand_written_fedavg(train, model, config)
  for got, want in zip(jax.tree.leaves(result.params),
                       jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  assert [r["round"] for r in result.history] == [1, 2, 3, 4]
  assert result.summary["rounds"] == 4
  assert all("eval_accuracy" in r for r in result.history)
  assert os.path.exists(os.path.join(result.workdir, "summary.json"))


def test_in_order_batching_is_what_makes_it_match(tmp_path):
  train, test = _user_arrays()
  dataset = FederatedDataset.from_client_arrays(train, test,
                                                num_classes=NUM_CLASSES)
  runs = {}
  for shuffle in (False, True):
    runs[shuffle] = api.simulate(
        _config(**{"client.shuffle": shuffle}), dataset=dataset,
        sampler=ScheduleSampler(3, SCHEDULE),
        workdir=str(tmp_path / f"shuffle-{shuffle}")).params
  differences = [float(np.max(np.abs(a - b))) for a, b in zip(
      jax.tree.leaves(runs[False]), jax.tree.leaves(runs[True]))]
  assert max(differences) > 1e-4


def test_fixed_step_padding_compiles_once_and_gives_the_same_model(tmp_path):
  train, test = _user_arrays()
  dataset = FederatedDataset.from_client_arrays(train, test,
                                                num_classes=NUM_CLASSES)
  results = {
      padding: api.simulate(
          _config(**{"client.step_padding": padding}), dataset=dataset,
          sampler=ScheduleSampler(3, SCHEDULE),
          workdir=str(tmp_path / padding))
      for padding in ("bucketed", "fixed")}
  fixed = results["fixed"]
  assert fixed.summary["compilations"] == 1
  assert {r["local_steps_padded"] for r in fixed.history} == {3}
  for a, b in zip(jax.tree.leaves(fixed.params),
                  jax.tree.leaves(results["bucketed"].params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_registered_dataset_runs_without_passing_one(tmp_path):
  config = _config(**{"data.name": "synthetic", "num_rounds": 2,
                      "cohort_size": 3})
  config.data.num_clients = 10
  result = api.simulate(config, workdir=str(tmp_path / "run"))
  assert result.summary["rounds"] == 2
  assert result.summary["dataset"].startswith("synthetic")


@pytest.mark.parametrize("overrides, passed, message", [
    ({"data.name": "mnist"}, "dataset", "data.name='mnist'"),
    ({"model.name": "cnn"}, "model", "model.name='cnn'"),
    ({"privacy.mechanism": "gaussian", "weighting": "uniform"}, "sampler",
     "amplification"),
    ({"num_rounds": 9}, "sampler", "covers 4 rounds"),
])
def test_contradicting_or_unsafe_arguments_are_errors(overrides, passed,
                                                      message):
  train, test = _user_arrays()
  given = {"dataset": FederatedDataset.from_client_arrays(
      train, test, num_classes=NUM_CLASSES)}
  if passed == "model":
    given["model"] = models.get_model(
        "logistic", input_shape=(NUM_FEATURES,), num_classes=NUM_CLASSES)
  if passed == "sampler":
    given["sampler"] = ScheduleSampler(3, SCHEDULE)
  with pytest.raises(setup.ConfigError, match=message):
    api.simulate(_config(**overrides), **given)


def test_default_config_refuses_unknown_keys():
  with pytest.raises(KeyError, match="client.learnig_rate"):
    api.default_config(**{"client.learnig_rate": 0.1})


class _StopAfter(callbacks.Callback):
  """A user's callback: adds a key to each record, stops after N rounds."""

  def __init__(self, rounds):
    self.rounds = rounds
    self.seen = []

  def should_stop(self, run):
    if run.rounds_done >= self.rounds:
      return f"user stop after {run.rounds_done}"
    return None

  def after_round(self, run):
    self.seen.append(run.rounds_done)
    run.record["user_note"] = float(run.rounds_done)


def test_a_user_callback_sees_every_round_and_can_stop_the_run(tmp_path):
  train, test = _user_arrays()
  dataset = FederatedDataset.from_client_arrays(train, test,
                                                num_classes=NUM_CLASSES)
  stop = _StopAfter(2)
  result = api.simulate(_config(), dataset=dataset,
                        sampler=ScheduleSampler(3, SCHEDULE),
                        workdir=str(tmp_path / "run"), callbacks=[stop])
  assert stop.seen == [1, 2]
  assert result.summary["stopped_early"] == "user stop after 2"
  assert [r["user_note"] for r in result.history] == [1.0, 2.0]
  with open(os.path.join(result.workdir, "summary.json")) as f:
    assert json.load(f)["rounds"] == 2
