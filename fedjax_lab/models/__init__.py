"""Model zoo and registry.

``get_model(name, input_shape=..., num_classes=..., **kwargs)`` builds one of
the registered models as a pure :class:`Model`:

* ``"logistic"``: multinomial logistic regression (:mod:`.linear`);
* ``"mlp"``: ReLU MLP, kwarg ``hidden_sizes`` (:mod:`.linear`);
* ``"cnn"``: the FedAvg / Reddi et al. 2021 EMNIST CNN, kwargs ``conv_impl``,
  ``dropout_after_pool``, ``dropout_after_dense`` (:mod:`.cnn`);
* ``"char_lstm"``: the Shakespeare character LSTM, kwargs ``embed_dim``,
  ``hidden_size``, ``num_layers``, ``pad_id``, ``oov_id``, ``bos_id``,
  ``eos_id`` (:mod:`.lstm`);
* ``"word_lstm"``: the Reddi et al. 2021 Stack Overflow next-word LSTM
  (4,050,748 parameters), kwargs ``embed_dim``, ``hidden_size``,
  ``num_layers``, ``tie_embeddings``, ``pad_id``, ``oov_id``, ``bos_id``,
  ``eos_id`` (:mod:`.word_lstm`);
* ``"transformer_lm"``: a decoder-only transformer language model (defaults:
  pfl-research's Stack Overflow transformer), kwargs ``embed_dim``,
  ``num_heads``, ``mlp_dim``, ``num_layers``, ``dropout_rate``,
  ``tie_embeddings``, ``pad_id``, ``oov_id``, ``bos_id``, ``eos_id``
  (:mod:`.transformer`);
* ``"resnet18"``: the group-norm ResNet-18 of Reddi et al. 2021 on CIFAR-100,
  kwargs ``conv_impl``, ``norm_groups``, ``norm_affine``, ``downsample``
  (:mod:`.resnet`).

The word-level language models share their loss and metrics
(:mod:`.sequence`): ``input_shape=(T,)``, ``num_classes`` the number of
token ids, and special ids defaulting to TFF's Stack Overflow layout.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from fedjax_lab.models.base import Model, from_flax
from fedjax_lab.models.cnn import cnn_model
from fedjax_lab.models.linear import logistic_model, mlp_model
from fedjax_lab.models.lstm import char_lstm_model
from fedjax_lab.models.resnet import resnet18_model
from fedjax_lab.models.transformer import transformer_lm_model
from fedjax_lab.models.word_lstm import word_lstm_model

_REGISTRY: dict[str, Callable[..., Model]] = {
    "logistic": logistic_model,
    "mlp": mlp_model,
    "cnn": cnn_model,
    "char_lstm": char_lstm_model,
    "word_lstm": word_lstm_model,
    "transformer_lm": transformer_lm_model,
    "resnet18": resnet18_model,
}
_COMMON_ARGS = ("input_shape", "num_classes")

MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def model_kwargs(name: str) -> tuple[str, ...]:
  """The extra keyword arguments model ``name`` accepts (besides shape/classes)."""
  constructor = _lookup(name)
  return tuple(arg for arg in inspect.signature(constructor).parameters
               if arg not in _COMMON_ARGS)


def get_model(name: str, *, input_shape: tuple[int, ...], num_classes: int,
              **kwargs: Any) -> Model:
  """Builds registered model ``name`` as a :class:`Model`.

  Args:
    name: one of :data:`MODEL_NAMES`.
    input_shape: shape of one example ``x`` (no batch axis), e.g.
      ``(28, 28, 1)`` or ``(80,)``.
    num_classes: output classes (the number of token ids for the language
      models ``"char_lstm"``, ``"word_lstm"`` and ``"transformer_lm"``).
    **kwargs: model-specific options, see :func:`model_kwargs`.

  Raises:
    ValueError: unknown ``name`` or invalid option values.
    TypeError: an option the model does not accept.
  """
  constructor = _lookup(name)
  accepted = model_kwargs(name)
  unexpected = sorted(set(kwargs) - set(accepted))
  if unexpected:
    raise TypeError(
        f"model {name!r} got unexpected keyword argument(s) {unexpected}; "
        f"it accepts {list(accepted)}")
  return constructor(input_shape=tuple(input_shape),
                     num_classes=int(num_classes), **kwargs)


def _lookup(name: str) -> Callable[..., Model]:
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; valid names: {list(MODEL_NAMES)}")
  return _REGISTRY[name]


__all__ = ["MODEL_NAMES", "Model", "from_flax", "get_model", "model_kwargs"]
