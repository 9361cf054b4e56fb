"""Sweep members trained side by side as one compiled program.

:func:`run_members` runs K experiments that differ only in traced numbers
and host values (:mod:`fedjax_lab.training.member_setup`) through one
compiled round (:func:`fedjax_lab.engine.members.build_member_round`): one
compilation for the K members, one launch per round. Everything around the
round is each member's own, exactly as in a separate run
(:func:`fedjax_lab.training.loop.run_experiment`): its workdir (locked,
opened or resumed from its own checkpoint), its callbacks (evaluation, the
privacy budget stop, metrics files, checkpoints), its privacy bookkeeping
(secret seed, accountant, release policy), its cohort sampler and keys, its
summary and final state.

Members advance in lockstep over round indices: a member takes part in round
``r`` while it has done ``r`` rounds and has not stopped. One that stopped
(its ``num_rounds``, ``target_epsilon``, ``max_seconds``) or diverged (its
parameters or, outside DP, its training loss not finite: it is frozen and
reported, its workdir kept as a diverged separate run leaves it) stays in the
program, its outputs discarded, so the others are not recompiled. Members
resumed from checkpoints at different rounds catch up the same way.

Members that draw the same cohort in a round (same sampler and data-order
seeds, as in a learning-rate sweep) share its transfer; otherwise each member
trains on its own cohort, padded to the round's largest. With several
devices (and ``shard_clients``), members and each member's clients are both
sharded (:class:`fedjax_lab.training.member_inputs.Placement`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lab.data.prefetch import Prefetcher
from fedjax_lab.engine import members as members_lib
from fedjax_lab.engine import round as round_lib
from fedjax_lab.training import callbacks as callbacks_lib
from fedjax_lab.training import client_state_store as state_store
from fedjax_lab.training import member_inputs
from fedjax_lab.training import member_setup
from fedjax_lab.training import processes
from fedjax_lab.training import run_lifecycle
from fedjax_lab.training import setup
from fedjax_lab.training import workdir as workdir_lib

__all__ = ["MemberOutcome", "run_members"]


@dataclasses.dataclass
class MemberOutcome:
  """How one member ended.

  Attributes:
    workdir: the member's workdir.
    summary: its summary (as in ``summary.json``); None if it did not finish.
    error: why it did not finish (a ``DivergedError``), else None.
  """

  workdir: str
  summary: dict[str, Any] | None = None
  error: BaseException | None = None


@dataclasses.dataclass
class _Member:
  """One member's run around the shared round."""

  experiment: setup.Experiment
  run: callbacks_lib.RunState
  checkpoints: workdir_lib.RunCheckpoints
  callbacks: list[callbacks_lib.Callback]
  sampler: Any
  outcome: MemberOutcome
  finished: bool = False

  def participates(self, round_index: int) -> bool:
    return not self.finished and self.run.rounds_done == round_index


def _check_group(experiments: Sequence[setup.Experiment],
                 workdirs: Sequence[str]) -> None:
  """Refuses a group that cannot be one program, saying why."""
  if not experiments or len(experiments) != len(workdirs):
    raise ValueError("run_members needs one workdir per experiment (and at "
                     f"least one); got {len(experiments)} experiments and "
                     f"{len(workdirs)} workdirs.")
  if len(set(workdirs)) != len(workdirs):
    raise ValueError("every member needs its own workdir.")
  signatures = {member_setup.program_signature(exp.config)
                for exp in experiments}
  if len(signatures) > 1:
    raise ValueError(
        "these members differ in keys that change the compiled program "
        "(model, data, algorithm, batch or cohort size, ...); group them with "
        "member_setup.group_members and run each group.")
  if jax.process_count() > 1:
    raise ValueError("sweep members compiled into one program run in one "
                     "process; run a multi-process run per member instead.")
  if any(state_store.on_disk(exp) for exp in experiments):
    raise ValueError("client_state_store='disk' keeps one population's states"
                     " per run; members of one program keep theirs in memory."
                     " Use client_state_store='memory' or run them apart.")


def _open_member(exp: setup.Experiment, workdir: str,
                 group: processes.ProcessGroup,
                 extra: Sequence[callbacks_lib.Callback]) -> _Member:
  run, checkpoints = run_lifecycle.open_run(exp, workdir, group)
  try:
    callbacks = callbacks_lib.default_callbacks(
        exp, run, checkpoints, show_progress=False, extra=extra)
  except BaseException:
    checkpoints.close()
    raise
  private = run.private
  if private.private:
    print(private.report(exp.config.num_rounds), file=sys.stderr)
  return _Member(exp, run, checkpoints, callbacks,
                 run_lifecycle.cohort_sampler(exp, private),
                 MemberOutcome(workdir))


def run_members(experiments: Sequence[setup.Experiment],
                workdirs: Sequence[str], show_progress: bool = False,
                callbacks: Sequence[Sequence[callbacks_lib.Callback]] | None
                = None) -> list[MemberOutcome]:
  """Trains the members as one program; returns each member's outcome.

  Args:
    experiments: the members (``setup.build_experiment`` of each member's
      config; ``like=`` the first shares its dataset and model). They must
      have one program signature (:func:`member_setup.group_members`).
    workdirs: one per member, written as a separate run of it writes its
      own (an unfinished run there is resumed).
    show_progress: one progress line per round on stderr.
    callbacks: per member, extra callbacks (as ``run_experiment``'s).

  Returns:
    One :class:`MemberOutcome` per member, in order: its summary, or the
    error that stopped it (a diverged member; the others go on).

  Raises:
    member_setup.NotVectorizable: members whose algorithm needs a differing
      number in Python (checked before any workdir is opened where the
      algorithm's factory needs it; else at the first round).
    ValueError: members that cannot share one program (the message says
      why), under several processes, or with the disk client-state store.
    loop.RunInterrupted (``run_lifecycle.RunInterrupted``): SIGINT/SIGTERM;
      every unfinished member saved a checkpoint of its last round.
    FileExistsError, workdir errors: as ``run_experiment`` for any member.
  """
  _check_group(experiments, workdirs)
  hparams = member_setup.member_hparams(experiments)
  member_setup.check_traceable(experiments, hparams)
  extra = list(callbacks) if callbacks is not None else [
      () for _ in experiments]
  group = processes.ProcessGroup(None)
  with contextlib.ExitStack() as stack:
    for workdir in workdirs:
      stack.enter_context(workdir_lib.locked(workdir))
    members: list[_Member] = []
    try:
      for exp, workdir, member_extra in zip(experiments, workdirs, extra):
        members.append(_open_member(exp, workdir, group, member_extra))
      _train(members, hparams, show_progress)
    finally:
      for m in members:
        if not m.finished:
          for callback in reversed(m.callbacks):
            callback.close()
        state_store.close(m.run.client_states)
  return [m.outcome for m in members]


def _train(members: list[_Member], hparams: dict[str, np.ndarray],
           show_progress: bool) -> None:
  """The lockstep rounds of every member (see the module docstring);
  ``hparams``: their differing traced numbers (``member_hparams``)."""
  first = members[0].experiment
  if not hparams:  # members differ in host values only: a dummy axis
    hparams = {"_member": np.arange(len(members), dtype=np.float32)}
  strategy = first.strategy
  size = len(members)
  place = member_inputs.Placement(size, first.config.get("shard_clients",
                                                         True))
  if size == 1:  # the run's own round (no member axis to vmap)
    round_fns = {True: member_inputs.one_member_round(first, strategy,
                                                      place.mesh)}
  else:
    make_algorithm = member_setup.make_algorithm_fn(first)
    round_fns = {shared: members_lib.build_member_round(
        make_algorithm, strategy, shared_cohort=shared, mesh=place.mesh)
                 for shared in (True, False)}
  compilations = lambda: sum(fn.trace_count() for fn in round_fns.values())
  device_hparams = place.members(member_setup.hparams_as_arrays(hparams))
  server_states = place.members(members_lib.stack_members(
      [m.run.server_state for m in members]))
  round_rngs = place.members(jnp.stack([jax.random.fold_in(
      jax.random.key(m.experiment.config.seed), 1) for m in members]))
  private = any(m.run.private.private for m in members)
  noise_rngs = (place.members(jnp.stack(
      [m.run.private.noise_key() for m in members])) if private else None)
  unstack = jax.jit(lambda tree: [members_lib.member(tree, k)
                                  for k in range(size)])
  select = jax.jit(lambda keep, new, old: jax.tree.map(
      lambda n, o: jnp.where(
          keep.reshape(keep.shape + (1,) * (n.ndim - 1)), n, o), new, old))
  config = first.config
  fixed_size = run_lifecycle.fixed_cohort_size(config, members[0].sampler)
  samples: dict[tuple, Any] = {}

  def produce(round_index: int):
    start = time.perf_counter()
    cohorts = []
    for m in members:
      exp, run = m.experiment, m.run
      if (m.finished or round_index < run.rounds_done or
          round_index >= exp.config.num_rounds):
        cohorts.append(None)
        continue
      indices = np.asarray(m.sampler.sample(round_index))
      key = (indices.tobytes(), exp.config.seed)
      if key not in samples:  # members with the same cohort share it
        samples[key] = round_lib.cohort_arrays(run_lifecycle.round_cohort(
            exp, indices, round_index, fixed_size,
            cohort_multiple_of=place.client_shards))
      cohorts.append(samples[key])
      run_lifecycle.warm_accountant(run.accountant, round_index,
                                    exp.config.num_rounds)
    samples.clear()
    present = [c for c in cohorts if c is not None]
    if not present:
      return cohorts, None, True, time.perf_counter() - start
    # Members not in this round ride along on a copy (their outputs are
    # dropped); members sharing one cohort share its transfer.
    filled = [c if c is not None else present[0] for c in cohorts]
    shared = member_inputs.same_cohort(filled)
    batch = filled[0] if shared else member_inputs.stack_cohorts(filled)
    return cohorts, batch, shared, time.perf_counter() - start

  for m in members:
    for callback in m.callbacks:
      callback.on_start(m.run)
    m.run.started = time.perf_counter()
    m.run.stop_reason = run_lifecycle.first_stop(m.callbacks, m.run)
    if m.run.stop_reason or m.run.rounds_done >= m.experiment.config.num_rounds:
      _finish(m, compilations())
  start_round = min(m.run.rounds_done for m in members)
  last_report = 0.0
  end_round = max(m.experiment.config.num_rounds for m in members)
  with run_lifecycle.stop_requests() as stop_requests, Prefetcher(
      produce, range(start_round, end_round)) as prefetcher:
    while not all(m.finished for m in members):
      wait_start = time.perf_counter()
      try:
        round_index, (cohorts, cohort, shared, prepare_s) = next(prefetcher)
      except StopIteration:
        break
      taking_part = [m.participates(round_index) and cohorts[k] is not None
                     for k, m in enumerate(members)]
      if not any(taking_part):
        continue
      round_start = time.perf_counter()
      gathered = place.member_clients(members_lib.stack_members([
          round_lib.gather_client_states(
              m.run.client_states,
              cohort["client_indices"] if shared else cohort[
                  "client_indices"][k]) for k, m in enumerate(members)]))
      round_fn = round_fns[shared]
      try:
        new_states, new_client_states, metrics = round_fn(
            device_hparams, server_states,
            place.shared(cohort) if shared else place.member_clients(cohort),
            gathered, round_rngs, noise_rngs)
      except (jax.errors.ConcretizationTypeError,
              jax.errors.TracerArrayConversionError,
              jax.errors.TracerIntegerConversionError) as e:
        raise member_setup.not_vectorizable(
            [k for k in hparams if not k.startswith("_")], str(e)) from None
      metrics = jax.device_get(metrics)
      seconds = time.perf_counter() - round_start
      keep = np.asarray(taking_part)
      member_metrics = [{name: float(value[k])
                         for name, value in metrics.items()}
                        if taking_part[k] else None for k in range(size)]
      for k, m in enumerate(members):
        if taking_part[k] and run_lifecycle.diverged(member_metrics[k],
                                                     m.run.private):
          keep[k] = False
          _freeze(m, round_index, member_metrics[k])
      keep_padded = np.zeros(place.padded, bool)
      keep_padded[:size] = keep
      server_states = select(jnp.asarray(keep_padded), new_states,
                             server_states)
      per_member_states = unstack(server_states)
      host_client_states = jax.device_get(new_client_states)
      for k, m in enumerate(members):
        if not keep[k]:
          continue
        own = cohorts[k]
        run = m.run
        run.server_state = per_member_states[k]
        run.metric_origins = round_fn.metric_origins()
        run.record = run_lifecycle.round_record(
            round_index, member_metrics[k], own["client_mask"].shape[0],
            own["example_mask"].shape[1], run.private, seconds=seconds,
            prepare_seconds=prepare_s, wait_seconds=round_start - wait_start)
        rows = own["client_indices"]
        run.client_states = round_lib.scatter_client_states(
            run.client_states, np.asarray(rows),
            jax.tree.map(lambda leaf: leaf[k][:rows.shape[0]],
                         host_client_states), in_place=True)
        run.rounds_done = round_index + 1
        run.stop_reason = run_lifecycle.first_stop(m.callbacks, run)
        run.is_last = (run.rounds_done == m.experiment.config.num_rounds or
                       bool(run.stop_reason))
        for callback in m.callbacks:
          callback.after_round(run)
        if run.stop_reason or run.rounds_done == m.experiment.config.num_rounds:
          _finish(m, compilations())
      if show_progress and (time.perf_counter() - last_report > 10 or
                            all(m.finished for m in members)):
        last_report = time.perf_counter()
        active = sum(not m.finished for m in members)
        print(f"round {round_index + 1}: {int(keep.sum())} of {size} members "
              f"trained in {seconds:.2f} s, {active} still running",
              file=sys.stderr, flush=True)
      if stop_requests:
        _interrupt(members, stop_requests[0])


def _freeze(m: _Member, round_index: int, metrics: dict[str, float]) -> None:
  """A diverged member: reported, its workdir left as a separate diverged
  run leaves it (metrics up to the last good round, its checkpoints)."""
  m.run.record = {"round": round_index + 1}
  for callback in m.callbacks:
    callback.on_diverged(m.run)
  m.outcome.error = run_lifecycle.divergence_error(
      round_index, metrics, m.run.private, m.outcome.workdir, m.checkpoints)
  m.finished = True
  for callback in reversed(m.callbacks):
    callback.close()


def _finish(m: _Member, compilations: int) -> None:
  """A member that ran its rounds or stopped: its end, summary and final
  state, written as a separate run writes them."""
  for callback in m.callbacks:
    callback.on_end(m.run)
  m.finished = True
  for callback in reversed(m.callbacks):
    callback.close()
  m.outcome.summary = run_lifecycle.write_results(m.run, compilations)


def _interrupt(members: Sequence[_Member], signal_name: str) -> None:
  """Saves every unfinished member's checkpoint; raises RunInterrupted."""
  for m in members:
    if m.finished:
      continue
    checkpointing = next((c for c in m.callbacks
                          if isinstance(c, callbacks_lib.Checkpointing)), None)
    if checkpointing is not None:
      checkpointing.save(m.run)
  raise run_lifecycle.RunInterrupted(
      f"{signal_name} received: every unfinished member stopped after its "
      "last round and saved a checkpoint in its workdir; re-run the same "
      "command to resume.")
