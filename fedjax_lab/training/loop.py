"""The round loop: sample, batch, run the compiled round, evaluate, write metrics.

Side effects live here (files, progress bar); everything it calls is pure.
The host prepares round t+1's cohort in a background thread while the
device runs round t (:class:`fedjax_lab.data.prefetch.Prefetcher`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np

from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data.prefetch import Prefetcher
from fedjax_lab.engine import round as round_lib
from fedjax_lab.engine.evaluate import build_evaluator
from fedjax_lab.privacy import accounting
from fedjax_lab.training import checkpoint
from fedjax_lab.training import metrics_io
from fedjax_lab.training.setup import Experiment, describe_devices


# The server state after the last round (load with checkpoint.load_pytree and
# a freshly initialised server state as the template).
FINAL_STATE_FILE = "final_state.npz"


class DivergedError(RuntimeError):
  """Training produced a non-finite loss; metrics up to that round are kept."""


def _stack_client_states(template: Any, num_clients: int) -> Any:
  return jax.tree.map(
      lambda leaf: np.repeat(np.asarray(leaf)[None], num_clients, axis=0),
      template)


def _to_python(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run_experiment(exp: Experiment, workdir: str,
                   show_progress: bool = True) -> dict[str, Any]:
  """Trains ``exp`` for ``config.num_rounds`` rounds; returns the summary.

  Writes ``workdir/config.json``, ``workdir/metrics.jsonl`` (one object per
  round; evaluation rounds add ``eval_*`` keys), ``workdir/summary.json`` and
  the final server state ``workdir/final_state.npz``.

  Raises:
    DivergedError: a round's training loss was NaN/inf (the metrics file keeps
      every round before it).
    FileExistsError: ``workdir`` already holds a run (it is left untouched).
  """
  config = exp.config
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(metrics_path):
    raise FileExistsError(
        f"{workdir} already holds a run ({metrics_path}); pass a new "
        "--workdir (nothing there was changed).")
  os.makedirs(workdir, exist_ok=True)
  metrics_io.write_json(os.path.join(workdir, "config.json"),
                        json.loads(config.to_json_best_effort()))
  writer = metrics_io.JsonlWriter(metrics_path)

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
    client_states = _stack_client_states(
        exp.algorithm.client_state_init(params), train.num_clients)
  round_fn = round_lib.build_round(exp.algorithm, exp.strategy, mesh=mesh)
  round_rng = jax.random.fold_in(rng, 1)

  evaluate = build_evaluator(exp.model)
  eval_features, eval_mask = cohort_lib.make_eval_batches(
      exp.dataset.test, config.eval_batch_size,
      max_examples=config.get("eval_max_examples", 0) or None)
  train_eval_batches = None
  if config.get("eval_train_split", False):
    # The global model on the clients' training examples (the training loss
    # FedProx and most optimisation papers plot), on the same schedule.
    train_eval_batches = cohort_lib.make_eval_batches(
        train, config.eval_batch_size,
        max_examples=config.get("eval_max_examples", 0) or None)

  client = config.client
  fixed_cohort_size = (config.cohort_size if config.sampling != "poisson"
                       else None)
  privacy = exp.privacy
  accountant = None
  if privacy is not None:
    accountant = accounting.RoundAccountant(privacy.spec, privacy.delta)

  def produce(round_index: int):
    batch = cohort_lib.make_round_cohort(
        train, exp.sampler.sample(round_index), batch_size=client.batch_size,
        num_epochs=client.num_epochs, max_steps=client.max_steps or None,
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
    progress = tqdm.tqdm(total=config.num_rounds, desc=exp.algorithm.name,
                         file=sys.stderr, dynamic_ncols=True)

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
  last_eval: dict[str, float] = {}
  rounds_done = 0
  stopped_early = None
  try:
    with Prefetcher(produce, range(config.num_rounds)) as prefetcher:
      for round_index, cohort in prefetcher:
        if round_index == 0 and (stopped_early := over_budget(1)):
          break
        round_start = time.perf_counter()
        gathered = round_lib.gather_client_states(client_states,
                                                  cohort["client_indices"])
        server_state, new_states, metrics = round_fn(
            server_state, round_lib.place_cohort(cohort, mesh), gathered,
            round_rng)
        metrics = _to_python(metrics)
        client_states = round_lib.scatter_client_states(
            client_states, cohort["client_indices"], new_states)
        record = {"round": round_index + 1, **metrics,
                  "cohort_padded_size": int(cohort["client_mask"].shape[0]),
                  "local_steps_padded": int(cohort["example_mask"].shape[1])}
        if accountant is not None:
          record.update(epsilon=accountant.epsilon(round_index + 1),
                        delta=privacy.delta,
                        noise_multiplier=privacy.noise_multiplier,
                        **privacy.round_metrics(round_index))
        record["seconds"] = time.perf_counter() - round_start
        if (not math.isfinite(metrics.get("train_loss", 0.0)) or
            metrics.get("params_finite", 1.0) < 1.0):
          writer.write(record)
          raise DivergedError(
              f"round {round_index + 1}: train_loss is "
              f"{metrics['train_loss']} and the model parameters are "
              f"{'finite' if metrics.get('params_finite') else 'NOT finite'}; "
              "training diverged. Lower "
              f"client.learning_rate or server.learning_rate. Metrics up to "
              f"here are in {writer.path}.")
        out_of_time = bool(config.get("max_seconds", 0)) and (
            time.perf_counter() - start > config.max_seconds)
        budget_spent = over_budget(round_index + 2)
        is_last = (round_index + 1 == config.num_rounds or out_of_time or
                   bool(budget_spent))
        if is_last or (config.eval_every and
                       (round_index + 1) % config.eval_every == 0):
          last_eval = evaluate(server_state.params, eval_features, eval_mask)
          record.update({f"eval_{k}": v for k, v in last_eval.items()})
          if train_eval_batches is not None:
            record.update({f"train_eval_{k}": v for k, v in evaluate(
                server_state.params, *train_eval_batches).items()})
        writer.write(record)
        rounds_done = round_index + 1
        if progress is not None:
          postfix = {"loss": f"{metrics.get('train_loss', float('nan')):.3f}"}
          if "accuracy" in last_eval:
            postfix["eval_acc"] = f"{last_eval['accuracy']:.3f}"
          if "epsilon" in record:
            postfix["eps"] = f"{record['epsilon']:.3g}"
          progress.set_postfix(postfix, refresh=False)
          progress.update(1)
        if out_of_time:
          stopped_early = (f"max_seconds={config.max_seconds} reached after "
                           f"round {round_index + 1}")
          break
        if budget_spent:
          stopped_early = budget_spent
          break
  finally:
    if progress is not None:
      progress.close()
    writer.close()

  if not last_eval:  # no round ran (e.g. the budget did not allow one)
    last_eval = evaluate(server_state.params, eval_features, eval_mask)
  summary = {
      "final_eval_accuracy": last_eval.get("accuracy"),
      "final_eval_loss": last_eval.get("loss"),
      **{f"final_eval_{k}": v for k, v in last_eval.items()
         if k not in ("accuracy", "loss")},
      "rounds": rounds_done,
      "stopped_early": stopped_early,
      "seconds": time.perf_counter() - start,
      "algorithm": exp.algorithm.name,
      "dataset": exp.dataset.name,
      "model": config.model.name,
      "strategy": exp.strategy.label,
      "compilations": round_fn.trace_count(),
      "devices": describe_devices(),
      "workdir": workdir,
  }
  if privacy is not None:
    summary["epsilon"] = accountant.epsilon(rounds_done)
    summary["delta"] = privacy.delta
    summary["privacy"] = privacy.describe()
  checkpoint.save_pytree(os.path.join(workdir, FINAL_STATE_FILE), server_state)
  metrics_io.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary
