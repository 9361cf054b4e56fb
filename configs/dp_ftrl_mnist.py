"""DP-FTRL on MNIST: tree-aggregation noise, no sampling amplification needed.

Kairouz et al. 2021, "Practical and Private (Deep) Learning without Sampling
or Shuffling": clients are taken in a shuffled order, each at most once per
epoch (here 500 clients, 100 per round: 5 rounds an epoch); the server adds
the noise of a binary-tree prefix-sum mechanism to the running sum of clipped
updates, restarting the tree every epoch, and steps from the noisy prefix
sums (momentum on their differences: DP-FTRLM). The noise multiplier is
calibrated before training to meet epsilon = 8 after num_rounds rounds.
"""

from configs import common
from configs import dp_mnist


def get_config(mode: str = ""):
  config = dp_mnist.get_config()
  config.sampling = "shuffle"
  config.cohort_size = 100
  config.sampling_rate = 0.0
  config.server.update({"optimizer": "sgd", "learning_rate": 1.0})
  config.privacy.update({"mechanism": "tree", "target_epsilon": 8.0,
                         "calibrate": True})
  config.privacy.ftrl.update({"rounds_per_tree": 0, "momentum": 0.0})
  return common.apply_mode(config, mode)
