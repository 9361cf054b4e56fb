r"""Writes a simulated population of clients straight to an on-disk dataset.

  python -m experiments.make_population --kind=synthetic|image \
      --num_clients=1000000 --out=DIR [--seed=0 --min_examples=10 \
      --max_examples=50 --alpha=... --beta=... --pixel_dtype=float16|uint8 \
      --chunk_clients=2000]

``synthetic``: FedProx Synthetic(alpha, beta) clients
(:func:`fedjax_lab.data.populations.write_synthetic_population`);
``image``: a MNIST-derived simulated population, real digits with simulated
per-client label skew and writer style, not real users
(:func:`fedjax_lab.data.image_population.write_image_population`). Memory stays
bounded whatever ``--num_clients``. Prints the time taken, the size on disk
and the peak resident memory on stderr; the last stdout line is the same as
one JSON object. Train on it with ``--config.data.name=disk
--config.data.path=DIR``. Bad flags or an existing ``--out``: ``error: ...``
on stderr, exit status 2.
"""

import json
import os
import resource
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

from experiments.lib import cli

_KIND = flags.DEFINE_enum("kind", None, ["synthetic", "image"],
                          "Which population.")
_NUM_CLIENTS = flags.DEFINE_integer("num_clients", None, "Training clients.")
_OUT = flags.DEFINE_string("out", None, "New folder to write (must not exist).")
_SEED = flags.DEFINE_integer("seed", 0, "Fixes every draw.")
_MIN_EXAMPLES = flags.DEFINE_integer("min_examples", 10,
                                     "Fewest examples of a client.")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 50,
                                     "Most examples of a client.")
_ALPHA = flags.DEFINE_float(
    "alpha", None, "synthetic: std of the model means (default 1); image: "
    "Dirichlet label concentration (default 0.3).")
_BETA = flags.DEFINE_float("beta", 1.0,
                           "synthetic: std of the input means.")
_PIXEL_DTYPE = flags.DEFINE_enum(
    "pixel_dtype", "float16", ["float16", "uint8"],
    "image: float16 pixel/255 (trains as is) or uint8 0..255 (half the "
    "disk; nothing in the pipeline rescales it).")
_NUM_TEST_CLIENTS = flags.DEFINE_integer(
    "num_test_clients", None, "image: test clients (default max(100, 1%)).")
_CHUNK = flags.DEFINE_integer("chunk_clients", 2000,
                              "Clients drawn and written at a time.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Print progress on stderr.")


def directory_bytes(directory: str) -> int:
  """Bytes of the files under ``directory`` (apparent sizes)."""
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(directory) for name in names)


def peak_rss_bytes() -> int:
  """This process's peak resident memory: ``VmHWM`` of ``/proc/self/status``
  on Linux (``ru_maxrss`` would include the parent's memory at ``fork``),
  else ``ru_maxrss``."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024  # kB
  except OSError:
    pass
  scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, else KiB
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _print_progress(split: str, done: int, total: int) -> None:
  """One stderr line per split, overwritten after each chunk."""
  end = "\n" if done == total else ""
  print(f"\r{split}: {done:,}/{total:,} clients", end=end, file=sys.stderr,
        flush=True)


def main(argv: Sequence[str]) -> None:
  """Writes the population the flags describe and reports what it cost."""
  cli.reject_extra_args(argv)
  # pylint: disable-next=g-import-not-at-top
  from fedjax_lab.data import image_population, populations
  if _KIND.value is None or _NUM_CLIENTS.value is None or not _OUT.value:
    cli.fail("--kind, --num_clients and --out are required.", 2)
  if os.path.exists(_OUT.value):
    cli.fail(f"--out={_OUT.value} exists; choose a new folder.", 2)
  common = {"num_clients": _NUM_CLIENTS.value, "seed": _SEED.value,
            "min_examples": _MIN_EXAMPLES.value,
            "max_examples": _MAX_EXAMPLES.value,
            "chunk_clients": _CHUNK.value,
            "progress": _print_progress if _PROGRESS.value else None}
  started = time.perf_counter()
  try:
    if _KIND.value == "synthetic":
      alpha = 1.0 if _ALPHA.value is None else _ALPHA.value
      path = populations.write_synthetic_population(
          _OUT.value, alpha=alpha, beta=_BETA.value, **common)
    else:
      alpha = 0.3 if _ALPHA.value is None else _ALPHA.value
      path = image_population.write_image_population(
          _OUT.value, alpha=alpha, pixel_dtype=_PIXEL_DTYPE.value,
          num_test_clients=_NUM_TEST_CLIENTS.value, **common)
  except (ValueError, FileExistsError) as e:
    cli.fail(f"{type(e).__name__}: {e}", 2)
  seconds = time.perf_counter() - started
  report = {"kind": _KIND.value, "num_clients": _NUM_CLIENTS.value,
            "out": path, "seconds": round(seconds, 2),
            "bytes_on_disk": directory_bytes(path),
            "peak_rss_bytes": peak_rss_bytes()}
  print(f"wrote {path} in {seconds:.1f} s: "
        f"{report['bytes_on_disk'] / 1e9:.2f} GB on disk, peak RSS "
        f"{report['peak_rss_bytes'] / 2**20:.0f} MiB", file=sys.stderr)
  print(json.dumps(report))


def run_program() -> None:
  """The program: parses ``sys.argv`` (errors: exit 2) and runs ``main``."""
  app.run(main, flags_parser=cli.parse_flags_or_exit())


if __name__ == "__main__":
  run_program()
