"""The public API: a federated experiment from a notebook or a script.

The command line (``fedjax-lab run``) is a thin layer over this module: the
same config schema (:mod:`fedjax_lab.training.setup`), the same runner with
prefetching, metrics files, checkpoints, resume and DP accounting. What the
API adds is that the dataset, the cohort sampler and the model may be your
own objects instead of registered names::

  from fedjax_lab.data.federated import FederatedDataset
  from fedjax_lab.data.sampling import ScheduleSampler
  from fedjax_lab.training import api

  dataset = FederatedDataset.from_client_arrays(
      {"alice": {"x": xa, "y": ya}, "bob": {"x": xb, "y": yb}},   # train
      {"alice": {"x": xa_test, "y": ya_test}})                    # test
  config = api.default_config(**{
      "model.name": "logistic", "num_rounds": 3, "client.shuffle": False})
  result = api.simulate(config, dataset=dataset,
                        sampler=ScheduleSampler(2, [[0, 1], [1], [0]]))
  result.summary["final_eval_accuracy"], result.history, result.params

A config key that contradicts a passed object is an error, never ignored
(``setup.build_experiment``).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import tempfile
from typing import Any, Sequence

import jax
import ml_collections

from fedjax_lab import models
from fedjax_lab.data import sampling
from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.training import callbacks as callbacks_lib
from fedjax_lab.training import defaults
from fedjax_lab.training import loop
from fedjax_lab.training import member_loop
from fedjax_lab.training import member_setup
from fedjax_lab.training import metrics_io
from fedjax_lab.training import setup
from fedjax_lab.training import state_files


@dataclasses.dataclass(frozen=True)
class SimulationResult:
  """What a finished :func:`simulate` run produced.

  Attributes:
    summary: the run's summary (as written to ``summary.json``; in a DP run
      only what its epsilon covers, see ``docs/PRIVACY.md``).
    history: one dict per round, as written to ``metrics.jsonl``.
    params: the final model parameters (the released model in a DP run).
    workdir: where the run's files are (a temporary folder unless given).
    error: :func:`simulate_sweep` only: why this member did not finish (a
      ``loop.DivergedError``; ``summary`` and ``params`` are then None).
  """

  summary: dict[str, Any] | None
  history: list[dict[str, Any]]
  params: Any
  workdir: str
  error: BaseException | None = None


# Blocks whose keys depend on a choice (the dataset's load() arguments, the
# model's, the optimizers' extra optax arguments): checked when the
# experiment is built, not here.
_OPEN_BLOCKS = ("data", "model", "client.hparams", "server.hparams")


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
  """The base config with ``overrides`` applied; dotted keys reach into
  blocks (``**{"client.learning_rate": 0.05}``).

  Raises:
    KeyError: a key the schema does not have (a typo would otherwise be
      ignored); ``data.*``, ``model.*`` and the optimizers' ``hparams`` take
      any key, checked against the chosen dataset / model / optimizer when
      the experiment is built.
  """
  config = defaults.base_config()
  for dotted, value in overrides.items():
    block = config
    *parents, leaf = dotted.split(".")
    for name in parents:
      if name not in block:
        raise KeyError(f"unknown config block {name!r} in {dotted!r}.")
      block = block[name]
    if leaf not in block and ".".join(parents) not in _OPEN_BLOCKS:
      raise KeyError(f"unknown config key {dotted!r}; see "
                     "fedjax_lab/training/setup.py for the schema.")
    block[leaf] = value
  return config


def simulate(config: ml_collections.ConfigDict | setup.Experiment, *,
             dataset: FederatedDataset | None = None,
             sampler: sampling.ClientSampler | None = None,
             model: models.Model | None = None,
             workdir: str | None = None,
             callbacks: Sequence[callbacks_lib.Callback] = (),
             show_progress: bool = False) -> SimulationResult:
  """Runs the experiment ``config`` describes; returns its results.

  Args:
    config: a config (:func:`default_config`, or a ``configs/*.py`` file's
      ``get_config()``), or an experiment already built from one
      (:func:`fedjax_lab.training.setup.build_experiment`; then pass no
      dataset, sampler or model).
    dataset: your own federated dataset (``config.data.name`` must then be
      empty); default: the registered dataset the config names.
    sampler: who trains in each round, e.g. a
      :class:`~fedjax_lab.data.sampling.ScheduleSampler` replaying a given
      list of cohorts (refused in a DP run: its amplification needs the
      run's own secret random sampling); default: ``config.sampling``.
    model: your own :class:`~fedjax_lab.models.Model` (e.g.
      ``models.from_flax``; ``config.model.name`` must then be empty).
    workdir: where checkpoints and metrics go; an unfinished run there is
      resumed. Default: a new temporary folder.
    callbacks: your own :class:`~fedjax_lab.training.callbacks.Callback`s,
      called each round after evaluation and before the metrics writer.
    show_progress: draw a progress bar on stderr.

  Raises:
    setup.ConfigError: the config is invalid or contradicts a passed object.
    loop.DivergedError, loop.RunInterrupted, workdir errors: as
      :func:`fedjax_lab.training.loop.run_experiment`.
  """
  if isinstance(config, setup.Experiment):
    if any(given is not None for given in (dataset, sampler, model)):
      raise setup.ConfigError(
          "simulate() got a built experiment and a dataset, sampler or "
          "model: pass them to setup.build_experiment instead.")
    experiment = config
  else:
    experiment = setup.build_experiment(config, dataset=dataset,
                                        sampler=sampler, model=model)
  if workdir is None:
    if jax.process_count() > 1:
      raise setup.ConfigError(
          "a run over several processes needs a workdir every process can "
          "reach (each would otherwise make its own temporary one); pass "
          "workdir=.")
    workdir = tempfile.mkdtemp(prefix="fedjax_lab-")
  summary = loop.run_experiment(experiment, workdir,
                                show_progress=show_progress,
                                callbacks=callbacks)
  return _result(experiment, workdir, summary)


def _result(experiment: setup.Experiment, workdir: str,
            summary: dict[str, Any] | None,
            error: BaseException | None = None) -> SimulationResult:
  """A finished run's result read back from its workdir."""
  path = os.path.join(workdir, "metrics.jsonl")
  history = metrics_io.read_jsonl(path) if os.path.exists(path) else []
  params = None
  if summary is not None:
    like = jax.eval_shape(lambda: loop.initial_server_state(experiment))
    path = os.path.join(workdir, loop.FINAL_STATE_FILE)
    if experiment.privacy is not None:  # a DP run keeps the parameters only
      params = state_files.load_pytree(path, like.params)
    else:
      params = state_files.load_pytree(path, like).params
  return SimulationResult(summary=summary, history=history, params=params,
                          workdir=workdir, error=error)


def simulate_sweep(configs: Sequence[ml_collections.ConfigDict], *,
                   workdirs: Sequence[str] | None = None,
                   max_members: int = 0,
                   show_progress: bool = False) -> list[SimulationResult]:
  """Runs sweep members side by side, as few compiled programs as possible.

  Members whose configs differ only in numbers the round uses (learning
  rates, optimizer hyperparameters, FedProx mu, DP clip norm and noise
  multiplier, adaptive clipping and DP-FTRL settings) and in host values
  (seeds, rounds, evaluation and checkpoint settings, the privacy budget)
  train as one program with a leading member axis
  (:mod:`fedjax_lab.training.member_loop`); configs differing elsewhere go
  to separate programs (:func:`member_setup.group_members`). Each member's
  workdir, metrics, checkpoints, epsilon and summary are those of a separate
  :func:`simulate` of its config; a member that diverges is frozen (its
  result carries the error) and the others go on. Members whose algorithm
  needs a differing number in Python (``member_setup.NotVectorizable``) run
  as programs of one member each.

  Args:
    configs: one config per member.
    workdirs: one per member (unfinished runs there are resumed); default:
      new temporary folders.
    max_members: at most this many members per program (0: no cap), to
      bound memory.
    show_progress: a line per round per program on stderr.

  Returns:
    One :class:`SimulationResult` per config, in order.

  Raises:
    setup.ConfigError: a config is invalid (nothing runs).
    ValueError: a group that cannot run as members (e.g. a host step loop).
    loop.RunInterrupted, workdir errors: as :func:`simulate`.
  """
  if workdirs is None:
    workdirs = [tempfile.mkdtemp(prefix="fedjax_lab-member-")
                for _ in configs]
  if len(workdirs) != len(configs):
    raise ValueError(f"{len(configs)} configs but {len(workdirs)} workdirs.")
  results: list[SimulationResult | None] = [None] * len(configs)
  groups = member_setup.group_members(configs, max_members)
  while groups:
    indices = groups.pop(0)
    experiments = []
    for index in indices:
      experiments.append(setup.build_experiment(
          configs[index], like=experiments[0] if experiments else None))
    try:
      outcomes = member_loop.run_members(
          experiments, [workdirs[i] for i in indices],
          show_progress=show_progress)
    except member_setup.NotVectorizable as e:
      if len(indices) == 1:
        raise
      print(f"{e} Running these {len(indices)} members as a program each.",
            file=sys.stderr)
      groups[:0] = [[index] for index in indices]
      continue
    for index, exp, outcome in zip(indices, experiments, outcomes):
      results[index] = _result(exp, outcome.workdir, outcome.summary,
                               outcome.error)
  return results
