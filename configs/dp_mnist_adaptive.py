"""DP-FedAvg with adaptive clipping on MNIST (Andrew et al. 2021).

As dp_mnist.py, but the clip norm starts at 0.05 (far below the update norms)
and follows the noisy median of client update norms (geometric update, clip
learning rate 0.2); the clipped-count query takes its share of the noise
(std max(expected cohort / 20, z)) and the round is accounted as one Gaussian
mechanism with the configured total noise multiplier.
"""

from configs import common
from configs import dp_mnist


def get_config(mode: str = ""):
  config = dp_mnist.get_config()
  config.privacy.update({"mechanism": "adaptive", "clip_norm": 0.05})
  config.privacy.adaptive.update({"target_quantile": 0.5,
                                  "clip_learning_rate": 0.2,
                                  "clipped_count_stddev": 0.0})
  return common.apply_mode(config, mode)
