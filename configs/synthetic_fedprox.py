"""FedProx on FedProx Synthetic(1,1) with 50% stragglers (Li et al. 2020).

The paper's Synthetic setup: 30 clients, multinomial logistic regression, 10
clients a round, 20 local epochs of batch 10 at lr 0.01, mu = 1. Half of each
round's clients are stragglers that stop after a uniformly random number of
their local steps; FedProx keeps their partial updates. The paper's FedAvg
baseline drops them: ``--config.algorithm=fedprox --config.fedprox.mu=0
--config.fedprox.drop_stragglers=True``. Set
``--config.fedprox.straggler_fraction`` to 0 or 0.9 for the other settings.
"""

from configs import common
from configs import synthetic_logreg_fedavg


def get_config(mode: str = ""):
  config = synthetic_logreg_fedavg.get_config()
  config.algorithm = "fedprox"
  config.fedprox.update({"mu": 1.0, "straggler_fraction": 0.5,
                         "straggler_min_steps": 1, "drop_stragglers": False})
  return common.apply_mode(config, mode)
