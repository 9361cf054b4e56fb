"""The character LSTM: parameter counts and sequence metrics that ignore
padding and special tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.models.lstm import char_lstm_model, char_lstm_num_params
from tests.models.conftest import count_params

PAD, OOV, BOS, EOS = 0, 87, 88, 89


@pytest.mark.parametrize("kwargs", [{}, {"embed_dim": 5, "hidden_size": 12,
                                         "num_layers": 3}])
def test_char_lstm_param_count(kwargs):
  model = char_lstm_model((80,), 90, **kwargs)
  params = jax.eval_shape(model.init, jax.random.key(0))
  assert count_params(params) == char_lstm_num_params(90, **kwargs)
  if not kwargs:  # embedding + 2 LSTMs (4 gates, one bias each) + dense
    expected = (90 * 8 + 4 * 256 * (8 + 256 + 1) + 4 * 256 * (256 + 256 + 1)
                + 256 * 90 + 90)
    assert count_params(params) == expected == 820_522


def test_sequence_metrics_ignore_special_tokens():
  model = char_lstm_model((6,), 90, pad_id=PAD, oov_id=OOV, bos_id=BOS,
                          eos_id=EOS)
  labels = jnp.array([[5, 6, OOV, EOS, PAD, PAD],
                      [BOS, 7, 8, 9, EOS, PAD]])
  predictions = jnp.array([[5, 1, OOV, EOS, 3, 4],     # right: 5, OOV, EOS
                           [BOS, 7, 1, 9, 2, PAD]])    # right: BOS, 7, 9
  logits = jax.nn.one_hot(predictions, 90) * 10.0
  batch = {"x": jnp.zeros_like(labels), "y": labels}
  expected = {  # metric -> (correct per row, counted tokens per row)
      "accuracy": ([3, 3], [4, 5]),             # ignore pad
      "accuracy_no_eos": ([2, 3], [3, 4]),      # ignore pad, EOS
      "accuracy_in_vocab": ([1, 2], [2, 3]),    # ignore pad, OOV, BOS, EOS
  }
  assert set(model.example_metrics) == set(expected)
  for metric, (correct, counted) in expected.items():
    value_sum, weight = model.example_metrics[metric](logits, batch)
    np.testing.assert_allclose(value_sum, correct, err_msg=metric)
    np.testing.assert_allclose(weight, counted, err_msg=metric)
  loss_sum, loss_weight = model.example_loss(logits, batch)
  np.testing.assert_allclose(loss_weight, [4, 5])  # loss ignores pad only
  log_probs = jax.nn.log_softmax(logits)
  token_loss = -jnp.take_along_axis(log_probs, labels[..., None], -1)[..., 0]
  np.testing.assert_allclose(loss_sum, jnp.sum(token_loss * (labels != PAD), -1),
                             rtol=1e-6)
