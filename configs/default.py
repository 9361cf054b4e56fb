"""The main job: FedAvg CNN on real MNIST digits with Dirichlet label skew.

See mnist_cnn_fedavg.py; this is what ``python -m experiments.run`` runs with
no ``--config``.
"""

from configs import mnist_cnn_fedavg


def get_config(mode: str = ""):
  return mnist_cnn_fedavg.get_config(mode)
