"""``experiments.sweep --vectorize``: the sweep's members compiled together.

The members left to run are grouped into programs
(:func:`fedjax_lab.training.member_setup.group_members`: members differing
only in numbers the round uses and in host values share one) and each group
trains in this process with :func:`fedjax_lab.training.member_loop.
run_members`. Every member's folder ends up as a member run by its own
``experiments.run`` process leaves it (``config.json``, ``metrics.jsonl``,
checkpoints, ``summary.json``), plus its ``member.json`` (with the group it
trained in) and a ``log.txt`` that says where it trained and how it ended.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Sequence

from experiments.lib import cli
from experiments.lib import sweep_spec
from experiments.lib import sweep_summary

LOG_FILE = "log.txt"


def member_config(record: dict[str, Any], overrides: dict[str, Any]) -> Any:
  """A member's config: the sweep's config file, its command-line overrides
  (``--config.KEY=VALUE``) and the member's own, as ``experiments.run``
  builds it from the member's command line."""
  config = cli.load_config(record["config"])
  assignments = []
  for flag in record["base_overrides"]:
    key, _, text = flag[len("--config."):].partition("=")
    assignments.append((key, sweep_spec.RawValue(text)))
  leaves = sweep_spec.config_leaves(config)
  values = {key: sweep_spec.typed_value(key, raw, leaves.get(key))
            for key, raw in assignments}
  values.update(overrides)
  from fedjax_lab.training import defaults  # pylint: disable=g-import-not-at-top
  for key, value in values.items():
    defaults.set_dotted(config, key, value)
  return config


def _write_info(member_dir: str, member: dict[str, Any],
                record: dict[str, Any], group: Sequence[str],
                **fields: Any) -> None:
  os.makedirs(member_dir, exist_ok=True)
  path = os.path.join(member_dir, sweep_summary.MEMBER_FILE)
  info = sweep_summary.read_json(path) or {}
  info.update({"slug": member["slug"], "config": record["config"],
               "base_overrides": record["base_overrides"],
               "overrides": member["overrides"],
               "command": "experiments.sweep --vectorize",
               "vectorized_group": list(group), **fields})
  sweep_summary.write_json(path, info)


def _log(member_dir: str, text: str, mode: str = "a") -> None:
  with open(os.path.join(member_dir, LOG_FILE), mode) as f:
    f.write(text.rstrip("\n") + "\n")


def run_groups(workdir: str, record: dict[str, Any],
               members: Sequence[dict[str, Any]], max_members: int,
               quiet: bool) -> dict[str, int]:
  """Trains ``members`` (record entries, folders readied) grouped into
  programs; returns ``{slug: exit code}`` (0 done, 2 a bad config, 3
  diverged, 1 another failure). Ctrl-C / SIGTERM: every unfinished member
  saves a checkpoint, then ``KeyboardInterrupt`` propagates."""
  from fedjax_lab.training import loop  # pylint: disable=g-import-not-at-top
  from fedjax_lab.training import member_loop  # pylint: disable=g-import-not-at-top
  from fedjax_lab.training import member_setup  # pylint: disable=g-import-not-at-top
  from fedjax_lab.training import setup  # pylint: disable=g-import-not-at-top

  cli.quiet_library_logs()
  codes: dict[str, int] = {}
  configs = {}
  for member in members:
    member_dir = os.path.join(workdir, member["slug"])
    os.makedirs(member_dir, exist_ok=True)
    try:
      configs[member["slug"]] = member_config(record, member["overrides"])
    except (sweep_spec.SpecError, KeyError) as e:
      _log(member_dir, f"error: {e}", "w")
      _write_info(member_dir, member, record, [], exit_code=2)
      codes[member["slug"]] = 2
  runnable = [m for m in members if m["slug"] in configs]
  groups = member_setup.group_members(
      [configs[m["slug"]] for m in runnable], max_members)
  number = 0
  while groups:
    indices = groups.pop(0)
    number += 1
    group = [runnable[i] for i in indices]
    slugs = [m["slug"] for m in group]
    dirs = [os.path.join(workdir, slug) for slug in slugs]
    experiments, kept = [], []
    for member, member_dir in zip(group, dirs):
      _log(member_dir, f"trained with {len(group) - 1} other member(s) as "
           f"one program (vectorized group {number}): "
           f"{', '.join(slugs)}", "w")
      try:
        experiments.append(setup.build_experiment(
            configs[member["slug"]],
            like=experiments[0] if experiments else None))
        kept.append((member, member_dir))
      except (setup.ConfigError, ValueError, TypeError, FileNotFoundError) as e:
        _log(member_dir, f"error: {e}")
        _write_info(member_dir, member, record, slugs, exit_code=2)
        codes[member["slug"]] = 2
    if not kept:
      continue
    started = time.perf_counter()
    for member, member_dir in kept:
      _write_info(member_dir, member, record, slugs,
                  started=time.strftime("%Y-%m-%d %H:%M:%S"), exit_code=None,
                  wall_seconds=None)
    if not quiet:
      print(f"sweep: group {number}: {len(kept)} members as one program",
            file=sys.stderr)
    try:
      outcomes = member_loop.run_members(
          experiments, [d for _, d in kept], show_progress=not quiet)
    except loop.RunInterrupted as e:
      for _, member_dir in kept:
        _log(member_dir, f"interrupted: {e}")
      raise KeyboardInterrupt from e
    except member_setup.NotVectorizable as e:
      if len(kept) == 1:
        outcomes = [member_loop.MemberOutcome(kept[0][1], None, e)]
      else:
        print(f"sweep: {e} Running these {len(kept)} members as a program "
              "each.", file=sys.stderr)
        groups[:0] = [[indices[group.index(member)]] for member, _ in kept]
        continue
    except (ValueError, FileExistsError, OSError) as e:
      outcomes = [member_loop.MemberOutcome(d, None, e) for _, d in kept]
    wall = time.perf_counter() - started
    for (member, member_dir), outcome in zip(kept, outcomes):
      if outcome.error is None:
        code = 0
        _log(member_dir, f"done in {wall:.1f} s (the group's wall time): "
             f"final_eval_accuracy="
             f"{outcome.summary.get('final_eval_accuracy')}")
      else:
        code = (sweep_summary.DIVERGED_EXIT_CODE
                if isinstance(outcome.error, loop.DivergedError) else 1)
        _log(member_dir, f"error: {outcome.error}")
      _write_info(member_dir, member, record, slugs, exit_code=code,
                  wall_seconds=wall)
      codes[member["slug"]] = code
      if not quiet:
        status = "done" if code == 0 else f"FAILED (exit {code})"
        print(f"sweep: [{len(codes)}/{len(members)}] {member['slug']} "
              f"{status}", file=sys.stderr)
  return codes
