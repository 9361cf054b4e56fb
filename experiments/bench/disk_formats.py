r"""Memory-mapped columns (ours) vs array_record (one record per client).

  python -m experiments.bench.disk_formats [--num_clients=100000 \
      --pixel_dtype=float16 --num_cohorts=100 --cohort_size=1000 \
      --million_kinds=synthetic,image --million_pixel_dtypes=uint8,float16 \
      --out=experiments/results/disk_formats]

Writes a MNIST-derived simulated image population
(:mod:`fedjax_lab.data.image_population`) as our columns, then rewrites the
same clients both as columns and as one array_record file (the TFDS / Grain
record format; ``group_size:1`` for random access), one record per client
holding its arrays packed with msgpack. Measured: write seconds, bytes on
disk, and the seconds to read ``--num_cohorts`` random cohorts of
``--cohort_size`` clients into numpy arrays: columns by a row gather on the
mapped files, records by ``ArrayRecordDataSource.__getitems__`` plus
decoding. "Cold" reads follow ``posix_fadvise(DONTNEED)`` on the dataset's
files (their pages leave the page cache; other files are untouched); "warm"
repeats the same cohorts. With ``--million_kinds`` it also runs
``experiments.make_population`` for ``--million_clients`` clients of each
kind (and image pixel dtype) and records its time, size and peak RSS. All
data goes to a temporary folder (``--workdir``), deleted at the end.
"""

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from array_record.python import array_record_data_source
from array_record.python import array_record_module
import msgpack
import numpy as np

from experiments.bench import report as report_lib
from experiments.lib import cli
from fedjax_lab.data import disk
from fedjax_lab.data import image_population

_NUM_CLIENTS = flags.DEFINE_integer("num_clients", 100_000,
                                    "Image clients in the comparison.")
_PIXEL_DTYPE = flags.DEFINE_enum("pixel_dtype", "float16",
                                 ["float16", "uint8"], "Stored pixels.")
_NUM_COHORTS = flags.DEFINE_integer("num_cohorts", 100, "Cohorts read.")
_COHORT_SIZE = flags.DEFINE_integer("cohort_size", 1000, "Clients a cohort.")
_MILLION_KINDS = flags.DEFINE_list(
    "million_kinds", [], "Kinds to write at --million_clients with "
    "experiments.make_population (synthetic, image).")
_MILLION_CLIENTS = flags.DEFINE_integer("million_clients", 1_000_000,
                                        "Clients of those runs.")
_MILLION_PIXEL_DTYPES = flags.DEFINE_list(
    "million_pixel_dtypes", ["uint8"], "Pixel dtypes of the image run(s).")
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Scratch folder (default: a temporary one).")
_OUT = flags.DEFINE_string("out", "experiments/results/disk_formats",
                           "Report path without extension.")
_CHUNK = 2_000  # Clients written at a time.
# array_record writer options: random access needs group_size:1; the
# default compression is zstd:3.
_RECORD_OPTIONS = {"array_record_zstd": "group_size:1",
                   "array_record_raw": "group_size:1,uncompressed"}


def disk_bytes(path: str) -> dict[str, int]:
  """Apparent and allocated bytes of the files under ``path`` (or a file)."""
  files = ([path] if os.path.isfile(path) else
           [os.path.join(r, n) for r, _, names in os.walk(path)
            for n in names])
  stats = [os.stat(f) for f in files]
  return {"apparent": sum(s.st_size for s in stats),
          "allocated": sum(s.st_blocks * 512 for s in stats)}


def evict_from_page_cache(path: str) -> None:
  """Drops the cached pages of the files under ``path`` (ours only)."""
  files = ([path] if os.path.isfile(path) else
           [os.path.join(r, n) for r, _, names in os.walk(path)
            for n in names])
  for name in files:
    fd = os.open(name, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def client_rows(offsets: np.ndarray, clients: np.ndarray) -> np.ndarray:
  """Rows of ``clients`` in the columns, client after client."""
  starts, stops = offsets[clients], offsets[clients + 1]
  lengths = stops - starts
  before = np.cumsum(lengths) - lengths
  return (np.repeat(starts - before, lengths) +
          np.arange(int(lengths.sum()), dtype=np.int64))


def rewrite_columns(dataset: Any, path: str) -> float:
  """Seconds to write ``dataset``'s clients again as columns, in chunks."""
  started = time.perf_counter()
  with disk.DatasetWriter(path, name=dataset.name,
                          num_classes=dataset.num_classes,
                          input_shape=dataset.input_shape,
                          info=dataset.info) as writer:
    for split in disk.SPLITS:
      store = getattr(dataset, split)
      for start in range(0, store.num_clients, _CHUNK):
        stop = min(start + _CHUNK, store.num_clients)
        first, last = store.offsets[start], store.offsets[stop]
        writer.add_clients(
            split, store.client_ids[start:stop],
            {n: a[first:last] for n, a in store.features.items()},
            np.diff(store.offsets[start:stop + 1]))
  return time.perf_counter() - started


def write_records(store: Any, path: str, options: str) -> float:
  """Seconds to write one msgpack record per client of ``store``."""
  started = time.perf_counter()
  writer = array_record_module.ArrayRecordWriter(path, options)
  for start in range(0, store.num_clients, _CHUNK):
    stop = min(start + _CHUNK, store.num_clients)
    first = store.offsets[start]
    x = np.asarray(store.features["x"][first:store.offsets[stop]])
    y = np.asarray(store.features["y"][first:store.offsets[stop]])
    for client in range(start, stop):
      begin, end = store.offsets[client] - first, store.offsets[
          client + 1] - first
      writer.write(msgpack.packb({"x": x[begin:end].tobytes(),
                                  "y": y[begin:end].tobytes()}))
  writer.close()
  return time.perf_counter() - started


def read_columns(store: Any, clients: np.ndarray) -> dict[str, np.ndarray]:
  """A cohort's arrays from the mapped columns."""
  rows = client_rows(store.offsets, clients)
  return {n: a[rows] for n, a in store.features.items()}


def read_records(source: Any, clients: np.ndarray, x_dtype: np.dtype,
                 x_shape: Sequence[int]) -> dict[str, np.ndarray]:
  """A cohort's arrays from the array_record file."""
  records = [msgpack.unpackb(r) for r in source.__getitems__(
      [int(c) for c in clients])]
  x = np.concatenate([np.frombuffer(r["x"], x_dtype) for r in records])
  y = np.concatenate([np.frombuffer(r["y"], np.int32) for r in records])
  return {"x": x.reshape(-1, *x_shape), "y": y}


def time_cohorts(read, cohorts: list[np.ndarray]) -> dict[str, float]:
  """Seconds per cohort of ``read(clients)`` (mean, median, p90, total)."""
  seconds = []
  for clients in cohorts:
    started = time.perf_counter()
    read(clients)
    seconds.append(time.perf_counter() - started)
  return {"mean": float(np.mean(seconds)),
          "median": float(np.median(seconds)),
          "p90": float(np.percentile(seconds, 90)),
          "total": float(np.sum(seconds))}


def compare_formats(workdir: str) -> dict[str, Any]:
  """The columns vs array_record measurements."""
  generated = os.path.join(workdir, "generated")
  started = time.perf_counter()
  image_population.write_image_population(generated, _NUM_CLIENTS.value,
                                          pixel_dtype=_PIXEL_DTYPE.value)
  generate_seconds = time.perf_counter() - started
  dataset = disk.open_dataset(generated)
  paths = {"columns": os.path.join(workdir, "columns")}
  write_seconds = {"columns": rewrite_columns(dataset, paths["columns"])}
  for name, options in _RECORD_OPTIONS.items():
    paths[name] = os.path.join(workdir, f"{name}.array_record")
    write_seconds[name] = write_records(dataset.train, paths[name], options)
  shutil.rmtree(generated)
  store = disk.open_dataset(paths["columns"]).train
  x_column = store.features["x"]
  readers = {"columns": lambda c: read_columns(store, c)}
  for name in _RECORD_OPTIONS:
    source = array_record_data_source.ArrayRecordDataSource([paths[name]])
    readers[name] = lambda c, s=source: read_records(
        s, c, x_column.dtype, x_column.shape[1:])
  rng = np.random.default_rng(0)
  cohorts = [rng.choice(store.num_clients, _COHORT_SIZE.value, replace=False)
             for _ in range(_NUM_COHORTS.value)]
  expected = readers["columns"](cohorts[0])
  for name in _RECORD_OPTIONS:  # Every format holds the same clients.
    for feature, values in readers[name](cohorts[0]).items():
      np.testing.assert_array_equal(values, expected[feature])
  reads = {}
  for name, read in readers.items():
    evict_from_page_cache(paths[name])
    reads[name] = {"cold": time_cohorts(read, cohorts),
                   "warm": time_cohorts(read, cohorts)}
  examples = [int(store.sizes_of(c).sum()) for c in cohorts]
  sizes = {name: disk_bytes(path) for name, path in paths.items()}
  sizes["columns"] = disk_bytes(os.path.join(paths["columns"], "train"))
  shutil.rmtree(paths.pop("columns"))  # Free the disk for later runs.
  for path in paths.values():
    os.remove(path)
  return {
      "num_clients": store.num_clients, "num_examples": store.num_examples,
      "pixel_dtype": _PIXEL_DTYPE.value,
      "record_options": _RECORD_OPTIONS,
      "generate_and_write_columns_seconds": generate_seconds,
      "write_seconds": write_seconds, "train_bytes": sizes,
      "cohorts": {"count": len(cohorts), "clients": _COHORT_SIZE.value,
                  "mean_examples": float(np.mean(examples)),
                  "mean_megabytes": float(np.mean(examples)) *
                                    x_column[0].nbytes / 1e6},
      "read_seconds_per_cohort": reads}


def _time_v_peak_kib(stderr: str) -> int | None:
  """``Maximum resident set size (kbytes)`` from ``/usr/bin/time -v``."""
  for line in stderr.splitlines():
    if "Maximum resident set size" in line:
      return int(line.rsplit(":", 1)[1])
  return None


def million_runs(workdir: str) -> list[dict[str, Any]]:
  """``experiments.make_population`` at ``--million_clients`` (under
  ``/usr/bin/time -v`` where it exists), each deleted after."""
  runs = []
  time_v = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
  for kind in _MILLION_KINDS.value:
    for pixel_dtype in (_MILLION_PIXEL_DTYPES.value if kind == "image"
                        else [None]):
      out = os.path.join(workdir, f"population-{kind}")
      args = ["-m", "experiments.make_population", f"--kind={kind}",
              f"--num_clients={_MILLION_CLIENTS.value}", "--noprogress"]
      if pixel_dtype:
        args.append(f"--pixel_dtype={pixel_dtype}")
      print(f"writing {' '.join(args[1:])} ...", file=sys.stderr, flush=True)
      done = subprocess.run([*time_v, sys.executable, *args, f"--out={out}"],
                            check=True, capture_output=True, text=True)
      result = json.loads(done.stdout.strip().splitlines()[-1])
      result.pop("out")
      result["bytes_allocated"] = disk_bytes(out)["allocated"]
      result["time_v_max_rss_kib"] = _time_v_peak_kib(done.stderr)
      result["pixel_dtype"] = pixel_dtype
      result["command"] = " ".join(
          [*time_v, "python", *args, "--out=DIR"])
      shutil.rmtree(out)
      runs.append(result)
  return runs


def render(report: dict[str, Any]) -> str:
  """The Markdown page of ``report``."""
  machine = report["machine"]
  lines = ["# On-disk formats: memory-mapped columns vs array_record", "",
           f"Machine: {machine['cpu_model']}, {machine['cpu_cores']} CPU "
           f"cores, {machine['platform']}, Python {machine['python']}.", "",
           f"Command: `{report['command']}`", ""]
  c = report.get("comparison")
  if c:
    mb = lambda v: f"{v / 1e6:,.0f} MB"
    ms = lambda v: f"{v * 1e3:,.1f}"
    lines += [
        f"## {c['num_clients']:,} image clients ({c['num_examples']:,} "
        f"training examples, pixels {c['pixel_dtype']})", "",
        f"Generating and writing the population as columns: "
        f"{c['generate_and_write_columns_seconds']:.1f} s. Then the same "
        "training clients are rewritten in each format (read from the "
        f"mapped columns). Cohorts: {c['cohorts']['count']} random cohorts "
        f"of {c['cohorts']['clients']:,} clients, "
        f"{c['cohorts']['mean_examples']:,.0f} examples "
        f"({c['cohorts']['mean_megabytes']:.0f} MB of x) on average.", "",
        "| format | write s | bytes on disk (allocated) | cold read ms/cohort"
        " (median, p90) | warm read ms/cohort (median, p90) |",
        "|---|---:|---:|---:|---:|"]
    for name in c["write_seconds"]:
      r = c["read_seconds_per_cohort"][name]
      size = c["train_bytes"][name]
      lines.append(
          f"| {name} | {c['write_seconds'][name]:.1f} | {mb(size['apparent'])}"
          f" ({mb(size['allocated'])}) | {ms(r['cold']['median'])}, "
          f"{ms(r['cold']['p90'])} | {ms(r['warm']['median'])}, "
          f"{ms(r['warm']['p90'])} |")
    lines += ["", "Cold: the files' pages were dropped from the page cache "
              "(posix_fadvise DONTNEED) before the first pass; warm: the "
              "same cohorts again. array_record reads use "
              "ArrayRecordDataSource.__getitems__ (its own thread pool) and "
              "msgpack decoding; columns use one row gather per feature. "
              "array_record_zstd: the writer's default options (zstd level "
              "3; with group_size:1 each client's record is compressed "
              "alone); array_record_raw: uncompressed. "
              "Columns are uncompressed (they are memory-mapped). This is a "
              "virtual machine: a \"cold\" read may still be served by "
              "the host's cache, so cold numbers are cold-ish.", ""]
  lines += [
      "Pixel storage: the cohort builder keeps the store's dtype and the "
      "models only cast x to float32 (no rescaling), so uint8 pixels would "
      "reach a model as 0..255, unlike the mnist source's [0, 1]. Image "
      "populations therefore store float16 pixel/255 by default (2 bytes a "
      "pixel; trains as is) and uint8 (1 byte) only on request "
      "(info['x_scale'] = 1/255 for a consumer to apply).", ""]
  if report.get("million_runs"):
    lines += ["## Writing populations with experiments.make_population", "",
              "Peak RSS: VmHWM of the writing process (and /usr/bin/time's "
              "maximum resident set size).", "",
              "| kind | pixels | clients | seconds | GB on disk | peak RSS "
              "MiB | command |", "|---|---|---:|---:|---:|---:|---|"]
    for r in report["million_runs"]:
      lines.append(
          f"| {r['kind']} | {r['pixel_dtype'] or '-'} | "
          f"{r['num_clients']:,} | {r['seconds']:.0f} | "
          f"{r['bytes_on_disk'] / 1e9:.1f} | "
          f"{r['peak_rss_bytes'] / 2**20:.0f} "
          f"({(r['time_v_max_rss_kib'] or 0) / 1024:.0f}) | "
          f"`{r['command']}` |")
    lines.append("")
  return "\n".join(lines)


def main(argv: Sequence[str]) -> None:
  """Runs the measurements the flags ask for and writes the report."""
  cli.reject_extra_args(argv)
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="disk_formats-")
  os.makedirs(workdir, exist_ok=True)
  machine = {**report_lib.machine_info(), "platform": platform.platform()}
  report: dict[str, Any] = {
      "machine": machine,
      "command": ("python -m experiments.bench.disk_formats "
                  + " ".join(a for a in sys.argv[1:]
                             if not a.startswith("--workdir")))}
  try:
    if _NUM_CLIENTS.value > 0:
      report["comparison"] = compare_formats(workdir)
    report["million_runs"] = million_runs(workdir)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  for path in report_lib.write_outputs(report, _OUT.value, render):
    print(path)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags_or_exit())
