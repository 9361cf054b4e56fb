"""Benchmarks: round time per strategy, per algorithm, and the cost of DP.

``strategies``, ``algorithms`` and ``privacy`` are programs
(``python -m experiments.bench.NAME``) sharing ``workloads`` (the W1/W2/W3
workloads, runner-like rounds, interleaved timing) and ``report`` (machine
info, the JSON and markdown files); ``privacy_report`` holds the privacy
benchmark's verdicts and tables; ``device_check`` (and ``gpu_session.sh``)
check an accelerator and run ``strategies`` on it.
"""
