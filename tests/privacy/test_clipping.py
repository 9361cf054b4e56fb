"""The clip link: clips each client's whole update, nothing else."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_lab.algorithms import base
from fedjax_lab.privacy import clipping

KEYS = base.ClientKeys(noise=jax.random.key(0), public=jax.random.key(1))


def test_clip_link_clips_the_whole_tree_and_keeps_weight_and_state():
  link = clipping.clip(1.0)
  delta = {"a": jnp.full([4], 3.0), "b": jnp.full([2, 2], 4.0)}  # norm 10
  clipped, weight, client_state, metrics = link.client_transform(
      delta, jnp.float32(7.0), link.init(), ("kept",), KEYS)
  assert float(clipping.global_norm(clipped)) == pytest.approx(1.0)
  np.testing.assert_allclose(clipped["a"], 0.3, rtol=1e-6)
  assert float(weight) == 7.0 and client_state == ("kept",) and metrics == {}
  short = {"a": jnp.full([4], 0.1), "b": jnp.zeros([2, 2])}
  same, _, _, _ = link.client_transform(short, 1.0, (), (), KEYS)
  np.testing.assert_array_equal(same["a"], short["a"])


def test_clip_link_finalize_passes_the_sum_through():
  link = clipping.clip(2.0)
  value = {"a": jnp.arange(3.0)}
  out, state, metrics = link.finalize(value, 5.0, 3.0, (), jax.random.key(2))
  assert out is value and state == () and metrics == {}
  assert link.client_init is None and not link.uniform_weights_only


@pytest.mark.parametrize("clip_norm", [0.0, -1.0, float("nan")])
def test_clip_norm_must_be_positive(clip_norm):
  with pytest.raises(ValueError, match="clip_norm"):
    clipping.clip(clip_norm)
