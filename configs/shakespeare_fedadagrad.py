"""FedAdagrad on Shakespeare (Reddi et al. 2021 setup and tuned learning rates).

Same task as shakespeare_fedavg.py; client SGD lr 1; server Adagrad as the
paper defines it (``adagrad_tau``: accumulator from 0, tau outside the square
root) with lr 10^-0.5 and tau = 10^-1, the best Shakespeare values of the
paper's reference code.
"""

from configs import shakespeare_fedavg


def get_config(mode: str = ""):
  return shakespeare_fedavg.with_server_optimizer(
      "adagrad_tau", 10 ** -0.5,
      {"eps": 0.1, "initial_accumulator_value": 0.0}, mode)
