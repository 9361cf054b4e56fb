"""Evaluation of trained models: central, per client, per cluster.

Layer: above :mod:`fedjax_lab.engine`, below :mod:`fedjax_lab.training` (the
runner calls these; nothing here writes files or knows about a run).

* :mod:`central` — the global model over every client's test (or train)
  examples pooled, exact whatever the padding (``build_evaluator``).
* :mod:`personalization` — per-client fine-tuning evaluation (Wang et al.
  2019): the global model vs. a fine-tuned copy on each client's test split
  (``build_personalization_evaluator``), the runner's version from the
  ``personalization`` config block (``build_runner``) and what
  ``summary.json`` keeps of a result (``describe``).
* :mod:`personalization_report` — its result (``PersonalizationResult``)
  and the distribution over clients (``PersonalizationResult.summary``).
* :mod:`clusters` — cluster models (HypCluster) scored with each client's
  best cluster (``hypcluster_evaluate``).
"""
