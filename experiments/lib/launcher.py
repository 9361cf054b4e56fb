"""Starts one experiment as several local processes (``--num_processes=N``).

Each child is the same command with ``--process_id=i`` and the
coordinator's address added; the children join through
``jax.distributed`` (:mod:`fedjax_lab.engine.distributed`) and behave as one
run: process 0 writes the workdir and prints the run's output, the others
write nothing (their stdout and stderr go to a log that is shown only when
one of them fails). Each child keeps to its own share of the machine's
cores, so the processes do not oversubscribe them. SIGINT/SIGTERM are passed on to every child (they stop
after the round, with a checkpoint, as a single process does). When a child
fails, the others are stopped (they would otherwise wait for it at the next
collective) and the launcher exits with the first failure's code.

On a cluster, start the processes with the cluster's own tool instead (one
per host, each with ``--num_processes``, ``--process_id`` and
``--coordinator_address``, or the environment JAX detects); see the README.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Sequence

# How long the other children get to exit after one failed (they are
# blocked in a collective with it) before they are killed.
_STOP_GRACE_S = 3.0
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
  """A TCP port on localhost nobody listens on now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
    sock.bind(("127.0.0.1", 0))
    return sock.getsockname()[1]


def _without_flags(argv: Sequence[str], names: Sequence[str]) -> list[str]:
  """``argv`` without ``--name=value`` / ``--name value`` of ``names``."""
  out: list[str] = []
  skip = False
  for arg in argv:
    if skip:
      skip = False
      continue
    name = arg.split("=", 1)[0]
    if name in [f"--{n}" for n in names]:
      skip = "=" not in arg
      continue
    out.append(arg)
  return out


def child_commands(argv: Sequence[str], num_processes: int, workdir: str,
                   coordinator_address: str) -> list[list[str]]:
  """The command of each local process: the same module and flags, with
  the process id, the coordinator and an explicit workdir (a default one
  would differ between processes)."""
  base = _without_flags(argv[1:], ("num_processes", "process_id",
                                   "coordinator_address", "workdir"))
  return [[sys.executable, "-m", "experiments.run", *base,
           f"--workdir={workdir}", f"--num_processes={num_processes}",
           f"--process_id={index}",
           f"--coordinator_address={coordinator_address}"]
          for index in range(num_processes)]


def launch(argv: Sequence[str], num_processes: int, workdir: str) -> int:
  """Runs the command ``argv`` as ``num_processes`` local processes; returns
  the exit code (0, or the first failing child's)."""
  coordinator = f"127.0.0.1:{free_port()}"
  commands = child_commands(argv, num_processes, workdir, coordinator)
  env = dict(os.environ)
  logs = [None] + [tempfile.TemporaryFile("w+") for _ in commands[1:]]
  core_sets = _core_sets(num_processes)
  children = [subprocess.Popen(command, env=env, stdout=log, stderr=log,
                               preexec_fn=_child_setup(cores))
              for command, log, cores in zip(commands, logs, core_sets)]

  def forward(signum, frame):
    del frame
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  previous = {sig: signal.signal(sig, forward)
              for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    failure = None
    while any(child.poll() is None for child in children):
      for index, child in enumerate(children):
        code = child.poll()
        if code not in (None, 0) and failure is None:
          failure = (index, code)
      if failure is not None:
        break
      time.sleep(0.1)
    if failure is None:
      failure = next(((i, c.returncode) for i, c in enumerate(children)
                      if c.returncode), None)
    if failure is not None:
      _stop(children)
      index, code = failure
      if index > 0 and logs[index] is not None:
        logs[index].seek(0)
        tail = logs[index].read()[-4000:]
        print(f"process {index} of {num_processes} exited with code {code}; "
              f"its output:\n{tail}", file=sys.stderr)
      return code
    return 0
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    for log in logs:
      if log is not None:
        log.close()


def _core_sets(num_processes: int) -> list[set[int] | None]:
  """The CPU cores each local process may use: the launcher's cores split
  into ``num_processes`` disjoint sets (XLA sizes its thread pool from
  them; processes sharing all cores oversubscribe them), or ``None`` each
  where there are fewer cores than processes or no affinity API."""
  if not hasattr(os, "sched_getaffinity"):
    return [None] * num_processes
  cores = sorted(os.sched_getaffinity(0))
  if len(cores) < num_processes:
    return [None] * num_processes
  per_process = len(cores) // num_processes
  return [set(cores[i * per_process:(i + 1) * per_process])
          for i in range(num_processes)]


def _child_setup(cores: set[int] | None):
  """What a child does before it starts: keep to its cores, and ask Linux
  to kill it when the launcher dies, even by SIGKILL (elsewhere a no-op),
  so that no orphan keeps the workdir or the coordinator's port."""

  def setup() -> None:
    if cores is not None:
      os.sched_setaffinity(0, cores)
    if not sys.platform.startswith("linux"):
      return
    try:
      libc = ctypes.CDLL("libc.so.6", use_errno=True)
      libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
      pass

  return setup


def _stop(children: Sequence[subprocess.Popen]) -> None:
  """Stops the children still running: SIGTERM, then SIGKILL after a
  grace period."""
  for child in children:
    if child.poll() is None:
      child.terminate()
  deadline = time.monotonic() + _STOP_GRACE_S
  for child in children:
    remaining = max(deadline - time.monotonic(), 0.0)
    try:
      child.wait(timeout=remaining)
    except subprocess.TimeoutExpired:
      child.kill()
      child.wait()
