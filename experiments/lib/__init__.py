"""Helpers of the experiment entry points (not programs themselves).

``paths`` (where the repository's ``configs/`` live), ``cli`` (workdirs and
one-line user errors), ``sweep_spec`` and ``sweep_summary`` (the sweep's spec
parsing and result tables), ``runs`` (finding and reading saved runs for
``plot``).
"""
