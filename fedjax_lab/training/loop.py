"""The round loop: sample, batch, run the compiled round, evaluate, write metrics.

Side effects live here (files, checkpoints, signals, progress bar);
everything it calls is pure. The host prepares round t+1's cohort in a
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
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator


import jax
import numpy as np

from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data.prefetch import Prefetcher
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.evaluate import build_evaluator
from fedjax_lab.privacy import accounting
from fedjax_lab.training import metrics_io
from fedjax_lab.training import personalize as personalize_lib
from fedjax_lab.training import privacy_run
from fedjax_lab.training import setup
from fedjax_lab.training import sinks
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


def _split_evaluator(exp: Experiment):
  """``evaluate(params, split)`` on the test (or train) examples, built once:
  the algorithm's own evaluation when it has one (HypCluster), else the
  global model on every (or ``eval_max_examples``) example."""
  if exp.evaluate_params is not None:
    return exp.evaluate_params
  config = exp.config
  evaluate = build_evaluator(exp.model)
  max_examples = config.get("eval_max_examples", 0) or None
  batches = {"test": cohort_lib.make_eval_batches(
      exp.dataset.test, config.eval_batch_size, max_examples=max_examples)}
  if config.get("eval_train_split", False):
    # The global model on the clients' training examples (the training loss
    # FedProx and most optimisation papers plot), on the same schedule.
    batches["train"] = cohort_lib.make_eval_batches(
        exp.dataset.train, config.eval_batch_size, max_examples=max_examples)
  return lambda params, split: evaluate(params, *batches[split])


def _personalization(exp: Experiment):
  """The per-client fine-tuning evaluation of ``config.personalization``
  (built once so it compiles once), or None when disabled."""
  block = exp.config.get("personalization", {})
  if not block.get("enabled", False):
    return None
  if exp.evaluate_params is not None:
    raise ValueError("personalization.enabled: this algorithm evaluates its "
                     "own (stacked) models; personalization evaluation "
                     "needs a single global model.")
  return personalize_lib.build_runner(exp.config, exp.model, exp.dataset)


def run_experiment(exp: Experiment, workdir: str,
                   show_progress: bool = True) -> dict[str, Any]:
  """Trains ``exp`` for ``config.num_rounds`` rounds; returns the summary.

  Writes ``workdir/config.json``, ``versions.json``, ``metrics.jsonl`` (one
  object per round; evaluation rounds add ``eval_*`` keys) plus the sinks of
  ``config.metrics_sinks`` (``csv``, ``tensorboard``, ``wandb``),
  checkpoints every ``config.checkpoint_every`` rounds and at the end
  (``workdir/checkpoints``, the newest ``config.checkpoints_to_keep``),
  ``summary.json`` and the final server state ``final_state.npz``. A workdir
  holding an unfinished run is resumed from its newest readable checkpoint.

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
  with workdir_lib.locked(workdir):
    return _run_experiment(exp, workdir, show_progress)


def _run_experiment(exp: Experiment, workdir: str,
                    show_progress: bool) -> dict[str, Any]:
  """:func:`run_experiment` while holding ``workdir``'s lock."""
  config = exp.config
  privacy = exp.privacy
  config_dict = privacy_run.resolved_config(
      json.loads(config.to_json_best_effort()), privacy)
  metrics_path = os.path.join(workdir, "metrics.jsonl")

  mesh = None
  if config.get("shard_clients", True) and jax.device_count() > 1:
    mesh = round_lib.client_mesh()
  cohort_multiple_of = mesh.size if mesh is not None else 1

  rng = jax.random.key(config.seed)
  params = exp.model.init(jax.random.fold_in(rng, 0))
  server_state = exp.algorithm.server_init(params)
  train = exp.dataset.train
  if exp.client_states_init is not None:
    client_states = exp.client_states_init(params, train.num_clients)
  else:
    client_states = round_lib.stack_client_states(
        exp.algorithm.client_state_init(params), train.num_clients)
  accountant = None
  if privacy is not None:
    accountant = accounting.RoundAccountant(privacy.spec, privacy.delta)

  checkpoints, start_round, restored, saved = workdir_lib.open_or_resume(
      workdir, config_dict, (server_state, client_states),
      checkpoints_to_keep=config.get("checkpoints_to_keep", 3),
      accountant=accountant)
  if restored is not None:
    server_state, client_states = restored
  try:
    private = privacy_run.PrivacyRun.start(
        privacy, evaluation_reads_train_data=exp.evaluate_params is not None,
        checkpoint_record=saved if restored is not None else None,
        accountant=accountant)
  except privacy_run.MissingSecretError as e:
    checkpoints.close()
    raise workdir_lib.ResumeError(f"{workdir}: {e}") from None
  if private.private:
    print(private.report(config.num_rounds), file=sys.stderr)
  # A DP run samples its cohorts with the secret seed (amplification by
  # sampling assumes nobody knows who was sampled).
  sampler = (setup.make_sampler(config, exp.dataset.train.num_clients,
                                private.sampling_seed(config.seed))
             if private.private else exp.sampler)
  noise_rng = private.noise_key()
  extra_sinks = [name.strip() for name in
                 config.get("metrics_sinks", "").split(",") if name.strip()]
  writer = sinks.open_writers(
      workdir, ["jsonl", *extra_sinks], config=config_dict,
      resume_after=start_round if restored is not None else None,
      wandb_project=config.get("wandb_project", "fedjax_lab"))

  round_fn = round_lib.build_round(exp.algorithm, exp.strategy, mesh=mesh)
  round_rng = jax.random.fold_in(rng, 1)

  evaluate_split = _split_evaluator(exp)
  personalize = _personalization(exp)

  client = config.client
  fixed_cohort_size = (config.cohort_size if config.sampling != "poisson"
                       else None)

  def produce(round_index: int):
    batch = cohort_lib.make_round_cohort(
        train, sampler.sample(round_index), batch_size=client.batch_size,
        num_epochs=exp.local_epochs, max_steps=exp.local_max_steps,
        seed=config.seed, round_index=round_index,
        fixed_cohort_size=fixed_cohort_size,
        cohort_multiple_of=cohort_multiple_of)
    if accountant is not None:
      # Off the critical path: this runs in the prefetch thread while the
      # device trains the previous round (the loop needs epsilon after this
      # round, and after the next one for the budget check).
      for rounds in (round_index + 1, round_index + 2):
        if rounds <= config.num_rounds:
          accountant.epsilon(rounds)
    return round_lib.cohort_arrays(batch)

  progress = None
  if show_progress:
    import tqdm  # pylint: disable=g-import-not-at-top
    progress = tqdm.tqdm(total=config.num_rounds, initial=start_round,
                         desc=exp.algorithm.name, file=sys.stderr,
                         dynamic_ncols=True, unit="round")

  def over_budget(rounds: int) -> str | None:
    """Why running ``rounds`` rounds would exceed the budget (None if not)."""
    if (accountant is None or not privacy.target_epsilon or
        rounds > config.num_rounds or
        accountant.epsilon(rounds) <= privacy.target_epsilon):
      return None
    return (f"privacy budget: round {rounds} would bring epsilon to "
            f"{accountant.epsilon(rounds):.4g} > target_epsilon="
            f"{privacy.target_epsilon:g} (delta={privacy.delta:.3g}); stopped "
            f"after round {rounds - 1}")

  start = time.perf_counter()
  seconds_before = saved.get("seconds", 0.0)
  last_eval: dict[str, float] = saved.get("last_eval", {})
  last_personalization = None
  rounds_done = start_round

  def save_checkpoint():
    record = {"rounds_done": rounds_done, "last_eval": last_eval,
              "seconds": seconds_before + time.perf_counter() - start}
    if accountant is not None and rounds_done:
      record["epsilon"] = accountant.epsilon(rounds_done)
    record.update(private.checkpoint_fields())
    checkpoints.save(rounds_done, (server_state, client_states), record)

  stopped_early = None
  checkpoint_every = config.get("checkpoint_every", 0)
  try:
    with _stop_requests() as stop_requests, Prefetcher(
        produce, range(start_round, config.num_rounds)) as prefetcher:
      for round_index, cohort in prefetcher:
        if round_index == 0 and (stopped_early := over_budget(1)):
          break
        round_start = time.perf_counter()
        gathered = round_lib.gather_client_states(client_states,
                                                  cohort["client_indices"])
        server_state, new_states, metrics = round_fn(
            server_state, round_lib.place_cohort(cohort, mesh), gathered,
            round_rng, noise_rng)
        metrics = _to_python(metrics)
        record = {"round": round_index + 1, **metrics,
                  "cohort_padded_size": int(cohort["client_mask"].shape[0]),
                  "local_steps_padded": int(cohort["example_mask"].shape[1]),
                  **private.round_metrics(round_index)}
        record["seconds"] = time.perf_counter() - round_start
        origins = round_fn.metric_origins()
        if _diverged(metrics, private):
          writer.write(private.release_record(record, origins))
          kept = checkpoints.steps()
          raise DivergedError(
              f"round {round_index + 1}: " + _divergence(metrics, private) +
              "; training diverged. Lower client.learning_rate or "
              f"server.learning_rate. Metrics up to here are in "
              f"{metrics_path}; " + (
                  f"the last good checkpoint (round {kept[-1]}) is kept in "
                  f"{checkpoints.directory}." if kept else
                  "no checkpoint was written yet."))
        client_states = round_lib.scatter_client_states(
            client_states, cohort["client_indices"], new_states, in_place=True)
        out_of_time = bool(config.get("max_seconds", 0)) and (
            time.perf_counter() - start > config.max_seconds)
        budget_spent = over_budget(round_index + 2)
        is_last = (round_index + 1 == config.num_rounds or out_of_time or
                   bool(budget_spent))
        if is_last or (config.eval_every and
                       (round_index + 1) % config.eval_every == 0):
          last_eval = evaluate_split(server_state.params, "test")
          record.update({f"eval_{k}": v for k, v in last_eval.items()})
          if config.get("eval_train_split", False):
            record.update({f"train_eval_{k}": v for k, v in evaluate_split(
                server_state.params, "train").items()})
        if personalize is not None and (is_last or (
            personalize.every and (round_index + 1) % personalize.every == 0)):
          last_personalization = personalize(server_state.params)
          record.update({f"personalization_{k}": v for k, v in
                         last_personalization.summary().items()})
        writer.write(private.release_record(record, origins))
        rounds_done = round_index + 1
        if checkpoint_every and rounds_done % checkpoint_every == 0:
          save_checkpoint()
        if progress is not None:
          postfix = ({"loss": f"{metrics.get('train_loss', float('nan')):.3f}"}
                     if private.show_training_loss() else {})
          if "accuracy" in last_eval:
            postfix["eval_acc"] = f"{last_eval['accuracy']:.3f}"
          if "epsilon" in record:
            postfix["eps"] = f"{record['epsilon']:.3g}"
          progress.set_postfix(postfix, refresh=False)
          progress.update(1)
        if stop_requests:
          save_checkpoint()
          raise RunInterrupted(
              f"{stop_requests[0]} received: stopped after round "
              f"{rounds_done} and saved a checkpoint in "
              f"{checkpoints.directory}; re-run the same command to resume.")
        if out_of_time:
          stopped_early = (f"max_seconds={config.max_seconds} reached after "
                           f"round {round_index + 1}")
          break
        if budget_spent:
          stopped_early = budget_spent
          break
    if not last_eval:  # no round ran (e.g. the budget did not allow one)
      last_eval = evaluate_split(server_state.params, "test")
    save_checkpoint()
  finally:
    if progress is not None:
      progress.close()
    writer.close()
    checkpoints.close()
  summary = {
      "final_eval_accuracy": last_eval.get("accuracy"),
      "final_eval_loss": last_eval.get("loss"),
      **{f"final_eval_{k}": v for k, v in last_eval.items()
         if k not in ("accuracy", "loss")},
      "rounds": rounds_done,
      "stopped_early": stopped_early,
      "seconds": seconds_before + time.perf_counter() - start,
      "resumed_from_round": start_round or None,
      "algorithm": exp.algorithm.name,
      "dataset": exp.dataset.name,
      "model": config.model.name,
      "strategy": exp.strategy.label,
      "compilations": round_fn.trace_count(),
      "devices": describe_devices(),
      "workdir": workdir,
  }
  if last_personalization is not None:
    summary["personalization"] = personalize_lib.describe(last_personalization)
  summary.update(private.summary_fields(rounds_done))
  summary = private.release_summary(summary)
  state_files.save_pytree(os.path.join(workdir, FINAL_STATE_FILE),
                         server_state.params if private.private
                         else server_state)
  metrics_io.write_json(os.path.join(workdir, SUMMARY_FILE), summary)
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
