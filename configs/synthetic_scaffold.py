"""SCAFFOLD (option II) on FedProx Synthetic(1,1) (Karimireddy et al. 2020).

synthetic_logreg_fedavg.py's task (30 heterogeneous clients, logistic
regression, 10 a round, 20 local epochs of batch 10 at lr 0.01) with client
drift corrected by control variates: each client keeps its c_i (per-client
state, only the sampled clients' are gathered and scattered), the server its
c. Uniform client weights, as in the paper's Algorithm 1.
``--config.scaffold.option=I`` uses the gradient at the global model instead.
"""

from configs import common
from configs import synthetic_logreg_fedavg


def get_config(mode: str = ""):
  config = synthetic_logreg_fedavg.get_config()
  config.algorithm = "scaffold"
  config.weighting = "uniform"
  config.scaffold.option = "II"
  return common.apply_mode(config, mode)
