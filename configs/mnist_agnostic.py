"""Agnostic FedAvg (Mohri et al. 2019) on MNIST-Dirichlet(0.3), CNN.

mnist_cnn_fedavg.py's task; each client's domain is its most frequent
training label (10 domains). The server keeps domain weights on the simplex
and moves them by exponentiated gradient toward the domains with the highest
loss, so the model minimises the worst mixture of domains rather than the
average client. Domain ids are per-client state.
"""

from configs import common
from configs import mnist_cnn_fedavg


def get_config(mode: str = ""):
  config = mnist_cnn_fedavg.get_config()
  config.algorithm = "agnostic_fedavg"
  config.agnostic_fedavg.update({"domain_kind": "majority_label",
                                 "domain_learning_rate": 0.1})
  return common.apply_mode(config, mode)
