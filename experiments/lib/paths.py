"""Where the repository's pieces are, independent of the working directory.

``configs/`` sits next to the ``experiments`` package at the repository root;
an editable install (``pip install -e .``) keeps the repository in place, so
the root is the ``experiments`` package's parent folder. Config files given
by the user are paths relative to the working directory, as usual.
"""

from __future__ import annotations

import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")
DEFAULT_CONFIG = os.path.join(CONFIGS_DIR, "default.py")


def config_file(name: str) -> str:
  """The absolute path of ``configs/<name>`` in this repository."""
  return os.path.join(CONFIGS_DIR, name)


def ensure_configs_importable() -> None:
  """Puts the repository root on ``sys.path`` so that config files can
  ``from configs import common`` whatever the working directory."""
  if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
