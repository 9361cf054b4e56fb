r"""Prepares the built-in sources as TFDS datasets, offline.

  python -m experiments.prepare_tfds --datasets=shakespeare,mnist \
      --data_dir=DIR [--load_kwargs=JSON --max_clients=N --overwrite \
      --progress]

``--datasets``: comma-separated source names with a TFDS builder
(``shakespeare``, ``shakespeare_words``, ``mnist``, ``digits``, ``synthetic``),
each optionally with a builder config, ``synthetic/iid`` (default: the
``default`` config, the source's ``load()`` defaults). Each is written by
:func:`fedjax_lab.data.tfds_builders.prepare` from the installed packages
(nothing is downloaded) as ``array_record`` files under
``DIR/fedjax_lab_<source>/<config>/<version>/``; ``--data_dir`` defaults to
TFDS's (``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``). A dataset already
prepared there is kept unless ``--overwrite``. ``--load_kwargs`` (a JSON
object, e.g. ``'{"sequence_length": 40}'``) passes ``load()`` arguments to
every listed source instead of a config name; the config is then the one
:func:`fedjax_lab.data.tfds_builders.config_for` picks (a registered one, or
``kw_<hash>``), the same that ``load_through_tfds`` with those arguments
reads. ``--max_clients=N`` writes only the first N clients of each split
(config ``<config>_first<N>``), for quick checks.

Prints one line per dataset on stderr; the last stdout line is a JSON list
with, per dataset, its TFDS name (``name/config/version``), folder, and
example and client counts per split. Bad flags or an unknown dataset or
config: ``error: ...`` on stderr, exit status 2.
"""

import json
import sys
import time
from typing import Sequence

from absl import app
from absl import flags

from experiments.lib import cli

_DATASETS = flags.DEFINE_list(
    "datasets", None, "Sources to prepare, e.g. shakespeare,mnist or "
    "synthetic/iid (source/config).")
_DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "TFDS data dir (default: $TFDS_DATA_DIR or "
    "~/tensorflow_datasets).")
_LOAD_KWARGS = flags.DEFINE_string(
    "load_kwargs", "", "JSON object of load() arguments for every listed "
    "source (instead of source/config).")
_MAX_CLIENTS = flags.DEFINE_integer(
    "max_clients", 0, "Keep only the first N clients of each split (0: all).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Prepare again even if already prepared.")
_PROGRESS = flags.DEFINE_bool("progress", False,
                              "Show TFDS's progress bars.")


def parse_entry(entry: str) -> tuple[str, str | None]:
  """``"source"`` or ``"source/config"`` -> ``(source, config or None)``."""
  source, _, config = entry.strip().partition("/")
  return source, config or None


def main(argv: Sequence[str]) -> None:
  """Prepares every dataset the flags name and reports what was written."""
  cli.reject_extra_args(argv)
  # pylint: disable-next=g-import-not-at-top
  import tensorflow_datasets as tfds
  # pylint: disable-next=g-import-not-at-top
  from fedjax_lab.data import tfds_builders
  if not _DATASETS.value:
    cli.fail("--datasets is required (e.g. --datasets=shakespeare,mnist); "
             f"sources: {', '.join(sorted(tfds_builders.BUILDERS))}.", 2)
  if _MAX_CLIENTS.value < 0:
    cli.fail(f"--max_clients must be >= 0, got {_MAX_CLIENTS.value}.", 2)
  load_kwargs = {}
  if _LOAD_KWARGS.value:
    try:
      load_kwargs = json.loads(_LOAD_KWARGS.value)
    except json.JSONDecodeError as e:
      cli.fail(f"--load_kwargs is not JSON: {e}", 2)
    if not isinstance(load_kwargs, dict):
      cli.fail("--load_kwargs must be a JSON object, e.g. "
               "'{\"sequence_length\": 40}'.", 2)
  entries = [parse_entry(e) for e in _DATASETS.value]
  # Check every name and argument before writing anything.
  overrides = {k: load_kwargs.pop(k) for k in list(load_kwargs)
               if k == "cache_dir"}
  for index, (source, config) in enumerate(entries):
    try:
      if load_kwargs:
        if config is not None:
          cli.fail(f"{source}/{config}: give a config or --load_kwargs, "
                   "not both.", 2)
        config = tfds_builders.config_for(source, load_kwargs)
        entries[index] = (source, config)
      tfds_builders.builder(source, _DATA_DIR.value, config,
                            load_overrides=overrides)
    except (ValueError, TypeError) as e:
      cli.fail(str(e), 2)
  if not _PROGRESS.value:
    tfds.disable_progress_bar()
  cli.quiet_library_logs()
  report = []
  for source, config in entries:
    started = time.perf_counter()
    try:
      builder = tfds_builders.prepare(
          source, _DATA_DIR.value, config,
          max_clients=_MAX_CLIENTS.value or None,
          overwrite=_OVERWRITE.value, load_overrides=overrides)
    except (ValueError, TypeError, FileNotFoundError) as e:
      cli.fail(f"{source}: {type(e).__name__}: {e}", 2)
    seconds = time.perf_counter() - started
    splits = builder.info.splits
    entry = {
        "dataset": source,
        "tfds_name": builder.info.full_name,
        "path": str(builder.data_dir),
        "seconds": round(seconds, 2),
        "examples": {s: int(splits[s].num_examples)
                     for s in tfds_builders.SPLITS},
        "clients": dict(builder.info.metadata["num_clients"]),
    }
    report.append(entry)
    print(f"{entry['tfds_name']}: {entry['examples']['train']:,} train / "
          f"{entry['examples']['test']:,} test examples in {entry['path']} "
          f"({seconds:.1f} s)", file=sys.stderr)
  print(json.dumps(report))


def run_program() -> None:
  """The program: parses ``sys.argv`` (errors: exit 2) and runs ``main``."""
  app.run(main, flags_parser=cli.parse_flags_or_exit())


if __name__ == "__main__":
  run_program()
