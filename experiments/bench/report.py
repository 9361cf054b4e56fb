"""What every benchmark report holds: the machine, and its two files.

``<out>.json`` (the report) and ``<out>.md`` (its tables, rendered by the
benchmark that made it).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import jax
import optax


def machine_info() -> dict[str, Any]:
  """CPU, devices and library versions."""
  import flax, jaxlib  # pylint: disable=g-import-not-at-top,multiple-imports
  with open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f
                if line.startswith("model name")), "unknown")
  return {"cpu_model": cpu, "cpu_cores": os.cpu_count(),
          "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "python": sys.version.split()[0]}


def write_outputs(report: dict[str, Any], out: str,
                  render: Callable[[dict[str, Any]], str]) -> tuple[str, str]:
  """Writes ``<out>.json`` and ``<out>.md`` (``render(report)``); returns
  their paths."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(report, f, indent=1)
  with open(out + ".md", "w") as f:
    f.write(render(report))
  return out + ".json", out + ".md"
