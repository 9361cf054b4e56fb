"""Differential privacy for federated learning: mechanisms, accounting, audit.

* :mod:`clipping` — L2 clipping of whole update pytrees.
* :mod:`aggregators` — DP-FedAvg's Gaussian sum, adaptive clipping, local DP
  (each an :class:`~fedjax_lab.algorithms.base.Aggregator`).
* :mod:`accounting` — the DP event of a round, epsilon after t rounds,
  calibration of the noise multiplier (through ``dp_accounting``).
* :mod:`tree` — tree-aggregation noise and the DP-FTRL server optimizer.
* :mod:`audit` — canary clients and the one-shot empirical epsilon.
"""
