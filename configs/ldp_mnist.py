"""Local DP baseline on MNIST: every client noises its own clipped update.

The same task as dp_mnist.py with the Gaussian mechanism moved onto each
device (no trusted aggregator, no amplification by sampling). With the same
noise multiplier the average carries sqrt(cohort) times more noise than
central DP's, while epsilon (per participation, composed over all rounds as
the worst case) is far larger: the gap central DP buys.
"""

from configs import common
from configs import dp_mnist


def get_config(mode: str = ""):
  config = dp_mnist.get_config()
  config.privacy.update({"mechanism": "local", "noise_multiplier": 2.0})
  return common.apply_mode(config, mode)
