"""Empirical privacy audits: whole training runs with canary clients.

Layer: the top of the package, above :mod:`fedjax_lab.training` (an audit
builds and runs complete experiments); only ``experiments/`` sits higher.

* :mod:`canaries` — canary directions, their cosines with a model delta, and
  canary clients added to an algorithm and an experiment.
* :mod:`one_shot` — the one-shot empirical epsilon of Andrew et al. (ICLR
  2024): ``run_audit`` trains with canaries and writes ``audit.json``,
  ``audit_report`` scores a trained model, ``run_sampler`` replays the
  cohorts a run drew. The estimate's math is
  :mod:`fedjax_lab.privacy.empirical_epsilon`.
"""
