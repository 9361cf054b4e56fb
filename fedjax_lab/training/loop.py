"""The round loop: sample, batch, run the compiled round, call the callbacks.

The loop only trains rounds: evaluation, personalization, the privacy
budget stop, the time limit, metrics sinks, checkpoints and the progress bar
are callbacks (:mod:`fedjax_lab.training.callbacks`); signals (SIGINT/SIGTERM
stop after the round, with a checkpoint) and divergence stay here. The host
prepares round t+1's cohort in a background thread while the device runs round t
(:class:`fedjax_lab.data.prefetch.Prefetcher`).

A run lives in its workdir. Re-running the same command on a workdir whose
run was interrupted (killed, Ctrl-C, SIGTERM, a crash) resumes it from its
newest readable checkpoint (:mod:`fedjax_lab.training.workdir`, which also
locks the workdir against a second run); the resumed rounds and metrics are
the ones an uninterrupted run produces.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any, Sequence


import jax
import numpy as np

from fedjax_lab.data.prefetch import Prefetcher
from fedjax_lab.engine import distributed
from fedjax_lab.engine import round as round_lib
from fedjax_lab.training import callbacks as callbacks_lib
from fedjax_lab.training import client_state_store as state_store
from fedjax_lab.training import processes
from fedjax_lab.training import run_lifecycle
from fedjax_lab.training import state_files
from fedjax_lab.training import workdir as workdir_lib
from fedjax_lab.training.setup import Experiment


FINAL_STATE_FILE = run_lifecycle.FINAL_STATE_FILE
SUMMARY_FILE = run_lifecycle.SUMMARY_FILE
DivergedError = run_lifecycle.DivergedError
initial_server_state = run_lifecycle.initial_server_state
RunInterrupted = run_lifecycle.RunInterrupted


def _to_python(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run_experiment(exp: Experiment, workdir: str,
                   show_progress: bool = True,
                   callbacks: Sequence[callbacks_lib.Callback] = ()
                   ) -> dict[str, Any]:
  """Trains ``exp`` for ``config.num_rounds`` rounds; returns the summary.

  Writes ``workdir/config.json``, ``versions.json``, ``metrics.jsonl`` (one
  object per round; evaluation rounds add ``eval_*`` keys) plus the sinks of
  ``config.metrics_sinks`` (``csv``, ``tensorboard``, ``wandb``),
  checkpoints every ``config.checkpoint_every`` rounds and at the end
  (``workdir/checkpoints``, the newest ``config.checkpoints_to_keep``),
  ``summary.json`` and the final server state ``final_state.npz``. A workdir
  holding an unfinished run is resumed from its newest readable checkpoint.
  ``callbacks`` (:class:`~fedjax_lab.training.callbacks.Callback`) run after
  the evaluation and before the metrics writer, each round.

  Raises:
    DivergedError: a round's training loss was NaN/inf (the metrics file keeps
      every round before it, the last checkpoint is untouched).
    RunInterrupted: SIGINT/SIGTERM; a checkpoint of the last finished round
      was written (re-run to resume).
    FileExistsError: ``workdir`` holds a finished run (left untouched). An
      unfinished run without a readable checkpoint is moved to
      ``workdir/unfinished-<n>`` and the run starts over.
    workdir_lib.ResumeError: the run in ``workdir`` used another config, or
      its ``metrics.jsonl`` is damaged before its last line.
    workdir_lib.WorkdirError: another run holds ``workdir``, or it is not a
      writable directory, or the disk filled up (what was written is kept;
      re-run to resume).
  """
  lock = (workdir_lib.locked(workdir) if distributed.is_coordinator()
          else contextlib.nullcontext())
  with lock:
    return _run_experiment(exp, workdir, show_progress, callbacks)


def _agreed_stop(callbacks: Sequence[callbacks_lib.Callback],
                 run: callbacks_lib.RunState, stop_requests: Sequence[str],
                 group: processes.ProcessGroup) -> tuple[str | None,
                                                         str | None]:
  """``(stop reason, signal received)`` as the coordinator sees them, on
  every process (the others run no callbacks and follow it)."""
  decision = group.agree([run_lifecycle.first_stop(callbacks, run),
                          stop_requests[0] if stop_requests else None])
  return decision[0], decision[1]


def _run_experiment(exp: Experiment, workdir: str, show_progress: bool,
                    extra_callbacks: Sequence[callbacks_lib.Callback]
                    ) -> dict[str, Any]:
  """:func:`run_experiment` while holding ``workdir``'s lock (the
  coordinator's; other processes of a multi-process run write nothing)."""
  config = exp.config
  mesh = None
  if config.get("shard_clients", True) and jax.device_count() > 1:
    mesh = round_lib.client_mesh()
  group = processes.ProcessGroup(mesh)
  run, checkpoints = run_lifecycle.open_run(exp, workdir, group)
  private, accountant = run.private, run.accountant
  callbacks: list[callbacks_lib.Callback] = []
  if group.coordinator:
    try:
      callbacks = callbacks_lib.default_callbacks(
          exp, run, checkpoints, show_progress=show_progress,
          extra=extra_callbacks)
    except BaseException:
      checkpoints.close()
      raise
  checkpointing = next((c for c in callbacks
                        if isinstance(c, callbacks_lib.Checkpointing)), None)
  if private.private and group.coordinator:
    print(private.report(config.num_rounds), file=sys.stderr)
  sampler = run_lifecycle.cohort_sampler(exp, private)
  noise_rng = private.noise_key()

  round_fn = round_lib.build_round(exp.algorithm, exp.strategy, mesh=mesh)
  round_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  round_rng, noise_rng = group.replicate((round_rng, noise_rng))
  device_server_state = group.replicate(run.server_state)
  fixed_cohort_size = run_lifecycle.fixed_cohort_size(config, sampler)
  client_rows = group.client_rows()

  def produce(round_index: int):
    prepare_start = time.perf_counter()
    batch = run_lifecycle.round_cohort(
        exp, sampler.sample(round_index), round_index, fixed_cohort_size,
        cohort_multiple_of=mesh.size if mesh is not None else 1,
        client_rows=client_rows)
    run_lifecycle.warm_accountant(accountant, round_index, config.num_rounds)
    return (round_lib.cohort_arrays(batch), batch.padded_cohort_size,
            time.perf_counter() - prepare_start)

  try:
    for callback in callbacks:
      callback.on_start(run)
    run.started = time.perf_counter()
    run.stop_reason, _ = _agreed_stop(callbacks, run, (), group)
    rounds = range(run.start_round,
                   run.start_round if run.stop_reason else config.num_rounds)
    with run_lifecycle.stop_requests() as stop_requests, Prefetcher(
        produce, rounds) as prefetcher:
      while True:
        wait_start = time.perf_counter()
        try:
          round_index, (cohort, padded_size, prepare_s) = next(prefetcher)
        except StopIteration:
          break
        round_start = time.perf_counter()
        placed, gathered = group.round_inputs(cohort, padded_size,
                                              run.client_states)
        device_server_state, new_states, metrics = round_fn(
            device_server_state, placed, gathered, round_rng, noise_rng)
        metrics = _to_python(metrics)
        run.server_state = group.host_server_state(device_server_state)
        run.metric_origins = round_fn.metric_origins()
        run.record = run_lifecycle.round_record(
            round_index, metrics, padded_size,
            cohort["example_mask"].shape[1], private,
            seconds=time.perf_counter() - round_start,
            prepare_seconds=prepare_s, wait_seconds=round_start - wait_start)
        if run_lifecycle.diverged(metrics, private):
          for callback in callbacks:
            callback.on_diverged(run)
          raise run_lifecycle.divergence_error(round_index, metrics, private,
                                               workdir, checkpoints)
        new_states, new_indices = group.new_client_states(new_states, placed,
                                                          cohort)
        run.client_states = round_lib.scatter_client_states(
            run.client_states, np.asarray(new_indices), new_states,
            in_place=True)
        run.rounds_done = round_index + 1
        run.stop_reason, interrupted = _agreed_stop(
            callbacks, run, stop_requests, group)
        run.is_last = (run.rounds_done == config.num_rounds or
                       bool(run.stop_reason))
        for callback in callbacks:
          callback.after_round(run)
        if interrupted:
          if checkpointing is not None:
            checkpointing.save(run)
          raise RunInterrupted(
              f"{interrupted} received: stopped after round "
              f"{run.rounds_done} and saved a checkpoint in "
              f"{os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)}; re-run "
              "the same command to resume.")
        if run.stop_reason:
          break
    for callback in callbacks:
      callback.on_end(run)
  finally:
    for callback in reversed(callbacks):
      callback.close()
    state_store.close(run.client_states)
  summary = (run_lifecycle.write_results(run, round_fn.trace_count())
             if group.coordinator else None)
  # Every process returns once the coordinator has written the results.
  return group.agree(summary)


def load_final_state(workdir: str, like: Any) -> Any:
  """The state a finished run wrote: the server state (``like`` is a
  freshly initialised one), or for a DP run its model parameters only
  (returned as ``like.params``' structure)."""
  path = os.path.join(workdir, FINAL_STATE_FILE)
  with np.load(path) as data:
    num_arrays = len(data.files)
  if num_arrays == len(jax.tree.leaves(like)):
    return state_files.load_pytree(path, like)
  return state_files.load_pytree(path, like.params)
