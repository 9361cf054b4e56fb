"""A repository config shrunk for tests, shared by the test packages."""

import os
import sys

import ml_collections

from fedjax_lab.training import defaults

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """``configs/<name>.py``'s ``:tiny`` config with dotted-key ``overrides``
  (``**{"privacy.mechanism": "gaussian"}``)."""
  sys.path.insert(0, ROOT)
  config = __import__(f"configs.{name}",
                      fromlist=["get_config"]).get_config("tiny")
  for key, value in overrides.items():
    defaults.set_dotted(config, key, value)
  return config
