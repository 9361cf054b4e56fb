"""Running experiments: from a config (or the public API) to a finished
workdir.

``api`` (experiments from notebooks and scripts), ``defaults`` (the base
config), ``setup`` (config -> experiment), ``loop`` (the rounds) with
``callbacks`` (evaluation, checkpoints, sinks, progress around them),
``privacy_run`` (a run's secret seed, release policy and privacy report);
on disk: ``workdir`` (lock, open / resume / set aside) with
``run_checkpoints`` (orbax checkpoints) and ``config_diff`` (what a resume
may change), ``sinks`` (metrics writers: ``file_sinks`` for JSON lines and
CSV, ``dashboard_sinks`` for TensorBoard via ``tfevents`` and W&B),
``metrics_io`` (JSON files) and ``state_files`` (the final state).
"""
