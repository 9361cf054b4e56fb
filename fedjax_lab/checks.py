"""Argument checks shared by the library's public constructors."""

from __future__ import annotations

import numpy as np


def check_int(name: str, value: int, minimum: int) -> int:
  """Returns ``value`` as int after checking it is an integer >= ``minimum``.

  Raises:
    TypeError: ``value`` is not an integer (bools are refused too).
    ValueError: ``value < minimum``.
  """
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise TypeError(f"{name} must be an integer, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be >= {minimum}, got {value}.")
  return int(value)
