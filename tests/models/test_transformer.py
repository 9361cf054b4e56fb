"""The decoder-only transformer language model: parameter counts, causality,
padding that is an exact no-op, tied embeddings, training, jit and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lab.models import get_model, model_kwargs
from fedjax_lab.models.base import batch_loss, eval_sums, masked_mean
from fedjax_lab.models.transformer import (transformer_lm_model,
                                           transformer_lm_num_params)
from tests.models.conftest import count_params

V, T = 40, 8
PAD, OOV, BOS, EOS = 0, V - 3, V - 2, V - 1
TINY = {"embed_dim": 16, "num_heads": 2, "mlp_dim": 24, "num_layers": 1,
        "dropout_rate": 0.0}


def tiny(**kwargs):
  return transformer_lm_model((T,), V, **{**TINY, **kwargs})


@pytest.fixture(scope="module")
def params():
  """The tiny model's parameters (initialised once: compiling the random
  initialisers dominates these tests' time on CPU)."""
  return jax.jit(tiny().init)(jax.random.key(0))


def clients(params, count, seed=0):
  """``count`` different parameter sets stacked on a leading axis."""
  leaves, treedef = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(treedef, [
      jnp.stack([leaf + 0.05 * rng.standard_normal(leaf.shape, np.float32)
                 for _ in range(count)]) for leaf in leaves])


def tokens(shape, seed=0, low=1, high=OOV):
  return jax.random.randint(jax.random.key(seed), shape, low, high)


def hand_count(v, t, d, m, layers, tied):
  """Parameters written out layer by layer."""
  embeddings = v * d + t * d                    # tokens, positions
  attention = (d * 3 * d + 3 * d) + (d * d + d)  # fused qkv, output
  mlp = (d * m + m) + (m * d + d)
  norms = 2 * (2 * d)                           # scale + offset, twice
  output = 0 if tied else d * v + v
  return embeddings + layers * (attention + mlp + norms) + 2 * d + output


@pytest.mark.parametrize("tied", [True, False])
def test_param_count_defaults(tied):
  model = get_model("transformer_lm", input_shape=(20,), num_classes=10_004,
                    tie_embeddings=tied)
  params = jax.eval_shape(model.init, jax.random.key(0))
  expected = hand_count(10_004, 20, 96, 1536, 3, tied)
  assert count_params(params) == expected == transformer_lm_num_params(
      10_004, 20, 96, 1536, 3, tied)
  assert expected == (1_965_024 if tied else 2_935_412)


def test_tied_embeddings_share_the_table(params):
  tied = jax.eval_shape(tiny(tie_embeddings=True).init, jax.random.key(0))
  untied = jax.eval_shape(tiny(tie_embeddings=False).init, jax.random.key(0))
  assert "output" not in tied and "output" in untied
  assert count_params(untied) - count_params(tied) == 16 * V + V
  assert count_params(tied) == hand_count(V, T, 16, 24, 1, True)
  # The logits are h @ embedding^T: with every input token PAD, the other
  # rows of the table still get a gradient, through the output side only.
  model = tiny(tie_embeddings=True)
  grad = jax.jit(jax.grad(
      lambda table: jnp.sum(model.apply(
          {**params, "token_embed": {"embedding": table}},
          {"x": jnp.full((2, T), PAD)}, None, False) ** 2)))(
              params["token_embed"]["embedding"])
  assert float(jnp.abs(grad[1:]).sum()) > 0


def test_causal_future_tokens_do_not_change_the_past():
  model = tiny(num_layers=2)
  params = jax.jit(model.init)(jax.random.key(0))
  apply = jax.jit(lambda p, x: model.apply(p, {"x": x}, None, False))
  x = tokens((3, T))
  logits = apply(params, x)
  for t in range(T - 1):
    future = jax.random.randint(jax.random.key(t + 7), (3, T), 1, OOV)
    changed = jnp.where(jnp.arange(T) > t, future, x)
    other = apply(params, changed)
    np.testing.assert_allclose(other[:, :t + 1], logits[:, :t + 1],
                               atol=1e-6, rtol=1e-6)
    assert not np.allclose(other[:, t + 1:], logits[:, t + 1:])


def test_appended_padding_changes_no_loss_or_metric(params):
  model = tiny()
  seq = jnp.array([[BOS, 5, 6, OOV, 7, EOS, PAD, PAD, PAD],
                   [BOS, 9, 10, 11, 12, 13, 14, 15, EOS]])
  short = {"x": seq[:, :6], "y": seq[:, 1:7]}   # T = 6
  padded = {"x": jnp.pad(short["x"], ((0, 0), (0, 2))),
            "y": jnp.pad(short["y"], ((0, 0), (0, 2)))}  # T = 8, pads
  fns = {"loss": model.example_loss, **model.example_metrics}
  apply = jax.jit(lambda p, b: model.apply(p, b, None, False))
  logits_short = apply(params, short)
  logits_padded = apply(params, padded)
  for name, fn in fns.items():
    a_sum, a_weight = fn(logits_short, short)
    b_sum, b_weight = fn(logits_padded, padded)
    np.testing.assert_allclose(b_sum, a_sum, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(b_weight, a_weight, err_msg=name)


def test_pad_targets_and_masked_examples_contribute_nothing(params):
  model = tiny()
  labels = jnp.array([[5, 6, OOV, EOS, PAD, PAD, PAD, PAD],
                      [BOS, 7, 8, 9, 10, EOS, PAD, PAD],
                      [3, 4, 5, 6, 7, 8, 9, 10]])
  batch = {"x": tokens((3, T)), "y": labels}
  logits = jax.random.normal(jax.random.key(3), (3, T, V))
  # Any logits at pad targets: the same loss and metrics.
  noisy = jnp.where((labels == PAD)[..., None], 1e3 * logits, logits)
  for fn in [model.example_loss, *model.example_metrics.values()]:
    np.testing.assert_allclose(fn(noisy, batch)[0], fn(logits, batch)[0],
                               rtol=1e-6)
  # A masked example (mask 0) changes nothing, whatever it holds.
  loss_fn = jax.jit(lambda b, m: batch_loss(model, params, b, m, None))
  sums_fn = jax.jit(lambda b, m: eval_sums(model, params, b, m))
  mask = jnp.array([1.0, 1.0, 0.0])
  # The masked third example replaced by a copy of the first: three rows
  # again (one compile), the same result as two real examples.
  other = {"x": batch["x"].at[2].set(batch["x"][0]),
           "y": batch["y"].at[2].set(batch["y"][0])}
  expected = loss_fn(other, jnp.array([1.0, 1.0, 0.0]))
  np.testing.assert_allclose(loss_fn(batch, mask), expected, rtol=1e-6)
  two_rows = jax.tree.map(lambda a: a[:2], batch)
  np.testing.assert_allclose(
      loss_fn(two_rows, jnp.ones(2)), expected,
      rtol=1e-6)
  sums, reference = sums_fn(batch, mask), sums_fn(other, mask)
  for name in sums:
    np.testing.assert_allclose(sums[name], reference[name], rtol=1e-6)
  loss_sum, weight = model.example_loss(jnp.ones((3, T, V)), batch)
  assert float(masked_mean(loss_sum, weight, jnp.zeros(3))) == 0.0


def test_metrics_exclude_special_targets():
  model = tiny()
  labels = jnp.array([[5, 6, OOV, EOS, PAD, PAD, PAD, PAD],
                      [BOS, 7, 8, 9, EOS, PAD, PAD, PAD]])
  predictions = jnp.array([[5, 1, OOV, EOS, 3, 4, 1, 1],   # 5, OOV, EOS
                           [BOS, 7, 1, 9, 2, PAD, 1, 1]])  # BOS, 7, 9
  logits = jax.nn.one_hot(predictions, V) * 10.0
  batch = {"x": jnp.zeros_like(labels), "y": labels}
  expected = {  # metric -> (correct per row, counted tokens per row)
      "accuracy": ([1, 2], [2, 3]),                  # no pad/OOV/BOS/EOS
      "accuracy_with_eos": ([2, 2], [3, 4]),         # no pad/OOV/BOS
      "accuracy_with_oov_and_eos": ([3, 3], [4, 5]),  # no pad
  }
  assert set(model.example_metrics) == set(expected)
  for metric, (correct, counted) in expected.items():
    value_sum, weight = model.example_metrics[metric](logits, batch)
    np.testing.assert_allclose(value_sum, correct, err_msg=metric)
    np.testing.assert_allclose(weight, counted, err_msg=metric)
  _, loss_weight = model.example_loss(logits, batch)
  np.testing.assert_allclose(loss_weight, [4, 5])


def test_memorises_a_tiny_batch(params):
  model = tiny()
  seq = tokens((4, T + 1), seed=5)
  batch = {"x": seq[:, :-1], "y": seq[:, 1:]}
  mask = jnp.ones(4)
  optimizer = optax.adam(3e-2)

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(batch_loss, argnums=1)(
        model, params, batch, mask, None)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = optimizer.init(params)
  losses = []
  for _ in range(40):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.25 * losses[0], losses


def test_jit_vmap_over_clients_and_dropout(params):
  model = tiny(dropout_rate=0.5)  # the same parameters
  params = clients(params, 3)
  seq = tokens((3, 2, T + 1), seed=2)
  batches = {"x": seq[..., :-1], "y": seq[..., 1:]}
  masks = jnp.ones((3, 2))
  client_loss = lambda p, b, m: batch_loss(model, p, b, m, None)  # noqa
  losses = jax.jit(jax.vmap(client_loss))(params, batches, masks)
  one_client = jax.jit(client_loss)
  for client in range(3):
    one = jax.tree.map(lambda a: a[client], (params, batches, masks))
    np.testing.assert_allclose(losses[client], one_client(*one), rtol=1e-5)
  one_params = jax.tree.map(lambda a: a[0], params)
  one_batch = jax.tree.map(lambda a: a[0], batches)
  three_ways = jax.jit(lambda p, b, key: (
      model.apply(p, b, None, False), model.apply(p, b, None, True),
      model.apply(p, b, key, True)))
  eval_logits, train_no_rng, dropped = three_ways(one_params, one_batch,
                                                  jax.random.key(1))
  np.testing.assert_array_equal(train_no_rng, eval_logits)  # deterministic
  assert not np.allclose(dropped, eval_logits)


def test_registry_options_and_errors(params):
  assert {"embed_dim", "num_heads", "mlp_dim", "num_layers", "dropout_rate",
          "tie_embeddings", "pad_id", "oov_id", "bos_id",
          "eos_id"} == set(model_kwargs("transformer_lm"))
  with pytest.raises(ValueError, match="num_heads"):
    transformer_lm_model((T,), V, embed_dim=10, num_heads=4)
  with pytest.raises(ValueError, match="special token"):
    transformer_lm_model((T,), V, eos_id=V)
  with pytest.raises(ValueError, match="sequence_length"):
    transformer_lm_model((T, 2), V)
  model = tiny()
  with pytest.raises(ValueError, match="context length"):
    model.apply(params, {"x": tokens((1, T + 1))}, None, False)
