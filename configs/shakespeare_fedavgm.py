"""FedAvgM on Shakespeare (Reddi et al. 2021 setup and tuned learning rates).

Same task as shakespeare_fedavg.py; client SGD lr 1; server SGD with
momentum 0.9 (Hsu et al. 2019) at lr 10^-0.5, the best Shakespeare value of
the reference code of Reddi et al.
"""

from configs import shakespeare_fedavg


def get_config(mode: str = ""):
  return shakespeare_fedavg.with_server_optimizer(
      "momentum", 10 ** -0.5, {"momentum": 0.9}, mode)
