"""The model registry (``fedjax_lab.models``): every name builds a model of
the right output shape; unknown names and bad keyword arguments are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from fedjax_lab.models import MODEL_NAMES, Model, get_model
from fedjax_lab.models import model_kwargs


@pytest.mark.parametrize("name, input_shape, num_classes, kwargs, out_shape", [
    ("logistic", (28, 28, 1), 10, {}, (3, 10)),
    ("mlp", (28, 28), 10, {"hidden_sizes": (32, 16)}, (3, 10)),
    ("cnn", (28, 28, 1), 62, {}, (3, 62)),
    ("cnn", (28, 28), 10, {"conv_impl": "lax"}, (3, 10)),
    ("char_lstm", (80,), 90, {"hidden_size": 16}, (3, 80, 90)),
])
def test_output_shapes(name, input_shape, num_classes, kwargs, out_shape):
  model = get_model(name, input_shape=input_shape, num_classes=num_classes,
                    **kwargs)
  assert isinstance(model, Model)
  assert model.name == name
  params = model.init(jax.random.key(0))
  if name == "char_lstm":
    x = jnp.ones((3, *input_shape), jnp.int32)
  else:
    x = jnp.ones((3, *input_shape), jnp.float32)
  logits = jax.jit(lambda p, b: model.apply(p, b, None, False))(params, {"x": x})
  assert logits.shape == out_shape
  assert logits.dtype == jnp.float32


def test_unknown_model_lists_valid_names():
  with pytest.raises(ValueError, match="char_lstm"):
    get_model("resnet", input_shape=(28, 28, 1), num_classes=10)
  assert set(MODEL_NAMES) == {"logistic", "mlp", "cnn", "char_lstm",
                              "word_lstm", "transformer_lm", "resnet18"}


def test_bad_kwargs_are_reported():
  with pytest.raises(TypeError, match="hidden_sizes"):
    get_model("cnn", input_shape=(28, 28, 1), num_classes=10,
              hidden_sizes=(3,))
  with pytest.raises(ValueError, match="conv_impl"):
    get_model("cnn", input_shape=(28, 28, 1), num_classes=10,
              conv_impl="fft")
  with pytest.raises(ValueError, match="hidden size"):
    get_model("mlp", input_shape=(4,), num_classes=2, hidden_sizes=(0,))
  assert "conv_impl" in model_kwargs("cnn")
  assert "eos_id" in model_kwargs("char_lstm")

