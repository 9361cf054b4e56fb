"""DP aggregation with traced hyperparameters (sweep members under vmap).

Each mechanism's aggregator built from a plan whose numbers are tracers (one
slice of a ``[K]`` array under ``jax.jit(jax.vmap(...))``) must give, member
by member, what the aggregator of that member's concrete plan gives.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fedjax_lab.algorithms import base, compression
from fedjax_lab.privacy import aggregators, clipping, mechanisms, plan, tree
from fedjax_lab.training.defaults import privacy_defaults

NUM_CLIENTS = 4
# Per member: clip norm, noise multiplier, adaptive target quantile and clip
# learning rate, clipped-count stddev (0: the default), FTRL momentum.
MEMBERS = {"clip": [0.5, 1.0, 2.0], "z": [1.3, 0.0, 0.7],
           "quantile": [0.3, 0.5, 0.8], "clip_lr": [0.2, 0.1, 0.5],
           "count_std": [0.0, 2.0, 0.0], "momentum": [0.9, 0.0, 0.5]}
_SAMPLING = {"gaussian": "fixed", "adaptive": "fixed", "local": "fixed",
             "tree": "shuffle"}


def _member_hparams(k):
  return {name: values[k] for name, values in MEMBERS.items()}


def _plan(mechanism, hp):
  """A concrete plan (checked by build_plan) with member ``hp``'s numbers."""
  privacy = privacy_defaults()
  privacy.update({"mechanism": mechanism, "clip_norm": hp["clip"],
                  "noise_multiplier": hp["z"]})
  privacy.adaptive.update({"target_quantile": hp["quantile"],
                           "clip_learning_rate": hp["clip_lr"],
                           "clipped_count_stddev": hp["count_std"]})
  privacy.ftrl.momentum = hp["momentum"]
  return plan.build_plan(privacy, sampling=_SAMPLING[mechanism],
                         num_clients=40, cohort_size=NUM_CLIENTS,
                         sampling_rate=0.0, num_rounds=3)


def _traced_plan(concrete, hp):
  """``concrete`` with ``hp``'s (traced) numbers, as a sweep would build it."""
  settings = dict(concrete.settings)
  return dataclasses.replace(
      concrete, clip_norm=hp["clip"],
      spec=dataclasses.replace(concrete.spec, noise_multiplier=hp["z"]),
      settings={**settings,
                "adaptive": {**dict(settings["adaptive"]),
                             "target_quantile": hp["quantile"],
                             "clip_learning_rate": hp["clip_lr"],
                             "clipped_count_stddev": hp["count_std"]},
                "ftrl": {**dict(settings["ftrl"]),
                         "momentum": hp["momentum"]}})


def _deltas(seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {"w": 0.8 * jax.random.normal(keys[0], (NUM_CLIENTS, 3, 4)),
          "b": 0.5 * jax.random.normal(keys[1], (NUM_CLIENTS, 5))}


def _two_rounds(aggregator, deltas, noise_rng):
  """Two rounds of the engine's calls on ``aggregator``: per-client
  transforms (vmapped over clients), masked sum, finalize."""
  link = base.as_transform(aggregator)
  state = link.init()
  client_states = jax.vmap(lambda d: link.client_init(d) if link.client_init
                           else ())(deltas)
  outputs = []
  for r in range(2):
    rng = jax.random.fold_in(noise_rng, r)
    client_keys = jax.random.split(rng, NUM_CLIENTS)
    keys = base.ClientKeys(noise=client_keys, public=client_keys)
    out, weights, client_states, client_metrics = jax.vmap(
        link.client_transform, in_axes=(0, 0, None, 0, 0))(
            deltas, jnp.ones([NUM_CLIENTS]), state, client_states, keys)
    summed = jax.tree.map(lambda x: jnp.tensordot(weights, x, 1), out)
    aggregate, state, metrics = link.finalize(
        summed, jnp.sum(weights), jnp.float32(NUM_CLIENTS), state,
        jax.random.fold_in(rng, 99))
    metrics.update({k: jnp.mean(v) for k, v in client_metrics.items()})
    outputs.append((aggregate, metrics))
    deltas = jax.tree.map(lambda d: 1.5 * d, deltas)
  return outputs, state


def _compress_link():
  return compression.compress(compression.with_error_feedback(
      compression.top_k(k=3)))


def _assert_member_matches(concrete, traced, k):
  (concrete_rounds, concrete_state), (traced_rounds, traced_state) = (
      concrete, jax.tree.map(lambda x: x[k], traced))
  for (agg, metrics), (t_agg, t_metrics) in zip(concrete_rounds,
                                                traced_rounds):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6,
                                                         atol=1e-7),
                 agg, t_agg)
    # A traced noise std cannot drop a metric for one member: a member
    # without noise reports signal_to_noise too (against std 0).
    assert set(metrics) <= set(t_metrics)
    assert set(t_metrics) - set(metrics) <= {"signal_to_noise"}
    for name, value in metrics.items():
      np.testing.assert_allclose(t_metrics[name], value, rtol=1e-6,
                                 err_msg=name)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6),
               concrete_state, traced_state)


def _check_members(mechanism, make_link):
  """Each member run alone with its concrete plan == the traced members."""
  plans = [_plan(mechanism, _member_hparams(k)) for k in range(3)]
  hparams = {name: jnp.asarray(v, jnp.float32)
             for name, v in MEMBERS.items()}
  noise_rngs = jax.random.split(jax.random.key(7), 3)
  deltas = _deltas()
  concrete = [_two_rounds(make_link(p), deltas, noise_rngs[k])
              for k, p in enumerate(plans)]
  traced = jax.jit(jax.vmap(lambda hp, rng: _two_rounds(
      make_link(_traced_plan(plans[0], hp)), deltas, rng)))(hparams,
                                                            noise_rngs)
  for k in range(3):
    _assert_member_matches(concrete[k], traced, k)


@pytest.mark.parametrize("mechanism", ["gaussian", "adaptive", "tree",
                                       "local"])
def test_traced_plan_matches_concrete_members(mechanism):
  _check_members(mechanism, mechanisms.build_aggregator)


@pytest.mark.parametrize("mechanism", ["gaussian", "tree"])
def test_traced_plan_with_compression_matches_concrete_members(mechanism):
  _check_members(mechanism, lambda p: mechanisms.build_aggregator(
      p, _compress_link()))


def test_traced_ftrl_optimizer_matches_concrete_members():
  plans = [_plan("tree", _member_hparams(k)) for k in range(3)]
  lrs = jnp.asarray([0.5, 1.0, 0.1], jnp.float32)
  params = {"w": jnp.ones([3, 2]), "b": jnp.zeros([2])}
  grads = [jax.tree.map(lambda p, i=i: (i + 1.0) * jnp.cos(p + i), params)
           for i in range(3)]

  def run(opt):
    state, out = opt.init(params), []
    for g in grads:
      updates, state = opt.update(g, state, params)
      out.append(updates)
    return out

  concrete = [run(mechanisms.build_ftrl_server_optimizer(p, float(lrs[k])))
              for k, p in enumerate(plans)]
  traced = jax.jit(jax.vmap(lambda hp, lr: run(
      mechanisms.build_ftrl_server_optimizer(_traced_plan(plans[0], hp),
                                             lr))))(
      {n: jnp.asarray(v, jnp.float32) for n, v in MEMBERS.items()}, lrs)
  for k in range(3):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6),
                 concrete[k], jax.tree.map(lambda x: x[k], traced))


def test_traced_dp_ftrl_optimizer_matches_concrete():
  key = jax.random.key(5)
  params = {"w": jnp.ones([4])}
  settings = [(0.5, 0.3, 0.9), (1.0, 0.0, 0.0)]  # lr, noise_std, momentum

  def run(lr, std, mom):
    opt = tree.dp_ftrl(lr, std, 3, mom, noise_key=key)
    state, out = opt.init(params), []
    for i in range(4):
      updates, state = opt.update({"w": jnp.full([4], i + 1.0)}, state)
      out.append(updates)
    return out

  concrete = [run(*s) for s in settings]
  traced = jax.jit(jax.vmap(run))(*map(jnp.asarray, zip(*settings)))
  for k in range(2):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6),
                 concrete[k], jax.tree.map(lambda x: x[k], traced))
  with pytest.raises(ValueError, match="needs noise_key"):
    jax.jit(lambda s: tree.dp_ftrl(0.1, s, 3).init(params))(0.0)


@pytest.mark.parametrize("build, error, match", [
    (lambda: aggregators.gaussian_sum(0.0, 1.0, 4), ValueError, "clip_norm"),
    (lambda: aggregators.gaussian_sum(1.0, -1.0, 4), ValueError,
     "noise_multiplier"),
    (lambda: aggregators.adaptive_clipping(1.0, 1.0, 4, target_quantile=1.0),
     ValueError, "target_quantile"),
    (lambda: aggregators.adaptive_clipping(1.0, 1.0, 4,
                                           clipped_count_stddev=0.4),
     ValueError, "clipped_count_stddev"),
    (lambda: aggregators.split_noise_multiplier(1.0, 0.5), ValueError,
     "too small"),
    (lambda: aggregators.local_gaussian(-1.0, 1.0), ValueError, "clip_norm"),
    (lambda: clipping.clip(0.0), ValueError, "clip_norm must be > 0"),
    (lambda: tree.tree_aggregator(1.0, -0.5, 4, 2), ValueError,
     "noise_multiplier"),
    (lambda: tree.tree_aggregator(float("inf"), 1.0, 4, 2), ValueError,
     "clip_norm"),
    (lambda: tree.tree_aggregator(jnp.float32(1.0), 1.0, 4, 2), TypeError,
     "clip_norm must be a number"),
    (lambda: tree.dp_ftrl(0.1, 0.0, 3, momentum=1.0), ValueError,
     "momentum"),
])
def test_concrete_bad_values_still_raise(build, error, match):
  with pytest.raises(error, match=match):
    build()


def test_concrete_zero_momentum_keeps_plain_sgd_state():
  concrete = _plan("tree", {**_member_hparams(1), "momentum": 0.0})
  opt = mechanisms.build_ftrl_server_optimizer(concrete, 0.1)
  reference = optax.sgd(0.1)
  params = {"w": jnp.ones([2])}
  assert (jax.tree.structure(opt.init(params)) ==
          jax.tree.structure(reference.init(params)))


def test_config_dict_and_plain_dict_settings_agree():
  concrete = _plan("adaptive", _member_hparams(0))
  assert isinstance(concrete.settings, ml_collections.ConfigDict)
  as_dict = dataclasses.replace(concrete, settings={
      **dict(concrete.settings),
      "adaptive": dict(concrete.settings.adaptive)})
  deltas = _deltas(1)
  rng = jax.random.key(2)
  jax.tree.map(np.testing.assert_array_equal,
               _two_rounds(mechanisms.build_aggregator(concrete), deltas, rng),
               _two_rounds(mechanisms.build_aggregator(as_dict), deltas, rng))
