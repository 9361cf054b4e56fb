"""Fixtures shared by every test package (tiny models on 8 features)."""

import jax.numpy as jnp
import pytest

from fedjax_lab.models import base as model_base
from tests.engine.conftest import TinyMLP, TinySoftmax


@pytest.fixture
def deterministic_model():
  """8 -> 3 linear classifier, no dropout."""
  return model_base.from_flax(TinySoftmax(), jnp.zeros([2, 8]))


@pytest.fixture
def tiny_model():
  """8 -> 16 -> 3 MLP with dropout (exercises the rng path)."""
  return model_base.from_flax(TinyMLP(), jnp.zeros([2, 8]))
