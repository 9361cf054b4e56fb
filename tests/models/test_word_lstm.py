"""The Stack Overflow word LSTM: Reddi et al.'s 4,050,748 parameters,
causality, padding that is an exact no-op, tied embeddings, training, jit
and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.models import get_model, model_kwargs, sequence
from fedjax_lab.models.base import batch_loss, eval_sums
from fedjax_lab.models.word_lstm import word_lstm_model, word_lstm_num_params
from tests.models.conftest import count_params

V, T = 30, 7
PAD, OOV, BOS, EOS = 0, V - 3, V - 2, V - 1
TINY = {"embed_dim": 6, "hidden_size": 12}


def tiny(**kwargs):
  return word_lstm_model((T,), V, **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def params():
  """The tiny model's parameters (initialised once: compiling the random
  initialisers dominates these tests' time on CPU)."""
  return jax.jit(tiny().init)(jax.random.key(0))


def tokens(shape, seed=0):
  return jax.random.randint(jax.random.key(seed), shape, 1, OOV)


def test_reddi_stackoverflow_param_count():
  model = get_model("word_lstm", input_shape=(20,), num_classes=10_004)
  params = jax.eval_shape(model.init, jax.random.key(0))
  vocab, embed, hidden = 10_000 + 4, 96, 670  # pad, 1 OOV bucket, BOS, EOS
  by_layer = {
      "embed": vocab * embed,                            # 960,384
      "lstm_0": 4 * (embed * hidden + hidden * hidden + hidden),  # 2,055,560
      "projection_0": hidden * embed + embed,            # 64,416
      "output": embed * vocab + vocab,                   # 970,388
  }
  assert set(params) == set(by_layer)
  for name, expected in by_layer.items():
    assert count_params(params[name]) == expected, name
  assert count_params(params) == sum(by_layer.values()) == 4_050_748
  assert word_lstm_num_params() == 4_050_748


def test_param_count_formula_and_tied_embeddings():
  for kwargs in ({}, {"num_layers": 2}, {"tie_embeddings": True},
                 {"num_layers": 3, "tie_embeddings": True}):
    params = jax.eval_shape(tiny(**kwargs).init, jax.random.key(0))
    assert count_params(params) == word_lstm_num_params(V, 6, 12, **kwargs)
  tied = jax.eval_shape(tiny(tie_embeddings=True).init, jax.random.key(0))
  untied = jax.eval_shape(tiny().init, jax.random.key(0))
  assert "output" not in tied
  assert count_params(untied) - count_params(tied) == 6 * V + V
  assert word_lstm_num_params(tie_embeddings=True) == 4_050_748 - 970_388


def test_default_special_ids_follow_tff():
  assert sequence.STACKOVERFLOW_SPECIAL_IDS == (0, 10_001, 10_002, 10_003)
  assert sequence.default_special_ids(10_004) == (10_001, 10_002, 10_003)
  assert sequence.default_special_ids(10_004, oov_id=5) == (5, 10_002,
                                                            10_003)
  assert {"embed_dim", "hidden_size", "num_layers", "tie_embeddings",
          "pad_id", "oov_id", "bos_id", "eos_id"} == set(
              model_kwargs("word_lstm"))
  with pytest.raises(ValueError, match="special token"):
    word_lstm_model((T,), V, oov_id=V + 1)
  with pytest.raises(ValueError, match="hidden_size"):
    word_lstm_model((T,), V, hidden_size=0)


def test_causal_and_appended_padding_is_a_no_op(params):
  model = tiny()
  apply = jax.jit(lambda p, b: model.apply(p, b, None, False))
  x = tokens((2, T))
  logits = apply(params, {"x": x})
  t = 3
  changed = jnp.where(jnp.arange(T) > t, tokens((2, T), seed=4), x)
  np.testing.assert_allclose(apply(params, {"x": changed})[:, :t + 1],
                             logits[:, :t + 1], atol=1e-6)
  # A sequence of T tokens vs the same one with trailing padding (T + 3):
  # the same loss and metric sums and weights.
  short = {"x": x, "y": x.at[:, -2:].set(jnp.array([EOS, PAD]))}
  padded = jax.tree.map(lambda a: jnp.pad(a, ((0, 0), (0, 3))), short)
  logits_short, logits_padded = apply(params, short), apply(params, padded)
  for fn in [model.example_loss, *model.example_metrics.values()]:
    a_sum, a_weight = fn(logits_short, short)
    b_sum, b_weight = fn(logits_padded, padded)
    np.testing.assert_allclose(b_sum, a_sum, rtol=1e-6)
    np.testing.assert_array_equal(b_weight, a_weight)


def test_masked_example_contributes_nothing(params):
  model = tiny()
  seq = tokens((3, T + 1), seed=1)
  batch = {"x": seq[:, :-1], "y": seq[:, 1:].at[0, -3:].set(PAD)}
  other = jax.tree.map(lambda a: a.at[2].set(a[1]), batch)
  mask = jnp.array([1.0, 1.0, 0.0])
  loss_fn = jax.jit(lambda b, m: batch_loss(model, params, b, m, None))
  np.testing.assert_allclose(loss_fn(batch, mask), loss_fn(other, mask),
                             rtol=1e-6)
  # = the token mean over the two real rows (their non-pad targets only).
  loss_sum, weight = model.example_loss(
      model.apply(params, batch, None, False), batch)
  np.testing.assert_allclose(weight[:2], [T - 3, T])
  np.testing.assert_allclose(loss_fn(batch, mask),
                             loss_sum[:2].sum() / weight[:2].sum(), rtol=1e-5)
  sums = jax.jit(lambda b, m: eval_sums(model, params, b, m))
  for name, (value, count) in sums(batch, mask).items():
    np.testing.assert_allclose(value, sums(other, mask)[name][0], rtol=1e-6)
    assert float(count) == float(sums(other, mask)[name][1])


def test_memorises_a_tiny_batch(params):
  model = tiny()
  seq = tokens((4, T + 1), seed=5)
  batch = {"x": seq[:, :-1], "y": seq[:, 1:]}
  optimizer = optax.adam(5e-2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(batch_loss, argnums=1)(
        model, params, batch, jnp.ones(4), None)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.25 * losses[0], losses


def test_jit_and_vmap_over_clients(params):
  model = tiny()
  rng = np.random.default_rng(0)
  params = jax.tree.map(  # 3 clients, each its own parameters
      lambda leaf: jnp.stack([leaf + 0.05 * rng.standard_normal(
          leaf.shape, np.float32) for _ in range(3)]), params)
  seq = tokens((3, 2, T + 1), seed=2)
  batches = {"x": seq[..., :-1], "y": seq[..., 1:]}
  masks = jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
  client_loss = lambda p, b, m: batch_loss(model, p, b, m, None)  # noqa
  losses = jax.jit(jax.vmap(client_loss))(params, batches, masks)
  one_client = jax.jit(client_loss)
  for client in range(3):
    one = jax.tree.map(lambda a: a[client], (params, batches, masks))
    np.testing.assert_allclose(losses[client], one_client(*one), rtol=1e-5)
