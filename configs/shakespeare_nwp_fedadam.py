"""FedAdam on word-level next-word prediction over Shakespeare's roles.

Same task and client settings as ``shakespeare_nwp_fedavg.py``; the server
optimizer is Adam with Reddi et al.'s Stack Overflow NWP tuning: lr 10^-2,
beta1 0.9, beta2 0.99 (the values they fix for every adaptive optimizer, as
the reference code's FedAdam recipe also does), adaptivity tau = eps = 10^-5
(their tuned value for this task as we read their Appendix D tables; the
reference recipe's general default is 10^-3); client SGD lr 10^-1/2.
Same argument: ``transformer`` (default) or ``lstm``, optionally ``,tiny``.
"""

from configs import common
from configs import shakespeare_nwp_fedavg


def get_config(arg: str = ""):
  _, mode = shakespeare_nwp_fedavg.parse_arg(arg)
  config = shakespeare_nwp_fedavg.get_config(arg.replace("tiny", ""))
  config.algorithm = "fedopt"
  config.server.update({"optimizer": "adam", "learning_rate": 0.01,
                        "hparams": {"b1": 0.9, "b2": 0.99, "eps": 1e-5}})
  return common.apply_mode(config, mode)
