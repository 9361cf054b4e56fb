"""Differential privacy for federated learning: mechanisms and accounting.

* :mod:`clipping` — L2 clipping of whole update pytrees, and the ``clip``
  link of an aggregation chain.
* :mod:`aggregators` — DP-FedAvg's Gaussian sum, adaptive clipping, local DP
  (each an :class:`~fedjax_lab.algorithms.base.Aggregator`, a link of
  :func:`~fedjax_lab.algorithms.base.chain`).
* :mod:`tree` — DP-FTRL's tree aggregator and server optimizer;
  :mod:`tree_noise` — the tree mechanism's node noise.
* :mod:`mechanisms` — a resolved plan's aggregation chain (clip -> compress
  -> DP link) and DP-FTRL's server optimizer.
* :mod:`refusals` — every refused combination of a DP mechanism with other
  settings, one table, each row with its reason.
* :mod:`accounting` — the DP event of a round, epsilon after t rounds,
  calibration of the noise multiplier (through ``dp_accounting``).
* :mod:`plan` — a config's ``privacy`` block resolved into the mechanism and
  its accounting (refusing combinations whose guarantee would not hold).
* :mod:`empirical_epsilon` — the math of the one-shot empirical privacy
  audit (the audit itself runs whole experiments, so it lives above
  training, in :mod:`fedjax_lab.audit`).
"""
