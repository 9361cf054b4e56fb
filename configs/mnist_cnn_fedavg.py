"""FedAvg, FedAvg-EMNIST CNN, on 5,000 real MNIST digits split by Dirichlet(0.3).

100 clients with label skew (Hsu et al. 2019's Dirichlet partition), 10 per
round, 1 local epoch of batch 10 at client lr 0.1, server SGD lr 1 (plain
FedAvg, McMahan et al. 2017). ~40 training digits per client.
"""

from configs import common


def get_config(mode: str = ""):
  config = common.base_config()
  config.num_rounds = 100
  config.cohort_size = 10
  config.eval_every = 25
  config.data.update({"name": "mnist", "num_clients": 100,
                      "partition": "dirichlet", "alpha": 0.3,
                      "seed": 0, "test_fraction": 0.2})
  config.model.name = "cnn"
  config.client.update({"optimizer": "sgd", "learning_rate": 0.1,
                        "num_epochs": 1, "batch_size": 10})
  config.server.update({"optimizer": "sgd", "learning_rate": 1.0})
  return common.apply_mode(config, mode)
