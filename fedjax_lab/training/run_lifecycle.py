"""One run's life around its rounds: opening or resuming its workdir, a
round's record, divergence, and the files a finished run writes.

Shared by the round loop of one run (:mod:`fedjax_lab.training.loop`) and the
loop that trains sweep members side by side in one program
(:mod:`fedjax_lab.training.member_loop`), so a member's workdir is written
exactly as a separate run's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
from typing import Any, Iterator, Sequence

import jax

from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data import sampling
from fedjax_lab.engine import distributed
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
def stop_requests() -> Iterator[list[str]]:
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


def initial_server_state(exp: Experiment) -> Any:
  """The server state before round 1 (the model initialised from
  ``config.seed``); also the template to load a run's saved state into."""
  params = exp.model.init(
      jax.random.fold_in(jax.random.key(exp.config.seed), 0))
  return exp.algorithm.server_init(params)



def open_run(exp: Experiment, workdir: str, group: processes.ProcessGroup
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



def fixed_cohort_size(config, sampler) -> int | None:
  """The size every round's cohort is padded to (one compilation): the
  config's cohort size, a replayed schedule's largest cohort, or None for
  Poisson sampling (padded to geometric buckets)."""
  if isinstance(sampler, sampling.ScheduleSampler):
    return max((len(cohort) for cohort in sampler.cohorts), default=1)
  return config.cohort_size if config.sampling != "poisson" else None



def first_stop(callbacks: Sequence[callbacks_lib.Callback],
                run: callbacks_lib.RunState) -> str | None:
  """The first callback's reason to stop after ``run.rounds_done`` rounds.
  Every callback is asked (each may keep its own state up to date)."""
  reasons = [callback.should_stop(run) for callback in callbacks]
  return next((reason for reason in reasons if reason), None)



def write_results(run: callbacks_lib.RunState,
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



def diverged(metrics: dict[str, float],
              private: privacy_run.PrivacyRun) -> bool:
  """Whether a round diverged. A DP run judges by the released parameters
  only: whether a client's training loss was finite is private (a client's
  non-finite update is zeroed by clipping and cannot reach the model)."""
  if metrics.get("params_finite", 1.0) < 1.0:
    return True
  return not private.private and not math.isfinite(
      metrics.get("train_loss", 0.0))


def divergence(metrics: dict[str, float],
                private: privacy_run.PrivacyRun) -> str:
  params = ("finite" if metrics.get("params_finite", 1.0) >= 1.0
            else "NOT finite")
  if private.private and not private.plan.release_diagnostics:
    return f"the model parameters are {params}"
  return (f"train_loss is {metrics.get('train_loss')} and the model "
          f"parameters are {params}")


def cohort_sampler(exp: Experiment, private: privacy_run.PrivacyRun) -> Any:
  """Who trains each round: a DP run samples with its secret seed
  (amplification by sampling assumes nobody knows who was sampled), any
  other run uses the experiment's sampler."""
  if not private.private:
    return exp.sampler
  return setup.make_sampler(exp.config, exp.dataset.train.num_clients,
                            private.sampling_seed(exp.config.seed))


def round_cohort(exp: Experiment, client_indices: Any, round_index: int,
                 fixed_cohort_size: int | None, cohort_multiple_of: int = 1,
                 client_rows: Any = None) -> Any:
  """Round ``round_index``'s padded cohort of ``client_indices``, batched
  by the experiment's local schedule (``data.cohort.make_round_cohort``)."""
  return cohort_lib.make_round_cohort(
      exp.dataset.train, client_indices,
      batch_size=exp.config.client.batch_size, num_epochs=exp.local_epochs,
      max_steps=exp.local_max_steps, seed=exp.config.seed,
      round_index=round_index, fixed_cohort_size=fixed_cohort_size,
      cohort_multiple_of=cohort_multiple_of, step_buckets=exp.step_buckets,
      shuffle=exp.shuffle_local_data, client_rows=client_rows)


def warm_accountant(accountant: accounting.RoundAccountant | None,
                    round_index: int, num_rounds: int) -> None:
  """Composes epsilon after round ``round_index`` and the next one (the loop
  needs both: to report, and for the budget check) ahead of time; meant for
  the prefetch thread, off the round's critical path."""
  if accountant is None:
    return
  for rounds in (round_index + 1, round_index + 2):
    if rounds <= num_rounds:
      accountant.epsilon(rounds)


def round_record(round_index: int, metrics: dict[str, float],
                 padded_size: int, local_steps_padded: int,
                 private: privacy_run.PrivacyRun, seconds: float,
                 prepare_seconds: float, wait_seconds: float
                 ) -> dict[str, Any]:
  """Round ``round_index``'s (0-based) record before the callbacks add to it:
  the round's metrics, its padding, the host-side privacy metrics and its
  timings (``seconds`` on the round; the host's cohort building, overlapped
  with the previous round, and the part the loop waited for)."""
  return {"round": round_index + 1, **metrics,
          "cohort_padded_size": int(padded_size),
          "local_steps_padded": int(local_steps_padded),
          **private.round_metrics(round_index),
          "seconds": seconds,
          "host_prepare_seconds": prepare_seconds,
          "host_wait_seconds": wait_seconds}


def divergence_error(round_index: int, metrics: dict[str, float],
                     private: privacy_run.PrivacyRun, workdir: str,
                     checkpoints: workdir_lib.RunCheckpoints | None
                     ) -> DivergedError:
  """The error of a run whose round ``round_index`` (0-based) diverged: what
  was not finite, what to change, and what was kept where."""
  kept = checkpoints.steps() if checkpoints is not None else []
  return DivergedError(
      f"round {round_index + 1}: " + divergence(metrics, private) +
      "; training diverged. Lower client.learning_rate or "
      "server.learning_rate. Metrics up to here are in "
      f"{os.path.join(workdir, 'metrics.jsonl')}; " + (
          f"the last good checkpoint (round {kept[-1]}) is kept in "
          f"{os.path.join(workdir, workdir_lib.CHECKPOINT_DIR)}."
          if kept else "no checkpoint was written yet."))
