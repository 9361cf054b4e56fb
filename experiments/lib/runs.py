"""Reading saved runs for plots and reports: :class:`Run` and
:func:`discover_runs`, plus the numbers taken from a run.

A path names runs in one of these forms: a run's workdir (``metrics.jsonl``;
``config.json`` and ``summary.json`` when present), a sweep root (members in
``sweep.json``'s order or natural name order, ``*.interrupted-N`` left out),
a folder of saved runs ``<name>.metrics.jsonl`` (+ ``<name>.summary.json``),
or one ``*metrics.jsonl`` file. Labels drop default workdirs' time stamps and
gain their parent folder where names collide. From a run: a metric's series
against rounds, its final value, whether it is a DP run and under which
neighbouring relation, and its per-client accuracy lists.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Any, Sequence

import numpy as np

METRICS_FILE = "metrics.jsonl"
SWEEP_FILE = "sweep.json"
# experiments/sweep.py moves an interrupted member aside to <slug>.interrupted-N
_INTERRUPTED = re.compile(r"\.interrupted-\d+$")
_TIME_STAMP = re.compile(r"-\d{8}-\d{6}$")  # cli.default_workdir's suffix


@dataclasses.dataclass
class Run:
  """One run's metrics: ``records`` are the metrics.jsonl objects in order."""
  name: str
  metrics_path: str
  records: list[dict[str, Any]]
  config: dict[str, Any] | None = None
  summary: dict[str, Any] | None = None


class PlotError(Exception):
  """A path that holds no run (the CLI turns it into exit code 2)."""


def _natural_key(name: str) -> list[Any]:
  return [float(part) if part[:1].isdigit() else part
          for part in re.findall(r"\d+(?:\.\d+)?|\D+", name)]


def _read_json(path: str) -> Any:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _load_run(metrics_path: str, name: str, config_path: str | None,
              summary_path: str) -> Run:
  """Reads one run; a bad or empty metrics file raises PlotError."""
  try:
    with open(metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
  except (OSError, json.JSONDecodeError) as e:
    raise PlotError(f"cannot read {metrics_path}: {e}") from e
  if not records:
    raise PlotError(f"{metrics_path} holds no records")
  return Run(name, metrics_path, records,
             _read_json(config_path) if config_path else None,
             _read_json(summary_path))


def _run_from_dir(path: str) -> Run:
  return _load_run(os.path.join(path, METRICS_FILE),
                   os.path.basename(os.path.abspath(path)),
                   os.path.join(path, "config.json"),
                   os.path.join(path, "summary.json"))


def _run_from_file(path: str) -> Run:
  folder, base = os.path.split(path)
  prefix = base[:-len(METRICS_FILE)]
  name = prefix.rstrip("._-") or os.path.basename(os.path.abspath(folder))
  config = os.path.join(folder, f"{prefix}config.json")
  return _load_run(path, name, config,
                   os.path.join(folder, f"{prefix}summary.json"))


def _sweep_members(path: str) -> list[str]:
  """Member folders in ``sweep.json``'s order (experiments/sweep.py), if any."""
  try:
    record = _read_json(os.path.join(path, SWEEP_FILE)) or {}
    return [str(m["slug"]) for m in record.get("members", [])]
  except (json.JSONDecodeError, AttributeError, KeyError, TypeError):
    return []


def discover_runs(paths: Sequence[str]) -> list[Run]:
  """The runs that ``paths`` name (see the module docstring for the forms).

  Other files (a shell glob's README.md, a run's summary.json) are skipped
  with a note on stderr.

  Raises:
    PlotError: a path does not exist, a folder holds no metrics file, or no
      path named a run.
  """
  runs = []
  for path in paths:
    if os.path.isfile(path):
      if path.endswith(METRICS_FILE):
        runs.append(_run_from_file(path))
      else:
        print(f"note: skipping {path} (not a *{METRICS_FILE} file)",
              file=sys.stderr)
      continue
    if not os.path.isdir(path):
      raise PlotError(f"{path} does not exist (expected a run's workdir "
                      f"with {METRICS_FILE}, a sweep root or a metrics file)")
    if os.path.exists(os.path.join(path, METRICS_FILE)):
      runs.append(_run_from_dir(path))
      continue
    entries = _sweep_members(path) or sorted(os.listdir(path),
                                             key=_natural_key)
    members = [os.path.join(path, e) for e in entries
               if os.path.isfile(os.path.join(path, e, METRICS_FILE)) and
               not _INTERRUPTED.search(e)]
    saved = [os.path.join(path, e) for e in entries
             if e.endswith("." + METRICS_FILE)]
    if not members and not saved:
      kind = ("sweep root" if os.path.exists(os.path.join(path, SWEEP_FILE))
              else "folder")
      raise PlotError(f"no {METRICS_FILE} in {path} (nor in the subfolders "
                      f"of this {kind})")
    runs += [_run_from_dir(m) for m in members]
    runs += [_run_from_file(s) for s in saved]
  if not runs:
    raise PlotError(f"no run among {', '.join(paths)}")
  _disambiguate(runs)
  return runs


def _disambiguate(runs: list[Run]) -> None:
  """Short unique labels: drop time stamps, then add parent folders."""
  stripped = [_TIME_STAMP.sub("", run.name) for run in runs]
  for run, name in zip(runs, stripped):
    if stripped.count(name) == 1:  # else the stamps tell the runs apart
      run.name = name
  names = [run.name for run in runs]
  for run in runs:
    if names.count(run.name) > 1:
      home = os.path.dirname(os.path.abspath(run.metrics_path))
      if os.path.basename(run.metrics_path) == METRICS_FILE:
        home = os.path.dirname(home)  # the workdir's parent, not the workdir
      run.name = f"{os.path.basename(home)}/{run.name}"
  seen: dict[str, int] = {}
  for run in runs:
    seen[run.name] = seen.get(run.name, 0) + 1
    if seen[run.name] > 1:
      run.name = f"{run.name} ({seen[run.name]})"


def as_number(value: Any) -> float | None:
  """A finite-or-not float from a record value (``"nan"``/``"inf"`` too)."""
  if isinstance(value, bool) or value is None:
    return None
  if isinstance(value, (int, float)):
    return float(value)
  if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
    return float(value)
  return None


def series(run: Run, key: str) -> tuple[np.ndarray, np.ndarray]:
  """``(rounds, values)`` of the records that hold a number under ``key``."""
  points = [(r["round"], v) for r in run.records
            if "round" in r and (v := as_number(r.get(key))) is not None]
  rounds, values = zip(*points) if points else ((), ())
  return np.asarray(rounds, float), np.asarray(values, float)


def final_value(run: Run, key: str, summary_key: str) -> float | None:
  """``summary[summary_key]`` if present, else the last record's ``key``."""
  value = as_number((run.summary or {}).get(summary_key))
  if value is None:
    values = series(run, key)[1]
    value = float(values[-1]) if values.size else None
  return value


def is_private(run: Run) -> bool:
  """Whether the run reports a finite epsilon (a DP run)."""
  return bool(np.isfinite(series(run, "epsilon")[1]).any())


def neighboring_relation(run: Run) -> str | None:
  """Short name of the neighbouring relation a DP run's epsilon is under:
  ``add/remove`` (Poisson), ``replace-one`` (fixed cohorts, local DP) or
  ``replace-special`` (DP-FTRL's tree); None when unknown. Epsilons under
  different relations are not comparable numbers."""
  text = ((run.summary or {}).get("privacy") or {}).get(
      "neighboring_relation", "")
  for prefix, short in (("add/remove", "add/remove"),
                        ("replace one client's", "replace-special"),
                        ("replace one", "replace-one")):
    if text.startswith(prefix):
      return short
  config = run.config or {}
  mechanism = (config.get("privacy") or {}).get("mechanism", "none")
  if mechanism == "tree":
    return "replace-special"
  if mechanism == "local" or (mechanism != "none" and
                              config.get("sampling") in ("fixed", "shuffle")):
    return "replace-one"
  if mechanism != "none" and config.get("sampling") == "poisson":
    return "add/remove"
  return None


def relation_labels(runs: Sequence[Run]) -> tuple[str, dict[str, str]]:
  """``(axis suffix, {run name: legend label})`` saying which relation each
  epsilon uses: once on the axis when all agree, per run when they differ."""
  relations = {run.name: neighboring_relation(run) for run in runs}
  known = {r for r in relations.values() if r}
  if len(known) <= 1:
    suffix = f" ({known.pop()} neighbours)" if known else ""
    return suffix, {run.name: run.name for run in runs}
  return (" (relations differ: not comparable, see legend)",
          {name: f"{name} [{relation or '?'}]"
           for name, relation in relations.items()})


def per_client_accuracies(run: Run) -> dict[str, np.ndarray]:
  """Per-client accuracy lists: the summary's ``personalization`` block and
  list-valued record keys naming an accuracy (the last record holding each)."""
  found: dict[str, np.ndarray] = {}
  sources = [(run.summary or {}).get("personalization")]
  sources += list(reversed(run.records))
  for source in sources:
    if not isinstance(source, dict):
      continue
    for key, value in source.items():
      if isinstance(value, dict):
        value = list(value.values())
      if ("accuracy" in key and key not in found and
          isinstance(value, list) and value):
        numbers = [as_number(v) for v in value]
        if all(n is not None for n in numbers):
          found[key] = np.asarray(numbers, float)
  return found
