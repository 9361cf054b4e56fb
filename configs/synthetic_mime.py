"""Mime (Karimireddy et al. 2021) on FedProx Synthetic(1,1).

synthetic_logreg_fedavg.py's task with SGD + momentum 0.9 mimicked: the
momentum lives on the server, is broadcast, frozen during local steps, and
updated with the cohort's full-batch gradient at the server model (Mime's
first pass over the cohort); local steps use the SVRG-corrected gradient.
optax momentum is undampened (step ~ lr / (1 - 0.9)), so the client step
0.001 corresponds to the paper's dampened momentum at 0.01.
``--config.algorithm=mimelite`` drops the correction (and composes with DP).
"""

from configs import common
from configs import synthetic_logreg_fedavg


def get_config(mode: str = ""):
  config = synthetic_logreg_fedavg.get_config()
  config.algorithm = "mime"
  config.client.learning_rate = 0.001
  config.mime.update({"base_optimizer": "momentum",
                      "base_hparams": {"momentum": 0.9}})
  return common.apply_mode(config, mode)
