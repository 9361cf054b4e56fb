"""Small models and hand-built cohorts for engine tests."""

import flax.linen as nn
import numpy as np


class TinyMLP(nn.Module):
  """8 -> 16 -> 3 MLP with a dropout layer, enough to exercise the rng path."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(3)(x)


class TinySoftmax(nn.Module):
  """8 -> 3 linear classifier, deterministic (no dropout)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(3)(x)


def make_clients(num_clients, seed=0, min_size=3, max_size=12):
  """Per-client (x [n, 8], y [n]) random classification data."""
  rng = np.random.default_rng(seed)
  clients = []
  for _ in range(num_clients):
    n = int(rng.integers(min_size, max_size + 1))
    clients.append((rng.normal(size=[n, 8]).astype(np.float32),
                    rng.integers(0, 3, size=[n]).astype(np.int32)))
  return clients


def build_cohort(clients, indices, batch_size, num_steps=None, pad_clients=0,
                 extra_steps=0):
  """Cohort arrays in the engine's format, batches taken in order (no shuffle).

  ``pad_clients`` adds all-masked clients; ``extra_steps`` all-masked steps.
  """
  steps = [-(-len(clients[i][1]) // batch_size) for i in indices]
  num_steps = (num_steps or max(steps)) + extra_steps
  total = len(indices) + pad_clients
  x = np.zeros([total, num_steps, batch_size, 8], np.float32)
  y = np.zeros([total, num_steps, batch_size], np.int32)
  mask = np.zeros([total, num_steps, batch_size], np.float32)
  num_examples = np.zeros([total], np.float32)
  client_indices = -np.ones([total], np.int64)
  for slot, i in enumerate(indices):
    cx, cy = clients[i]
    n = len(cy)
    for j in range(n):
      s, b = divmod(j, batch_size)
      if s < num_steps:
        x[slot, s, b], y[slot, s, b], mask[slot, s, b] = cx[j], cy[j], 1.0
    num_examples[slot] = n
    client_indices[slot] = i
  client_mask = np.zeros([total], np.float32)
  client_mask[:len(indices)] = 1.0
  return {"features": {"x": x, "y": y}, "example_mask": mask,
          "client_mask": client_mask, "num_examples": num_examples,
          "client_indices": client_indices}
