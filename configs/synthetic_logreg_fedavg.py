"""FedAvg on FedProx's Synthetic(1, 1) with multinomial logistic regression.

Li et al., "Federated Optimization in Heterogeneous Networks" (MLSys 2020)
settings: 30 clients, 10 per round, 20 local epochs, batch 10, lr 0.01,
200 rounds.
"""

from configs import common


def get_config(mode: str = ""):
  config = common.base_config()
  config.num_rounds = 200
  config.cohort_size = 10
  config.eval_every = 20
  config.data.update({"name": "synthetic", "alpha": 1.0, "beta": 1.0,
                      "iid": False, "num_clients": 30, "seed": 0})
  config.model.name = "logistic"
  config.client.update({"optimizer": "sgd", "learning_rate": 0.01,
                        "num_epochs": 20, "batch_size": 10})
  config.server.update({"optimizer": "sgd", "learning_rate": 1.0})
  return common.apply_mode(config, mode)
