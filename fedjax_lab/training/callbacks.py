"""What happens around the rounds of a run, as callbacks.

The round loop (:mod:`fedjax_lab.training.loop`) only trains rounds; every
other duty is a :class:`Callback` with one small interface, in the spirit of
pfl-research's ``TrainingProcessCallback.after_central_iteration``:

* :class:`TimeLimit` and :class:`PrivacyBudget` decide when to stop;
* :class:`Evaluation` and :class:`Personalization` add evaluation metrics to
  the round's record;
* :class:`MetricsWriter` writes the record (released through the privacy
  policy) to ``metrics.jsonl`` and the configured sinks;
* :class:`Checkpointing` saves the run every ``checkpoint_every`` rounds, on
  a stop request and at the end;
* :class:`StrategyReport` says which strategy the rounds really ran;
* :class:`Progress` draws the progress bar.

A round runs the hooks in this order: the loop trains the round and sets
``run.rounds_done``; every callback's :meth:`Callback.should_stop` is asked
(the first reason wins and makes the round the last one); then every
callback's :meth:`Callback.after_round` runs in list order, so evaluation
keys are in the record before the writer sees it. A user's own callbacks
(``run_experiment(..., callbacks=[...])``) run after the evaluation ones and
before the writer; in a DP run, keys they add are released only if the
release policy (:mod:`fedjax_lab.privacy.release`) says they may be.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Sequence

from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.evaluation import personalization as personalize_lib
from fedjax_lab.evaluation.central import shared_evaluator
from fedjax_lab.engine import strategy as strategy_lib
from fedjax_lab.privacy import accounting
from fedjax_lab.training import privacy_run
from fedjax_lab.training import client_state_store as state_store
from fedjax_lab.training import sinks
from fedjax_lab.training import workdir as workdir_lib
from fedjax_lab.training.setup import Experiment


@dataclasses.dataclass
class RunState:
  """The mutable state of one run, shared by the loop and its callbacks.

  Attributes:
    experiment: what is being run.
    workdir: where it writes.
    config_dict: the resolved config as written to ``config.json``.
    private: the run's privacy bookkeeping (non-private runs too).
    accountant: the DP accountant (None for a non-private run).
    start_round: rounds done before this process started (resume point).
    resumed: whether the run was restored from a checkpoint.
    saved: the checkpoint record it was restored from (``{}`` if fresh).
    server_state: the server state after ``rounds_done`` rounds.
    client_states: every client's state, stacked on a leading axis.
    rounds_done: rounds trained so far (including the current one once the
      loop has trained it).
    record: the current round's metrics record (callbacks add keys).
    metric_origins: the round function's metric origins (release policy).
    is_last: whether the current round is the last one of this process.
    stop_reason: why the run stops early (None: it runs all rounds).
    last_eval: the newest evaluation metrics (``{}`` before the first).
    seconds_before: training seconds of earlier processes (resume).
    started: ``time.perf_counter()`` when this process began its rounds.
    summary: extra summary fields callbacks contribute at the end.
  """

  experiment: Experiment
  workdir: str
  config_dict: dict[str, Any]
  private: privacy_run.PrivacyRun
  accountant: accounting.RoundAccountant | None
  start_round: int
  resumed: bool
  saved: dict[str, Any]
  server_state: Any
  client_states: Any
  rounds_done: int
  record: dict[str, Any] = dataclasses.field(default_factory=dict)
  metric_origins: Any = None
  is_last: bool = False
  stop_reason: str | None = None
  last_eval: dict[str, float] = dataclasses.field(default_factory=dict)
  seconds_before: float = 0.0
  started: float = dataclasses.field(default_factory=time.perf_counter)
  summary: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def config(self):
    """The experiment's config."""
    return self.experiment.config

  def seconds(self) -> float:
    """Training seconds of the run so far, over every process."""
    return self.seconds_before + time.perf_counter() - self.started


class Callback:
  """One duty around the rounds; every hook is optional (a no-op here).

  Hooks, in the order the loop calls them: :meth:`on_start` once before the
  first round; per round :meth:`should_stop` then :meth:`after_round`
  (:meth:`on_diverged` instead when the round diverged); :meth:`on_end` once
  after the last round (not after an error or an interruption);
  :meth:`close` always, even after an error.
  """

  def on_start(self, run: RunState) -> None:
    """Called once, after the workdir is opened or resumed."""

  def should_stop(self, run: RunState) -> str | None:
    """A reason to stop after ``run.rounds_done`` rounds, or None.

    Asked once before this process's first round (``run.rounds_done ==
    run.start_round``: a reason then means no round runs) and after each
    round, before it is reported.
    """
    del run
    return None

  def after_round(self, run: RunState) -> None:
    """Called after each round with its ``run.record``."""

  def on_diverged(self, run: RunState) -> None:
    """Called instead of :meth:`after_round` when the round diverged."""

  def on_end(self, run: RunState) -> None:
    """Called once after the last round; may add to ``run.summary``."""

  def close(self) -> None:
    """Releases resources; called on every exit path."""


class TimeLimit(Callback):
  """Stops after the round that passes ``max_seconds`` of wall time (this
  process's; 0 = no limit)."""

  def __init__(self, max_seconds: float):
    self.max_seconds = float(max_seconds or 0)

  def should_stop(self, run: RunState) -> str | None:
    if (not self.max_seconds or run.rounds_done == run.start_round or
        time.perf_counter() - run.started <= self.max_seconds):
      return None
    return (f"max_seconds={self.max_seconds:g} reached after round "
            f"{run.rounds_done}")


class PrivacyBudget(Callback):
  """Stops before a round would bring epsilon past ``target_epsilon``.

  Asked before the first round of every process too, so a run resumed
  after it stopped on its budget does not train one round more.
  """

  def __init__(self, accountant: accounting.RoundAccountant,
               target_epsilon: float, delta: float, num_rounds: int):
    self.accountant = accountant
    self.target_epsilon = target_epsilon
    self.delta = delta
    self.num_rounds = num_rounds

  def should_stop(self, run: RunState) -> str | None:
    rounds = run.rounds_done + 1
    if rounds > self.num_rounds:
      return None
    epsilon = self.accountant.epsilon(rounds)
    if epsilon <= self.target_epsilon:
      return None
    return (f"privacy budget: round {rounds} would bring epsilon to "
            f"{epsilon:.4g} > target_epsilon={self.target_epsilon:g} "
            f"(delta={self.delta:.3g}); stopped after round {rounds - 1}")


class Evaluation(Callback):
  """Evaluates the global model every ``eval_every`` rounds and after the
  last: ``eval_*`` keys (the test split), ``train_eval_*`` with
  ``eval_train_split``. Uses the algorithm's own evaluation when it has one
  (HypCluster's stacked cluster models)."""

  def __init__(self, experiment: Experiment):
    config = experiment.config
    self.eval_every = config.eval_every
    self.train_split = config.get("eval_train_split", False)
    if experiment.evaluate_params is not None:
      self.evaluate = experiment.evaluate_params
      return
    evaluate = shared_evaluator(experiment.model)
    max_examples = config.get("eval_max_examples", 0) or None
    splits = {"test": experiment.dataset.test}
    if self.train_split:
      # The global model on the clients' training examples (the training
      # loss FedProx and most optimisation papers plot).
      splits["train"] = experiment.dataset.train
    batches = {name: cohort_lib.make_eval_batches(
        store, config.eval_batch_size, max_examples=max_examples)
               for name, store in splits.items()}
    self.evaluate = lambda params, split: evaluate(params, *batches[split])

  def after_round(self, run: RunState) -> None:
    if not (run.is_last or (self.eval_every and
                            run.rounds_done % self.eval_every == 0)):
      return
    params = run.server_state.params
    run.last_eval = self.evaluate(params, "test")
    run.record.update({f"eval_{k}": v for k, v in run.last_eval.items()})
    if self.train_split:
      run.record.update({f"train_eval_{k}": v for k, v in
                         self.evaluate(params, "train").items()})

  def on_end(self, run: RunState) -> None:
    if not run.last_eval:  # no round ran (e.g. the budget allowed none)
      run.last_eval = self.evaluate(run.server_state.params, "test")


class Personalization(Callback):
  """Per-client fine-tuning evaluation (``personalization`` block; Wang et
  al. 2019): ``personalization_*`` keys every ``every`` rounds and after the
  last, the per-client details in the summary."""

  def __init__(self, experiment: Experiment):
    if experiment.evaluate_params is not None:
      raise ValueError("personalization.enabled: this algorithm evaluates its "
                       "own (stacked) models; personalization evaluation "
                       "needs a single global model.")
    self.runner = personalize_lib.build_runner(
        experiment.config, experiment.model, experiment.dataset)
    self.last = None

  def after_round(self, run: RunState) -> None:
    every = self.runner.every
    if run.is_last or (every and run.rounds_done % every == 0):
      self.last = self.runner(run.server_state.params)
      run.record.update({f"personalization_{k}": v for k, v in
                         self.last.summary().items()})

  def on_end(self, run: RunState) -> None:
    if self.last is not None:
      run.summary["personalization"] = personalize_lib.describe(self.last)


class MetricsWriter(Callback):
  """Writes each round's record, as the privacy policy releases it, to
  ``metrics.jsonl`` and the sinks of ``config.metrics_sinks``."""

  def __init__(self):
    self.writer = None

  def on_start(self, run: RunState) -> None:
    config = run.config
    extra = [name.strip() for name in
             config.get("metrics_sinks", "").split(",") if name.strip()]
    self.writer = sinks.open_writers(
        run.workdir, ["jsonl", *extra], config=run.config_dict,
        resume_after=run.start_round if run.resumed else None,
        wandb_project=config.get("wandb_project", "fedjax_lab"))

  def _write(self, run: RunState) -> None:
    self.writer.write(run.private.release_record(run.record,
                                                 run.metric_origins))

  after_round = _write
  on_diverged = _write

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


class Checkpointing(Callback):
  """Saves ``(server_state, client_states)`` with the run's record (rounds,
  last evaluation, seconds, epsilon spent, the secret noise seed) every
  ``every`` rounds (0: only at the end), when the loop was asked to stop,
  and at the end."""

  def __init__(self, checkpoints: workdir_lib.RunCheckpoints, every: int):
    self.checkpoints = checkpoints
    self.every = every

  def save(self, run: RunState) -> None:
    """Writes the checkpoint of ``run.rounds_done`` rounds."""
    record = {"rounds_done": run.rounds_done, "last_eval": run.last_eval,
              "seconds": run.seconds()}
    if run.accountant is not None and run.rounds_done:
      record["epsilon"] = run.accountant.epsilon(run.rounds_done)
    record.update(run.private.checkpoint_fields())
    state, store_fields = state_store.checkpoint_state(
        run.server_state, run.client_states, run.rounds_done)
    record.update(store_fields)
    self.checkpoints.save(run.rounds_done, state, record)

  def after_round(self, run: RunState) -> None:
    if self.every and run.rounds_done % self.every == 0:
      self.save(run)

  def on_end(self, run: RunState) -> None:
    self.save(run)

  def close(self) -> None:
    self.checkpoints.close()


class StrategyReport(Callback):
  """Reports the strategy each round really ran: an ``unroll`` step loop
  runs as ``scan`` in rounds padded past ``max_unroll_steps``
  (:func:`fedjax_lab.engine.strategy.effective_label`). The summary's
  ``strategy_effective`` lists the labels used; a non-private run says on
  stderr when one differs from the requested label. (The padded step count
  depends on the clients' data sizes, so a DP run withholds both.)"""

  def __init__(self, requested: strategy_lib.Strategy):
    self.requested = requested
    self.used: set[str] = set()

  def after_round(self, run: RunState) -> None:
    steps = run.record.get("local_steps_padded")
    if steps is None:
      return
    label = strategy_lib.effective_label(self.requested, int(steps))
    if (label != self.requested.label and label not in self.used and
        not run.private.private):
      print(f"strategy: {self.requested.label} runs as {label} in rounds "
            f"padded to more than {self.requested.max_unroll_steps} local "
            f"steps (round {run.rounds_done}: {steps})", file=sys.stderr)
    self.used.add(label)

  def on_end(self, run: RunState) -> None:
    if self.used:
      run.summary["strategy_effective"] = sorted(self.used)


class Progress(Callback):
  """A tqdm progress bar on stderr: rounds, and the released training loss,
  evaluation accuracy and epsilon."""

  def __init__(self, num_rounds: int, description: str):
    self.num_rounds = num_rounds
    self.description = description
    self.bar = None

  def on_start(self, run: RunState) -> None:
    import tqdm  # pylint: disable=g-import-not-at-top
    self.bar = tqdm.tqdm(total=self.num_rounds, initial=run.start_round,
                         desc=self.description, file=sys.stderr,
                         dynamic_ncols=True, unit="round")

  def after_round(self, run: RunState) -> None:
    postfix = {}
    if run.private.show_training_loss():
      postfix["loss"] = f"{run.record.get('train_loss', float('nan')):.3f}"
    if "accuracy" in run.last_eval:
      postfix["eval_acc"] = f"{run.last_eval['accuracy']:.3f}"
    if "epsilon" in run.record:
      postfix["eps"] = f"{run.record['epsilon']:.3g}"
    self.bar.set_postfix(postfix, refresh=False)
    self.bar.update(1)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def default_callbacks(exp: Experiment, run: RunState,
                      checkpoints: workdir_lib.RunCheckpoints, *,
                      show_progress: bool,
                      extra: Sequence[Callback] = ()
                      ) -> list[Callback]:
  """The callbacks of a run of ``exp``'s config, in the order they run:
  stops (time, privacy budget), evaluation, personalization, ``extra``
  (the user's), the strategy report, the metrics writer, checkpointing, the
  progress bar."""
  config = exp.config
  out: list[Callback] = [
      TimeLimit(config.get("max_seconds", 0))]
  privacy = exp.privacy
  if run.accountant is not None and privacy.target_epsilon:
    out.append(PrivacyBudget(
        run.accountant, privacy.target_epsilon, privacy.delta,
        config.num_rounds))
  out.append(Evaluation(exp))
  if config.get("personalization", {}).get("enabled", False):
    out.append(Personalization(exp))
  out += list(extra)
  out.append(StrategyReport(exp.strategy))
  out.append(MetricsWriter())
  out.append(Checkpointing(
      checkpoints, config.get("checkpoint_every", 0)))
  if show_progress:
    out.append(Progress(config.num_rounds, exp.algorithm.name))
  return out
