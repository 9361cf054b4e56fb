"""The main job: DP-FedAvg on real MNIST digits, reporting (epsilon, delta).

See dp_mnist.py; this is what ``python -m experiments.run`` runs with no
``--config``.
"""

from configs import dp_mnist


def get_config(mode: str = ""):
  return dp_mnist.get_config(mode)
