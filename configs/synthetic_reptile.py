"""Federated Reptile with personalization evaluation on Synthetic(1,1).

Nichol et al. 2018 as used for FL personalization by Jiang et al. 2019:
every sampled client takes exactly 10 SGD steps of batch 10 at lr 0.01 and
the server moves a meta step of 0.5 toward the average adapted model
(uniform weighting). After the last round (and every 50 rounds) every client
fine-tunes the global model for one epoch on its train split and is scored
on its test split: ``personalization_*`` metrics give the distribution
(mean, 10th percentile, worst) before and after fine-tuning.
"""

from configs import common
from configs import synthetic_logreg_fedavg


def get_config(mode: str = ""):
  config = synthetic_logreg_fedavg.get_config()
  config.algorithm = "reptile"
  config.weighting = "uniform"
  config.reptile.num_inner_steps = 10
  config.server.update({"optimizer": "sgd", "learning_rate": 0.5})
  config.personalization.update({"enabled": True, "every": 50,
                                 "num_epochs": 1, "learning_rate": 0.01,
                                 "batch_size": 10})
  return common.apply_mode(config, mode)
