"""The round loop: sample, batch, run the compiled round, call the callbacks.

The loop only trains rounds: evaluation, personalization, the privacy
budget stop, the time limit, metrics sinks, checkpoints and the progress bar
are callbacks (:mod:`fedjax_lab.training.callbacks`); signals (SIGINT/SIGTERM
stop after the round, with a checkpoint) and divergence stay here. The host prepares round t+1's cohort in a
background thread while the device runs round t
(:class:`fedjax_lab.data.prefetch.Prefetcher`).

A run lives in its workdir. Re-running the same command on a workdir whose
run was interrupted (killed, Ctrl-C, SIGTERM, a crash) resumes it from its
newest readable checkpoint (:mod:`fedjax_lab.training.workdir`, which also
locks the workdir against a second run); the resumed rounds and metrics are
the ones an uninterrupted run produces.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator, Sequence


import jax
import numpy as np

from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data import sampling
from fedjax_lab.data.prefetch import Prefetcher
from fedjax_lab.engine import distributed
from fedjax_lab.engine import round as round_lib
from fedjax_lab.privacy import accounting
from fedjax_lab.training import callbacks as callbacks_lib
from fedjax_lab.training import client_state_store as state_store
from fedjax_lab.training import metrics_io
from fedjax_lab.training import privacy_run
from fedjax_lab.training import processes
from fedjax_lab.training import setup
from fedjax_lab.training import state_files
from fedjax_lab.training import workdir as workdir_lib
from fedjax_lab.training.setup import Experiment, describe_devices


# The server state after the last round (load with state_files.load_pytree and
# a freshly initialised server state as the template). In a DP run it holds
# the model parameters only (the release): the rest of the server state
# (optimizer and aggregator state, DP-FTRL's tree key) stays in the
# checkpoints. load_final_state reads either.
FINAL_STATE_FILE = "final_state.npz"


SUMMARY_FILE = workdir_lib.SUMMARY_FILE


class DivergedError(RuntimeError):
  """Training produced a non-finite loss; metrics up to that round are kept."""


class RunInterrupted(RuntimeError):
  """SIGINT/SIGTERM stopped the run after a round; a checkpoint was written."""


@contextlib.contextmanager
def _stop_requests() -> Iterator[list[str]]:
  """Collects SIGINT/SIGTERM as stop requests while the loop runs.

  The first signal asks the loop to stop after the current round (and write a
  checkpoint); a second one interrupts at once. Outside the main thread
  (where handlers cannot be installed) signals keep their default behaviour.
  """
  requests: list[str] = []
  if threading.current_thread() is not threading.main_thread():
    yield requests
    return

  def handler(signum, frame):
    del frame
    if requests:
      raise KeyboardInterrupt
    requests.append(signal.Signals(signum).name)

  previous = {sig: signal.signal(sig, handler)
              for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield requests
  finally:
    for sig, old in previous.items():
      signal.signal(sig, old)


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


def initial_server_state(exp: Experiment) -> Any:
  """The server state before round 1 (the model initialised from
  ``config.seed``); also the template to load a run's saved state into."""
  params = exp.model.init(
      jax.random.fold_in(jax.random.key(exp.config.seed), 0))
  return exp.algorithm.server_init(params)


def _open_run(exp: Experiment, workdir: str, group: processes.ProcessGroup
              ) -> tuple[callbacks_lib.RunState,
                         workdir_lib.RunCheckpoints | None]:
  """Initialises the states, opens or resumes ``workdir``, starts the
  privacy bookkeeping; returns the run's state and its checkpoints (None on
  a process other than the coordinator, which writes nothing)."""
  config = exp.config
  privacy = exp.privacy
  config_dict = privacy_run.resolved_config(
      json.loads(config.to_json_best_effort()), privacy)
  server_state = initial_server_state(exp)
  params = server_state.params
  disk = state_store.on_disk(exp)
  if group.multiprocess:
    state_store.refuse_across_processes(exp)
  client_states = None if disk else state_store.initial_states(exp, params)
  accountant = None
  if privacy is not None:
    accountant = accounting.RoundAccountant(privacy.spec, privacy.delta)
  checkpoints, start_round, restored, saved = None, 0, None, {}
  keep = config.get("checkpoints_to_keep", 3)
  if group.coordinator:
    checkpoints, start_round, restored, saved = workdir_lib.open_or_resume(
        workdir, config_dict, (server_state, client_states),
        checkpoints_to_keep=keep, accountant=accountant)
    if disk:
      try:
        client_states = state_store.open_disk_store(
            exp, workdir, params, saved if restored is not None else None,
            keep)
      except BaseException:
        checkpoints.close()
        raise
      if restored is not None:
        restored = (restored[0], client_states)
  if group.multiprocess:
    # The coordinator alone reads the workdir; the others start from what
    # it found (the checkpoint record carries the secret seed).
    shared = group.agree({"start_round": start_round, "saved": saved,
                          "restored": restored is not None})
    start_round, saved = shared["start_round"], shared["saved"]
    if shared["restored"]:
      restored = group.agree_state(
          restored if group.coordinator else (server_state, client_states))
  if restored is not None:
    server_state, client_states = restored
  try:
    private = privacy_run.PrivacyRun.start(
        privacy, evaluation_reads_train_data=exp.evaluate_params is not None,
        checkpoint_record=saved if restored is not None else None,
        accountant=accountant)
  except privacy_run.MissingSecretError as e:
    if checkpoints is not None:
      checkpoints.close()
    raise workdir_lib.ResumeError(f"{workdir}: {e}") from None
  if group.multiprocess and private.seed is not None:
    # One secret seed for the run: every process draws the same noise and
    # samples the same cohorts.
    private = dataclasses.replace(
        private, seed=distributed.broadcast_int(private.seed))
  run = callbacks_lib.RunState(
      experiment=exp, workdir=workdir, config_dict=config_dict,
      private=private, accountant=accountant, start_round=start_round,
      resumed=restored is not None, saved=saved, server_state=server_state,
      client_states=client_states, rounds_done=start_round,
      last_eval=dict(saved.get("last_eval", {})),
      seconds_before=saved.get("seconds", 0.0))
  return run, checkpoints


def _fixed_cohort_size(config, sampler) -> int | None:
  """The size every round's cohort is padded to (one compilation): the
  config's cohort size, a replayed schedule's largest cohort, or None for
  Poisson sampling (padded to geometric buckets)."""
  if isinstance(sampler, sampling.ScheduleSampler):
    return max((len(cohort) for cohort in sampler.cohorts), default=1)
  return config.cohort_size if config.sampling != "poisson" else None


def _first_stop(callbacks: Sequence[callbacks_lib.Callback],
                run: callbacks_lib.RunState) -> str | None:
  """The first callback's reason to stop after ``run.rounds_done`` rounds.
  Every callback is asked (each may keep its own state up to date)."""
  reasons = [callback.should_stop(run) for callback in callbacks]
  return next((reason for reason in reasons if reason), None)


def _agreed_stop(callbacks: Sequence[callbacks_lib.Callback],
                 run: callbacks_lib.RunState, stop_requests: Sequence[str],
                 group: processes.ProcessGroup) -> tuple[str | None,
                                                         str | None]:
  """``(stop reason, signal received)`` as the coordinator sees them, on
  every process (the others run no callbacks and follow it)."""
  decision = group.agree([_first_stop(callbacks, run),
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
  run, checkpoints = _open_run(exp, workdir, group)
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
  # A DP run samples its cohorts with the secret seed (amplification by
  # sampling assumes nobody knows who was sampled).
  sampler = (setup.make_sampler(config, exp.dataset.train.num_clients,
                                private.sampling_seed(config.seed))
             if private.private else exp.sampler)
  noise_rng = private.noise_key()

  round_fn = round_lib.build_round(exp.algorithm, exp.strategy, mesh=mesh)
  round_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  round_rng, noise_rng = group.replicate((round_rng, noise_rng))
  device_server_state = group.replicate(run.server_state)
  train = exp.dataset.train
  client = config.client
  fixed_cohort_size = _fixed_cohort_size(config, sampler)
  client_rows = group.client_rows()

  def produce(round_index: int):
    prepare_start = time.perf_counter()
    batch = cohort_lib.make_round_cohort(
        train, sampler.sample(round_index), batch_size=client.batch_size,
        num_epochs=exp.local_epochs, max_steps=exp.local_max_steps,
        seed=config.seed, round_index=round_index,
        fixed_cohort_size=fixed_cohort_size,
        cohort_multiple_of=mesh.size if mesh is not None else 1,
        step_buckets=exp.step_buckets, shuffle=exp.shuffle_local_data,
        client_rows=client_rows)
    if accountant is not None:
      # Off the critical path: this runs in the prefetch thread while the
      # device trains the previous round (the loop needs epsilon after this
      # round, and after the next one for the budget check).
      for rounds in (round_index + 1, round_index + 2):
        if rounds <= config.num_rounds:
          accountant.epsilon(rounds)
    return (round_lib.cohort_arrays(batch), batch.padded_cohort_size,
            time.perf_counter() - prepare_start)

  try:
    for callback in callbacks:
      callback.on_start(run)
    run.started = time.perf_counter()
    run.stop_reason, _ = _agreed_stop(callbacks, run, (), group)
    rounds = range(run.start_round,
                   run.start_round if run.stop_reason else config.num_rounds)
    with _stop_requests() as stop_requests, Prefetcher(
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
        run.record = {
            "round": round_index + 1, **metrics,
            "cohort_padded_size": int(padded_size),
            "local_steps_padded": int(cohort["example_mask"].shape[1]),
            **private.round_metrics(round_index),
            "seconds": time.perf_counter() - round_start,
            # Host work: building this cohort (in the background, overlapped
            # with the previous round) and the part the loop waited for.
            "host_prepare_seconds": prepare_s,
            "host_wait_seconds": round_start - wait_start}
        if _diverged(metrics, private):
          for callback in callbacks:
            callback.on_diverged(run)
          kept = checkpoints.steps() if checkpoints is not None else []
          raise DivergedError(
              f"round {round_index + 1}: " + _divergence(metrics, private) +
              "; training diverged. Lower client.learning_rate or "
              "server.learning_rate. Metrics up to here are in "
              f"{os.path.join(workdir, 'metrics.jsonl')}; " + (
                  f"the last good checkpoint (round {kept[-1]}) is kept in "
                  f"{os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)}."
                  if kept else "no checkpoint was written yet."))
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
  summary = (_write_results(run, round_fn.trace_count())
             if group.coordinator else None)
  # Every process returns once the coordinator has written the results.
  return group.agree(summary)


def _write_results(run: callbacks_lib.RunState,
                   compilations: int) -> dict[str, Any]:
  """Writes ``summary.json`` and ``final_state.npz`` (the parameters only
  in a DP run); returns the summary as released."""
  exp, private = run.experiment, run.private
  last_eval = run.last_eval
  summary = {
      "final_eval_accuracy": last_eval.get("accuracy"),
      "final_eval_loss": last_eval.get("loss"),
      **{f"final_eval_{k}": v for k, v in last_eval.items()
         if k not in ("accuracy", "loss")},
      "rounds": run.rounds_done,
      "stopped_early": run.stop_reason,
      "seconds": run.seconds(),
      "resumed_from_round": run.start_round or None,
      "algorithm": exp.algorithm.name,
      "dataset": exp.dataset.name,
      "model": exp.config.model.name,
      "strategy": exp.strategy.label,
      "compilations": compilations,
      "devices": describe_devices(),
      "workdir": run.workdir,
      **run.summary,
  }
  summary.update(private.summary_fields(run.rounds_done))
  summary = private.release_summary(summary)
  state_files.save_pytree(os.path.join(run.workdir, FINAL_STATE_FILE),
                          run.server_state.params if private.private
                          else run.server_state)
  metrics_io.write_json(os.path.join(run.workdir, SUMMARY_FILE), summary)
  return summary


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


def _diverged(metrics: dict[str, float],
              private: privacy_run.PrivacyRun) -> bool:
  """Whether a round diverged. A DP run judges by the released parameters
  only: whether a client's training loss was finite is private (a client's
  non-finite update is zeroed by clipping and cannot reach the model)."""
  if metrics.get("params_finite", 1.0) < 1.0:
    return True
  return not private.private and not math.isfinite(
      metrics.get("train_loss", 0.0))


def _divergence(metrics: dict[str, float],
                private: privacy_run.PrivacyRun) -> str:
  params = ("finite" if metrics.get("params_finite", 1.0) >= 1.0
            else "NOT finite")
  if private.private and not private.plan.release_diagnostics:
    return f"the model parameters are {params}"
  return (f"train_loss is {metrics.get('train_loss')} and the model "
          f"parameters are {params}")
