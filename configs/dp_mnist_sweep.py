"""Noise/utility sweeps on the main job's task, one member per privacy level.

dp_mnist.py with the noise multiplier calibrated before training to meet
``privacy.target_epsilon`` exactly after ``num_rounds`` rounds, so sweep
members land on the epsilons asked for; evaluation only at the end (sweeps
read the final accuracy). Sweep it with

  python -m experiments.studies.dp_tradeoff \
      --config=configs/dp_mnist_sweep.py \
      --target_epsilons=0.5,1,2,4,8 --seeds=0,1,2

or override one member: ``--config.privacy.target_epsilon=2``. Any other key
(``privacy.clip_norm``, ``sampling_rate``, ``num_rounds``) can be swept the
same way from the command line.
"""

from configs import common
from configs import dp_mnist


def get_config(mode: str = ""):
  config = dp_mnist.get_config()
  config.eval_every = 0
  config.privacy.update({"calibrate": True, "target_epsilon": 4.0})
  return common.apply_mode(config, mode)
