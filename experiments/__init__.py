"""The programs behind ``fedjax-lab``: entry points (``run``, ``sweep``,
``plot``, ``privacy``, ``audit``; ``main`` dispatches them), their helpers
in ``lib``, studies in ``studies``, benchmarks in ``bench``, and the saved
numbers in ``results`` (data, not code)."""
