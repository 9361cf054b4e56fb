"""DP-FedAvg on word-level next-word prediction over Shakespeare's roles.

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language
Models") trained word-level next-word models with user-level DP-FedAvg:
Poisson-sampled users, each user's update clipped, Gaussian noise on the
sum, accounted with the moments accountant. Same task and models as
``shakespeare_nwp_fedavg.py`` with:

* ~20 Poisson-sampled roles a round (rate 20/1154) and the noise of a
  100-client cohort (``privacy.noise_cohort_size``: the update is averaged
  as if 100 users contributed; epsilon is accounted for rate 100/1154),
  uniform weights;
* adaptive clipping toward the median update norm (Andrew et al. 2021);
* the noise multiplier calibrated to ``privacy.target_epsilon`` (default 8)
  over ``num_rounds`` at delta = 1/1154^1.1. Two budgets side by side as one
  program: ``python -m experiments.sweep --config=configs/dp_shakespeare_nwp.py
  --sweep='privacy.target_epsilon=2,8' --vectorize``.

Same argument: ``transformer`` (default) or ``lstm``, optionally ``,tiny``.
"""

from configs import common
from configs import shakespeare_nwp_fedavg


def get_config(arg: str = ""):
  _, mode = shakespeare_nwp_fedavg.parse_arg(arg)
  config = shakespeare_nwp_fedavg.get_config(arg.replace("tiny", ""))
  config.weighting = "uniform"
  config.sampling = "poisson"
  config.sampling_rate = 20 / 1154
  config.privacy.update({"mechanism": "adaptive", "clip_norm": 0.5,
                         "target_epsilon": 8.0, "calibrate": True,
                         "noise_cohort_size": 100})
  return common.apply_mode(config, mode)
