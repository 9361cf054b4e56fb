"""The algorithm registry: a new algorithm from one file, refusals, options."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import pytest

from fedjax_lab import algorithms
from fedjax_lab.algorithms import base, fedavg, recipe
from fedjax_lab.privacy import plan as privacy_plan
from fedjax_lab.training import loop, metrics_io, setup

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


# ---- a toy algorithm, defined and registered here alone --------------------


def scaled_fedavg(context: recipe.BuildContext, *,
                  scale: float = 1.0) -> base.FederatedAlgorithm:
  """FedAvg whose server moves ``scale`` times the mean client delta."""
  inner = fedavg.fedopt(context.model, context.client_optimizer,
                        context.server_optimizer,
                        weighting=context.weighting,
                        aggregator=context.aggregator, name="scaled_fedavg")

  def server_update(state, aggregate):
    scaled = jax.tree.map(lambda a: scale * a, aggregate)
    state, metrics = inner.server_update(state, scaled)
    return state, {**metrics, "update_scale": jnp.asarray(scale)}

  return dataclasses.replace(inner, server_update=server_update)


SCALED = recipe.Recipe(
    "scaled_fedavg", build=scaled_fedavg, block="scaled_fedavg",
    refuses={"local": "a toy that scales local-DP noise too."})


@pytest.fixture
def scaled_registered():
  algorithms.register(SCALED)
  yield SCALED
  algorithms.unregister(SCALED.name)


def _config(name="synthetic_logreg_fedavg", **overrides):
  sys.path.insert(0, ROOT)
  config = __import__(f"configs.{name}",
                      fromlist=["get_config"]).get_config("tiny")
  config.metrics_sinks = ""
  for key, value in overrides.items():
    block, _, last = key.rpartition(".")
    (config[block] if block else config)[last] = value
  return config


def _run(config, workdir):
  summary = loop.run_experiment(setup.build_experiment(config), str(workdir),
                                show_progress=False)
  return summary, metrics_io.read_jsonl(str(workdir / "metrics.jsonl"))


def test_a_registered_algorithm_runs_end_to_end_with_its_options(
    scaled_registered, tmp_path):
  del scaled_registered
  # The base config now has the toy's block with its default.
  assert _config().scaled_fedavg.to_dict() == {"scale": 1.0}
  frozen, frozen_records = _run(
      _config(algorithm="scaled_fedavg", **{"scaled_fedavg.scale": 0.0}),
      tmp_path / "frozen")
  assert frozen["algorithm"] == "scaled_fedavg"
  assert [r["update_scale"] for r in frozen_records] == [0.0, 0.0]
  # Scale 0: the model never moves, so every evaluation is the same.
  losses = [r["eval_loss"] for r in frozen_records]
  assert losses[0] == losses[-1]
  # Scale 1 is FedAvg exactly (same seed, same metrics).
  _, one_records = _run(_config(algorithm="scaled_fedavg"), tmp_path / "one")
  _, fedavg_records = _run(_config(), tmp_path / "fedavg")
  assert ([r["eval_loss"] for r in one_records] ==
          [r["eval_loss"] for r in fedavg_records])
  assert one_records[-1]["eval_loss"] != losses[-1]


def test_a_registered_algorithm_refuses_what_its_recipe_refuses(
    scaled_registered):
  del scaled_registered
  config = _config(algorithm="scaled_fedavg", weighting="uniform",
                   **{"privacy.mechanism": "local"})
  with pytest.raises(setup.ConfigError, match="'local'.*scales local-DP"):
    setup.validate(config)
  config.privacy.mechanism = "gaussian"
  setup.validate(config)


def test_unknown_key_in_an_algorithm_block_is_refused_by_name(
    scaled_registered):
  del scaled_registered
  config = _config(algorithm="fedprox", **{"fedprox.mux": 0.1})
  with pytest.raises(setup.ConfigError,
                     match=r"fedprox has unknown key\(s\) \['mux'\].*'mu'"):
    setup.validate(config)
  config = _config(algorithm="scaled_fedavg", **{"scaled_fedavg.factor": 2})
  with pytest.raises(setup.ConfigError, match=r"\['factor'\].*\['scale'\]"):
    setup.build_experiment(config)


def test_unknown_algorithm_lists_the_registered_ones():
  with pytest.raises(setup.ConfigError, match="algorithm must be one of.*"
                     "hypcluster.*got 'fedcool'"):
    setup.validate(_config(algorithm="fedcool"))


# Option sets per algorithm: the recipe's refusals that depend on options.
_VARIANTS = {
    "fedprox": ({}, {"fedprox.adaptive_mu": True}),
    "hypcluster": ({"hypcluster.init": "random"},
                   {"hypcluster.init": "kmeans"}),
}


@pytest.mark.parametrize("name", algorithms.names())
def test_every_refusal_names_the_mechanism(name):
  recipe_ = algorithms.get(name)
  assert set(recipe_.refuses) <= set(privacy_plan.MECHANISMS) - {"none"}
  refused = []
  for overrides in _VARIANTS.get(name, ({},)):
    for mechanism in privacy_plan.MECHANISMS:
      config = _config(algorithm=name, weighting="uniform",
                       **{"privacy.mechanism": mechanism}, **overrides)
      context = recipe.BuildContext(config, recipe_.options(config))
      message = recipe_.refusal(context, mechanism)
      if mechanism == "none":
        assert message is None
        continue
      if message is None:
        continue
      refused.append(mechanism)
      assert f"privacy.mechanism={mechanism!r}" in message
      assert repr(name) in message
      with pytest.raises(setup.ConfigError, match=mechanism) as info:
        setup.validate(config)
      assert str(info.value) == message
  expected = {"mime": 4, "mimelite": 1, "agnostic_fedavg": 1,
              "hypcluster": 5, "fedprox": 4}
  assert len(refused) == expected.get(name, 0), refused


def test_base_config_blocks_are_the_recipes_defaults():
  config = _config()
  for block, defaults in algorithms.config_blocks().items():
    assert config[block].to_dict() == defaults
  assert algorithms.config_blocks()["mime"] == {
      "base_optimizer": "momentum", "base_hparams": {"momentum": 0.9}}


def test_recipes_are_checked_when_declared_and_registered():
  with pytest.raises(TypeError, match="keyword-only with a default"):
    recipe.Recipe("bad", build=lambda context, scale: None, block="bad")
  with pytest.raises(TypeError, match="names no config block"):
    recipe.Recipe("bad", build=lambda context, *, scale=1.0: None)
  with pytest.raises(ValueError, match="already registered"):
    algorithms.register(fedavg.FEDAVG)
  clash = recipe.Recipe("mime2", build=lambda context, *, other=1: None,
                        block="mime")
  with pytest.raises(ValueError, match="shares config block 'mime'"):
    algorithms.register(clash)
  assert "mime2" not in algorithms.names()
