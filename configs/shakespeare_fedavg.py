"""FedAvg on Shakespeare next-character prediction (Reddi et al. 2021 setup).

Reddi et al., "Adaptive Federated Optimization" (ICLR 2021): char-LSTM
(embedding 8, 2x LSTM 256), 10 clients per round, 1 local epoch, batch 4,
sequences of 80 characters, tuned client lr 1 and server lr 1 for FedAvg.
They report ~56-57% accuracy (excluding pad/EOS) after 1,200 rounds.
"""

from typing import Any, Mapping

from configs import common


def get_config(mode: str = ""):
  config = common.base_config()
  config.num_rounds = 1200
  config.cohort_size = 10
  config.eval_every = 50
  config.eval_max_examples = 4096
  config.data.update({"name": "shakespeare", "sequence_length": 80})
  config.model.name = "char_lstm"
  config.client.update({"optimizer": "sgd", "learning_rate": 1.0,
                        "num_epochs": 1, "batch_size": 4})
  config.server.update({"optimizer": "sgd", "learning_rate": 1.0})
  return common.apply_mode(config, mode)


def with_server_optimizer(optimizer: str, learning_rate: float,
                          hparams: Mapping[str, Any], mode: str = ""):
  """This task as FedOpt: the same clients, the named optax server optimizer.

  The Shakespeare FedAdam / FedYogi / FedAdagrad / FedAvgM configs differ
  only in this server block (Reddi et al. 2021 tune it per method).
  """
  config = get_config()
  config.algorithm = "fedopt"
  config.server.update({"optimizer": optimizer, "learning_rate": learning_rate,
                        "hparams": dict(hparams)})
  return common.apply_mode(config, mode)
