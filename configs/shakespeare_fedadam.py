"""FedAdam on Shakespeare (Reddi et al. 2021 setup and tuned learning rates).

Same task as shakespeare_fedavg.py; server Adam with lr 10^-2, beta1 0.9,
beta2 0.99 and adaptivity tau = eps = 10^-3; client SGD lr 1.
"""

from configs import shakespeare_fedavg


def get_config(mode: str = ""):
  return shakespeare_fedavg.with_server_optimizer(
      "adam", 0.01,
      {"b1": 0.9, "b2": 0.99, "eps": 1e-3}, mode)
