"""FedYogi on Shakespeare (Reddi et al. 2021 setup and tuned learning rates).

Same task as shakespeare_fedavg.py; client SGD lr 1 (10^0); server Yogi with
lr 10^-2 and adaptivity tau = eps = 10^-3, the best Shakespeare values of the
paper's reference code (google-research/federated, optimization/), beta1 0.9
and beta2 0.99 as for FedAdam (the reference code kept Keras's 0.999).
Reddi et al. list FedYogi among the best methods on Shakespeare.
"""

from configs import shakespeare_fedavg


def get_config(mode: str = ""):
  return shakespeare_fedavg.with_server_optimizer(
      "yogi", 0.01,
      {"b1": 0.9, "b2": 0.99, "eps": 1e-3}, mode)
