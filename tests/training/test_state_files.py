"""Single-file states: a pytree with typed PRNG keys round-trips through
``.npz``; a mismatched template or a failed write is refused cleanly."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.training import state_files


def _tree(scale):
  return {"params": {"w": scale * jnp.ones((2, 3)), "b": jnp.zeros(3)},
          "step": jnp.int32(scale), "key": jax.random.key(scale)}


def test_round_trip_keeps_values_dtypes_and_keys(tmp_path):
  path = state_files.save_pytree(str(tmp_path / "sub" / "state.npz"),
                                 _tree(2))
  restored = state_files.load_pytree(path, _tree(0))
  np.testing.assert_array_equal(restored["params"]["w"], 2 * np.ones((2, 3)))
  assert restored["step"].dtype == jnp.int32 and int(restored["step"]) == 2
  assert state_files.is_prng_key(restored["key"])
  np.testing.assert_array_equal(jax.random.key_data(restored["key"]),
                                jax.random.key_data(jax.random.key(2)))
  assert not state_files.is_prng_key(restored["params"]["w"])


def test_mismatched_template_and_missing_file_are_refused(tmp_path):
  path = state_files.save_pytree(str(tmp_path / "state.npz"), _tree(1))
  with pytest.raises(ValueError, match="holds 4 arrays"):
    state_files.load_pytree(path, {"w": jnp.ones(3)})
  wrong_shape = _tree(1)
  wrong_shape["params"]["b"] = jnp.zeros(4)
  with pytest.raises(ValueError, match="shape"):
    state_files.load_pytree(path, wrong_shape)
  with pytest.raises(FileNotFoundError):
    state_files.load_pytree(str(tmp_path / "none.npz"), _tree(1))


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
  path = state_files.save_pytree(str(tmp_path / "state.npz"), _tree(1))
  before = open(path, "rb").read()

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(np, "savez", full_disk)
  with pytest.raises(OSError):
    state_files.save_pytree(path, _tree(5))
  assert open(path, "rb").read() == before
  assert os.listdir(tmp_path) == ["state.npz"]
