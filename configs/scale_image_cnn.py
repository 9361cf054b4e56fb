"""The scale workload: the EMNIST CNN on a simulated image population on disk.

Write the population once (minutes; ~48 GB for 10^6 clients as float16):

  python -m experiments.make_population --kind=image --num_clients=1000000 \
      --out=DATA/image-1e6

then point a run at it with ``--config.data.path=DATA/image-1e6``. The
population is MNIST-derived and simulated (real digits re-drawn per client
with a label skew and a writing style, ``fedjax_lab/data/image_population.py``),
not real users: it measures the framework at a deployment's scale, not an
accuracy to compare with papers.

Modes:

* default: FedAvg, 1,000 clients per round (fixed-size cohorts), one local
  epoch of batch 10, the FedAvg EMNIST CNN (McMahan et al. 2017);
* ``dp``: pfl-research's private benchmark setting at population 10^6:
  Poisson sampling of 400 clients per round in expectation, trained with the
  noise of a 5,000-client cohort (``noise_cohort_size``), clip norm 1, the
  noise multiplier calibrated so that 2,000 rounds spend epsilon = 2 at
  delta = 1/population^1.1 (RDP); epsilon is reported every round.
  Stop it early with ``--config.max_seconds`` or ``--config.num_rounds``
  (calibration then uses the shorter run: pass
  ``--config.privacy.calibrate=False --config.privacy.noise_multiplier=Z``
  to keep a 2,000-round multiplier Z).
"""

from configs import common


def get_config(mode: str = ""):
  config = common.base_config()
  config.num_rounds = 3
  config.cohort_size = 1000
  config.eval_every = 0
  config.eval_max_examples = 2000
  config.checkpoint_every = 0
  config.data.update({"name": "disk", "path": ""})
  config.model.name = "cnn"
  config.client.update({"optimizer": "sgd", "learning_rate": 0.05,
                        "num_epochs": 1, "batch_size": 10})
  config.server.update({"optimizer": "sgd", "learning_rate": 1.0})
  if mode == "dp":
    config.num_rounds = 2000
    config.weighting = "uniform"
    config.sampling = "poisson"
    config.sampling_rate = 400 / 1_000_000
    config.privacy.update({"mechanism": "gaussian", "clip_norm": 1.0,
                           "noise_cohort_size": 5000, "target_epsilon": 2.0,
                           "calibrate": True, "accountant": "rdp"})
    return config
  return common.apply_mode(config, mode)
