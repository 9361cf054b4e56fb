"""Fixtures shared by every test package (tiny models on 8 features), and
one XLA compilation cache for the whole test session."""

import os

import jax
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


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
  """Shares compiled executables between the many tests (and the
  subprocesses they start) that build the same programs; a cache hit is the
  same executable XLA would compile again. Under xdist the workers share one
  folder. Removed with pytest's temporary directories."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent
  folder = str(root / "xla_cache")
  os.makedirs(folder, exist_ok=True)
  settings = {"jax_compilation_cache_dir": folder,
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": -1}
  before = {name: getattr(jax.config, name) for name in settings}
  environment = {name.upper(): str(value) for name, value in settings.items()}
  saved_env = {name: os.environ.get(name) for name in environment}
  for name, value in settings.items():
    jax.config.update(name, value)
  os.environ.update(environment)
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  for name, value in saved_env.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
