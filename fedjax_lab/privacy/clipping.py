"""L2 clipping of a whole update pytree (one norm over every leaf), its size,
and clipping as a link of an aggregation chain.

The helpers live in :mod:`fedjax_lab.algorithms.tree_math` (compression
measures norms too, and algorithms do not import the privacy layer); they
are re-exported here under their privacy-facing names.
"""

from __future__ import annotations

import jax

from fedjax_lab.algorithms import base
from fedjax_lab.algorithms.tree_math import PyTree
from fedjax_lab.algorithms.tree_math import clip_to_norm
from fedjax_lab.algorithms.tree_math import global_norm
from fedjax_lab.algorithms.tree_math import num_parameters

__all__ = ["PyTree", "clip", "clip_to_norm", "global_norm", "num_parameters"]


def clip(clip_norm: float) -> base.Transform:
  """A chain link clipping every client's delta to L2 norm ``clip_norm``.

  The per-client clipping step of DP-FedAvg (McMahan et al. 2018, "Learning
  Differentially Private Recurrent Language Models", ICLR), on its own: put
  it before a compression link so the compressor (and its error feedback)
  only sees clipped updates. It reports no metrics and passes weights and
  the sum through; the DP link that follows does the clipping that bounds
  the sensitivity (and reports ``update_norm``).

  ``clip_norm`` may be traced (a sweep member's); the check then runs on the
  members' concrete values only.

  Raises:
    ValueError: ``clip_norm`` is not positive.
  """
  if not isinstance(clip_norm, jax.core.Tracer) and not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0, got {clip_norm}.")

  def client_transform(delta, weight, state, client_state, keys):
    del state, keys
    clipped, _ = clip_to_norm(delta, clip_norm)
    return clipped, weight, client_state, {}

  def finalize(value, total_weight, num_clients, state, rng):
    del total_weight, num_clients, rng
    return value, state, {}

  return base.Transform(init=lambda: (), client_transform=client_transform,
                        finalize=finalize)
