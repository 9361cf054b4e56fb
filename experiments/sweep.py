r"""Resumable, parallel hyperparameter sweeps over one config.

  python -m experiments.sweep --config=configs/NAME.py --workdir=DIR \
      --sweep="client.learning_rate=0.1,0.3 privacy.noise_multiplier=0.5,1" \
      [--parallel=N | --vectorize [--vectorize_max_members=K]] \
      [--rank_by=eval_accuracy] [--rank_mode=max] [--quiet] \
      [--config.KEY=VALUE ...]
  fedjax-lab sweep ...                   (the same, from any directory)

Every member (``--sweep`` syntax, ``@FILE`` included:
``experiments/lib/sweep_spec.py``)
runs as its own ``python -m experiments.run`` process in ``DIR/<slug>``, its
output in ``DIR/<slug>/log.txt``; ``--parallel=N`` runs N at a time, a
failed member does not stop the others. ``--vectorize`` instead trains the
members in this process as few compiled programs as possible, each a leading
member axis of one jitted round (members that differ only in learning rates,
optimizer hyperparameters, FedProx mu, DP clip norm / noise multiplier /
adaptive-clipping settings, seeds, rounds or the privacy budget share one;
``experiments/lib/vectorized.py``), at most ``--vectorize_max_members`` per
program; each member's folder is written as its own run would write it. ``DIR/sweep.json`` records the config,
the overrides, the spec and the members. Rerun the command (or just
``--workdir=DIR``) to finish an interrupted sweep: members with a
``summary.json`` are kept, interrupted ones are moved aside to
``<slug>.interrupted-<n>`` and run again. At the end, and with
``--summarize_only``, ``DIR/sweep_summary.csv`` and ``DIR/sweep_summary.md``
rank the members by ``--rank_by``. The last stdout line is a JSON summary.

Exit codes: 0 every member finished, 1 some member failed, 2 a bad spec,
config or workdir (nothing was run), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from typing import Any, IO, Sequence

from absl import app
from absl import flags
from ml_collections import config_flags

from experiments.lib import cli
from experiments.lib import paths
from experiments.lib import sweep_spec
from experiments.lib import sweep_summary
from experiments.lib import vectorized

_ROOT = paths.REPO_ROOT
paths.ensure_configs_importable()
SWEEP_FILE = "sweep.json"
LOG_FILE = "log.txt"
_LOCK_FILE = ".sweep.lock"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base config file (configs/*.py[:tiny]).", lock_config=True)
_SWEEP = flags.DEFINE_string(
    "sweep", None, "Grid 'key=v1,v2 key2=w1,w2', or @FILE (a grid or one "
    "'key=value key=value' member per line).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's folder.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Members run at a time.",
                                 lower_bound=1)
_RANK_BY = flags.DEFINE_string(
    "rank_by", "eval_accuracy", "A summary.json key, a table column, or a "
    "metrics.jsonl key (its last value) to rank the members by.")
_RANK_MODE = flags.DEFINE_enum("rank_mode", "max", ["max", "min"],
                               "Best is the largest (max) or smallest (min).")
_SUMMARIZE_ONLY = flags.DEFINE_bool(
    "summarize_only", False, "Only (re)write DIR's summary tables.")
_FORCE_NEW_SPEC = flags.DEFINE_bool(
    "force_new_spec", False, "Replace DIR's recorded sweep by this one; "
    "finished members it shares (same config and overrides) are kept.")
_QUIET = flags.DEFINE_bool("quiet", False, "No per-member progress lines.")
_VECTORIZE = flags.DEFINE_bool(
    "vectorize", False, "Train the members in this process as compiled "
    "programs with a leading member axis (members differing only in numbers "
    "and seeds share one).")
_VECTORIZE_MAX_MEMBERS = flags.DEFINE_integer(
    "vectorize_max_members", 0, "With --vectorize: at most this many members "
    "per program (0: no cap); bounds memory.", lower_bound=0)


def move_aside(path: str, tag: str) -> str:
  """Renames ``path`` to the first free ``path.<tag>-<n>``; returns it."""
  n = 1
  while os.path.exists(f"{path}.{tag}-{n}"):
    n += 1
  os.rename(path, f"{path}.{tag}-{n}")
  return f"{path}.{tag}-{n}"


def restart_interrupted(member_dir: str) -> str | None:
  """Readies an unfinished member's folder for its next run.

  A member with ``metrics.jsonl`` but no ``summary.json`` was interrupted (or
  failed mid-run). With a checkpoint in its ``checkpoints/`` folder the member
  is left in place: ``experiments.run`` resumes it from there. Without one
  (killed before its first checkpoint) ``experiments.run`` would refuse the
  folder, so it is moved aside to ``<member>.interrupted-<n>`` (returned) and
  the member starts over.
  """
  if (os.path.exists(os.path.join(member_dir, "metrics.jsonl")) and
      not os.path.exists(os.path.join(member_dir, "summary.json"))):
    if any(name.isdigit() for name in _listdir(
        os.path.join(member_dir, "checkpoints"))):
      return None
    return move_aside(member_dir, "interrupted")
  return None


def _listdir(path: str) -> list[str]:
  return os.listdir(path) if os.path.isdir(path) else []


def _member_identity(config: str, base_overrides: list[str],
                     overrides: dict[str, Any]) -> dict[str, Any]:
  """What a member's results depend on (recorded in its member.json)."""
  return {"config": os.path.normpath(config), "base_overrides": base_overrides,
          "overrides": overrides}


def _sweep_identity(record: dict[str, Any]) -> dict:
  return {"config": os.path.normpath(record["config"]),
          "base_overrides": record["base_overrides"],
          "members": [m["overrides"] for m in record["members"]]}


def _identity_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
  """What differs between two sweep records, in words."""
  old_id, new_id = _sweep_identity(old), _sweep_identity(new)
  if old_id["config"] != new_id["config"]:
    return f"config {new['config']} vs recorded {old['config']}"
  if old_id["base_overrides"] != new_id["base_overrides"]:
    return (f"overrides {' '.join(new['base_overrides']) or '(none)'} vs "
            f"recorded {' '.join(old['base_overrides']) or '(none)'}")
  old_slugs = {m["slug"] for m in old["members"]}
  new_slugs = {m["slug"] for m in new["members"]}
  return (f"{len(new_slugs - old_slugs)} new and {len(old_slugs - new_slugs)} "
          f"dropped members (recorded spec: {old['spec']!r})")


def _requested_record() -> dict[str, Any] | None:
  """The sweep the flags ask for (None: none given), validated; exits 2."""
  if _CONFIG.value is None and _SWEEP.value is None:
    return None
  if _CONFIG.value is None or _SWEEP.value is None:
    cli.fail("--config and --sweep go together (leave both out to continue "
             "the sweep recorded in --workdir)")
  config_flag = flags.FLAGS["config"]
  fixed = config_flags.get_override_values(config_flag)
  try:
    parsed = sweep_spec.parse_spec(_SWEEP.value)
    members = sweep_spec.resolve_members(parsed, _CONFIG.value, list(fixed))
  except sweep_spec.SpecError as e:
    cli.fail(str(e), 2)
  return {
      "config": config_flag.config_filename,
      "base_overrides": [f"--config.{key}={sweep_spec.format_value(value)}"
                         for key, value in fixed.items()],
      "spec": parsed.text, "spec_file": parsed.source, "spec_kind": parsed.kind,
      "members": [{"slug": m.slug, "overrides": m.overrides} for m in members],
      "command": shlex.join(["python", "-m", "experiments.sweep",
                             *sys.argv[1:]]),
  }


def _settle_record(workdir: str,
                   requested: dict[str, Any] | None) -> tuple[dict, bool]:
  """The sweep to run in ``workdir`` and whether to (re)write its record.

  Compares the requested sweep with the recorded one; changes nothing on disk
  and exits with code 2 where they conflict.
  """
  recorded = sweep_summary.read_json(os.path.join(workdir, SWEEP_FILE))
  if recorded is None and requested is None:
    cli.fail(f"{workdir} holds no {SWEEP_FILE}; pass --config and --sweep")
  if recorded is None:
    if os.path.isdir(workdir) and set(os.listdir(workdir)) - {_LOCK_FILE}:
      cli.fail(f"{workdir} is not empty and holds no {SWEEP_FILE}; pick a new "
               "--workdir")
    return json.loads(json.dumps(requested)), True
  if requested is None or (json.loads(json.dumps(_sweep_identity(
      requested))) == _sweep_identity(recorded)):
    return recorded, False
  if not _FORCE_NEW_SPEC.value:
    cli.fail(f"{workdir} holds a different sweep ("
             f"{_identity_difference(recorded, requested)}); rerun the "
             "recorded sweep (leaving out --config and --sweep does), choose "
             "a new --workdir, or pass --force_new_spec to replace it")
  return json.loads(json.dumps(requested)), True


def _lock(workdir: str) -> IO[str] | None:
  """Holds ``workdir``'s sweep lock (None: another sweep process holds it)."""
  handle = open(os.path.join(workdir, _LOCK_FILE), "a")
  try:
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    handle.close()
    return None
  return handle


@dataclasses.dataclass
class _Job:
  """One member's run: the process and the log it writes."""

  member: dict[str, Any]
  member_dir: str
  command: list[str]
  process: subprocess.Popen | None = None
  log: IO[str] | None = None
  started: float = 0.0


def _jobs(workdir: str, record: dict[str, Any]) -> list[_Job]:
  """The members left to run, their folders readied (stale ones moved aside)."""
  jobs = []
  for member in record["members"]:
    member_dir = os.path.join(workdir, member["slug"])
    info = sweep_summary.read_json(
        os.path.join(member_dir, sweep_summary.MEMBER_FILE))
    if info is not None and (
        _member_identity(info.get("config", ""), info.get("base_overrides"),
                         info.get("overrides")) !=
        _member_identity(record["config"], record["base_overrides"],
                         member["overrides"])):
      move_aside(member_dir, "stale")  # run with another config or overrides
    if sweep_summary.member_status(member_dir) == "done":
      continue
    restart_interrupted(member_dir)
    command = [sys.executable, "-m", "experiments.run",
               f"--config={record['config']}", f"--workdir={member_dir}",
               *record["base_overrides"],
               *(f"--config.{key}={sweep_spec.format_value(value)}"
                 for key, value in member["overrides"].items()),
               "--noprogress"]
    jobs.append(_Job(member, member_dir, command))
  return jobs


def _child_env(parallel: int) -> dict[str, str]:
  """The members' environment: the repo importable; GPU memory shared."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  if parallel > 1 and not any(name.startswith("XLA_PYTHON_CLIENT_")
                              for name in env):
    # One process must not grab most of an accelerator's memory up front.
    env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  return env


def _start(job: _Job, record: dict[str, Any], env: dict[str, str]) -> None:
  """Records the member in its member.json and starts its process."""
  os.makedirs(job.member_dir, exist_ok=True)
  sweep_summary.write_json(
      os.path.join(job.member_dir, sweep_summary.MEMBER_FILE),
      {"slug": job.member["slug"], "config": record["config"],
       "base_overrides": record["base_overrides"],
       "overrides": job.member["overrides"], "command": job.command,
       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "exit_code": None,
       "wall_seconds": None})
  job.log = open(os.path.join(job.member_dir, LOG_FILE), "w")
  job.started = time.perf_counter()
  job.process = subprocess.Popen(job.command, stdout=job.log,
                                 stderr=subprocess.STDOUT, env=env)


def _finish(job: _Job) -> int:
  """Records a finished member's exit code and wall time; returns the code."""
  job.log.close()
  path = os.path.join(job.member_dir, sweep_summary.MEMBER_FILE)
  info = sweep_summary.read_json(path)
  info.update(exit_code=job.process.returncode,
              wall_seconds=time.perf_counter() - job.started)
  sweep_summary.write_json(path, info)
  return job.process.returncode


def _log_tail(member_dir: str, lines: int = 12) -> str:
  """The last ``lines`` lines of a member's log."""
  with open(os.path.join(member_dir, LOG_FILE), errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def run_jobs(jobs: Sequence[_Job], record: dict[str, Any], parallel: int,
             quiet: bool) -> dict[str, int]:
  """Runs the members, ``parallel`` processes at a time; ``{slug: exit code}``.

  A failed member is reported (with its log's tail) and the rest go on;
  Ctrl-C terminates the running members (they count as interrupted).
  """
  env = _child_env(parallel)
  pending, running, codes = list(jobs), [], {}
  try:
    while pending or running:
      while pending and len(running) < parallel:
        job = pending.pop(0)
        _start(job, record, env)
        running.append(job)
        if not quiet:
          print(f"sweep: started {job.member['slug']}", file=sys.stderr)
      time.sleep(0.1)
      for job in [job for job in running if job.process.poll() is not None]:
        running.remove(job)
        code = codes[job.member["slug"]] = _finish(job)
        where = f"[{len(codes)}/{len(jobs)}] {job.member['slug']}"
        if code:
          print(f"sweep: {where} FAILED (exit {code}); end of "
                f"{os.path.join(job.member_dir, LOG_FILE)}:\n"
                f"{_log_tail(job.member_dir)}", file=sys.stderr)
        elif not quiet:
          summary = sweep_summary.read_json(
              os.path.join(job.member_dir, "summary.json")) or {}
          seconds = time.perf_counter() - job.started
          print(f"sweep: {where} done in {seconds:.1f} s, final_eval_accuracy"
                f"={summary.get('final_eval_accuracy')}", file=sys.stderr)
  except KeyboardInterrupt:
    for job in running:
      job.process.terminate()
    for job in running:
      job.process.wait()
      job.log.close()
    raise
  return codes


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
  """SIGTERM handler: stop like Ctrl-C, so the members are stopped too."""
  del signum, frame
  raise KeyboardInterrupt


def main(argv: Sequence[str]) -> None:
  """Runs (or continues, or summarizes) the sweep the flags describe."""
  cli.reject_extra_args(argv)
  workdir = _WORKDIR.value
  if not workdir:
    cli.fail("--workdir is required")
  rank_by, rank_mode = _RANK_BY.value, _RANK_MODE.value
  if _VECTORIZE.value and _PARALLEL.value > 1:
    cli.fail("--vectorize trains the members in this process; leave out "
             "--parallel")
  if _SUMMARIZE_ONLY.value:
    record = sweep_summary.read_json(os.path.join(workdir, SWEEP_FILE))
    if record is None:
      cli.fail(f"{workdir} holds no {SWEEP_FILE} to summarize")
    lock = _lock(workdir)
    if lock is not None:
      lock.close()
    rows = sweep_summary.write_summary(workdir, record, rank_by, rank_mode,
                                       sweep_active=lock is None)
    sweep_summary.report(workdir, rows, rank_by)
    return
  record, write_record = _settle_record(workdir, _requested_record())
  os.makedirs(workdir, exist_ok=True)
  lock = _lock(workdir)
  if lock is None:
    cli.fail(f"another sweep process is running in {workdir}")
  if write_record:
    path = os.path.join(workdir, SWEEP_FILE)
    if os.path.exists(path):  # --force_new_spec: keep the old record
      move_aside(path, "replaced")
    sweep_summary.write_json(path, record)
  jobs = _jobs(workdir, record)
  if not _QUIET.value:
    how = ("vectorized" if _VECTORIZE.value
           else f"{_PARALLEL.value} at a time")
    print(f"sweep: {len(record['members'])} members, "
          f"{len(record['members']) - len(jobs)} already done, running "
          f"{len(jobs)} ({how}) in {workdir}", file=sys.stderr)
  signal.signal(signal.SIGTERM, _terminate_as_interrupt)
  try:
    if _VECTORIZE.value:
      vectorized.run_groups(workdir, record, [job.member for job in jobs],
                            _VECTORIZE_MAX_MEMBERS.value, _QUIET.value)
    else:
      run_jobs(jobs, record, _PARALLEL.value, _QUIET.value)
  except KeyboardInterrupt:
    sweep_summary.write_summary(workdir, record, rank_by, rank_mode)
    print("sweep: interrupted; rerun the command to continue", file=sys.stderr)
    sys.exit(130)
  rows = sweep_summary.write_summary(workdir, record, rank_by, rank_mode)
  sweep_summary.report(workdir, rows, rank_by)
  failed = [row["member"] for row in rows if row["status"] != "done"]
  if failed:
    print(f"sweep: {len(failed)} member(s) failed: {', '.join(failed)}",
          file=sys.stderr)
    sys.exit(1)


def run_program() -> None:
  """The program: parses ``sys.argv`` (errors: exit 2) and runs ``main``."""
  app.run(main, flags_parser=cli.parse_flags_or_exit())


if __name__ == "__main__":
  run_program()
