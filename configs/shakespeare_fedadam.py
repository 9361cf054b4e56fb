"""FedAdam on Shakespeare (Reddi et al. 2021 setup and tuned learning rates).

Same task as shakespeare_fedavg.py; server Adam with lr 10^-2, beta1 0.9,
beta2 0.99 and adaptivity tau = eps = 10^-3; client SGD lr 1.
"""

from configs import common
from configs import shakespeare_fedavg


def get_config(mode: str = ""):
  config = shakespeare_fedavg.get_config()
  config.algorithm = "fedopt"
  config.server.update({"optimizer": "adam", "learning_rate": 0.01,
                        "hparams": {"b1": 0.9, "b2": 0.99, "eps": 1e-3}})
  return common.apply_mode(config, mode)
