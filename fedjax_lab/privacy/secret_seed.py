"""The secret seed of a DP run: its noise keys and its cohort sampling.

A Gaussian mechanism protects nothing if its noise can be regenerated:
subtracting it recovers the exact sum of clipped updates. Privacy
amplification by sampling (the Poisson and fixed-cohort accounting) likewise
assumes nobody knows which clients a round sampled. So a DP run draws both
from a seed that is never published: by default 64 bits from the operating
system's entropy (``secrets``) at the start of the run, kept only in the
run's checkpoints (a resumed run continues with the same noise and cohorts,
so resumed == uninterrupted), never in ``config.json``, summaries, metrics or
sweep specs. ``privacy.noise_seed >= 0`` fixes it instead, for simulation
studies that need reproducible noise (common random numbers across a sweep):
then the noise can be regenerated from the config, the outputs say so, and
the run is not a private release.

Everything else random in a run (model initialisation, local batch order,
client-side randomness) stays a function of the public ``config.seed``: the
DP guarantee holds for any client computation.
"""

from __future__ import annotations

import secrets

import jax
import numpy as np

# Folded into the seed's key so the noise stream is apart from any other
# stream a user might derive from the same integer.
_NOISE_SALT = 0x6E015E
SEED_BITS = 64


def draw_secret_seed() -> int:
  """A fresh ``SEED_BITS``-bit seed from the operating system's entropy."""
  return secrets.randbits(SEED_BITS)


def resolve_seed(noise_seed: int) -> tuple[int, bool]:
  """``(seed, seeded)``: ``noise_seed`` itself when it is ``>= 0`` (seeded,
  reproducible), else a fresh secret seed."""
  if noise_seed is not None and int(noise_seed) >= 0:
    return int(noise_seed), True
  return draw_secret_seed(), False


def noise_key(seed: int) -> jax.Array:
  """The run's base key for DP noise (all ``SEED_BITS`` bits of ``seed``).

  ``jax.random.key(int)`` keeps only 32 bits of a seed without x64, so the
  key is built from the seed's two 32-bit halves.
  """
  seed = int(seed)
  if not 0 <= seed < 2**SEED_BITS:
    raise ValueError(f"a noise seed must be in [0, 2**{SEED_BITS}), got "
                     f"{seed}.")
  words = np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)
  key = jax.random.wrap_key_data(words, impl="threefry2x32")
  return jax.random.fold_in(key, _NOISE_SALT)


def sampling_seed(seed: int) -> int:
  """The seed of the run's cohort sampler (numpy takes all 64 bits)."""
  return int(seed)
