"""Studies: programs that run a grid of experiments and write a report.

``fedprox_synthetic`` (the FedProx paper's Synthetic grid; its members in
``fedprox_synthetic_grid``, its report in ``fedprox_synthetic_report``),
``compare_algorithms`` (every algorithm at equal rounds) and ``dp_tradeoff``
(accuracy vs epsilon); each member is run, or read back if finished, by
``members.run_or_read_back``.
"""
