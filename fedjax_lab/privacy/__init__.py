"""Differential privacy for federated learning: mechanisms and accounting.

* :mod:`clipping` — L2 clipping of whole update pytrees.
* :mod:`aggregators` — DP-FedAvg's Gaussian sum, adaptive clipping, local DP
  (each an :class:`~fedjax_lab.algorithms.base.Aggregator`).
* :mod:`tree` — tree-aggregation noise and the DP-FTRL server optimizer.
* :mod:`accounting` — the DP event of a round, epsilon after t rounds,
  calibration of the noise multiplier (through ``dp_accounting``).
* :mod:`plan` — a config's ``privacy`` block resolved into the mechanism and
  its accounting (refusing combinations whose guarantee would not hold).
* :mod:`empirical_epsilon` — the math of the one-shot empirical privacy
  audit (the audit itself runs whole experiments, so it lives above
  training, in :mod:`fedjax_lab.audit`).
"""
