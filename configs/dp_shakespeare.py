"""DP-FedAvg on Shakespeare next-character prediction, large-cohort noise.

McMahan et al. 2018 ("Learning Differentially Private Recurrent Language
Models") trained a DP char/word LSTM with Poisson-sampled users, clipped
updates and Gaussian noise on the sum. This config keeps Reddi et al.'s
Shakespeare setup (char-LSTM, 1 local epoch, batch 4, client lr 1) and:

* trains ~10 Poisson-sampled clients a round (rate 10/1154) but adds the
  noise of a 100-client cohort (``privacy.noise_cohort_size``, as
  pfl-research's noise_cohort_size): epsilon is accounted for sampling rate
  100/1154, and the summary says so;
* clips adaptively toward the median update norm (Andrew et al. 2021), since
  LSTM update norms are not known in advance;
* calibrates the noise multiplier to epsilon 8 over 300 rounds at
  delta = 1/1154**1.1.
"""

from configs import common
from configs import shakespeare_fedavg


def get_config(mode: str = ""):
  config = shakespeare_fedavg.get_config()  # model, data, client, server
  config.num_rounds = 300
  config.weighting = "uniform"
  config.sampling = "poisson"
  config.sampling_rate = 10 / 1154
  config.privacy.update({"mechanism": "adaptive", "clip_norm": 0.5,
                         "target_epsilon": 8.0, "calibrate": True,
                         "noise_cohort_size": 100})
  return common.apply_mode(config, mode)
