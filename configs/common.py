"""The defaults every experiment config starts from.

They live in the package (:mod:`fedjax_lab.training.defaults`), so the
public API and the configs share one copy; this module names them for
``configs/*.py``.
"""

from fedjax_lab.training.defaults import apply_mode
from fedjax_lab.training.defaults import base_config
from fedjax_lab.training.defaults import privacy_defaults

__all__ = ["apply_mode", "base_config", "privacy_defaults"]
