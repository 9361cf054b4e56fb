"""Execution strategies: how the clients of a round and their local steps run.

Two independent choices (see docs/ARCHITECTURE.md and the benchmark):

* ``client_parallel``: ``"vmap"`` (all clients of the cohort at once),
  ``"map"`` (one client after another inside the compiled round, running sums,
  memory of one client), ``"chunked"`` (``chunk_size`` clients vmapped at a
  time, chunks in sequence).
* ``step_loop``: ``"scan"`` (``lax.scan`` over local steps), ``"unroll"``
  (steps unrolled into the compiled round; compile time grows with steps, so
  rounds with more than ``max_unroll_steps`` padded steps use scan:
  :func:`effective_step_loop` / :func:`effective_label` say what a round of a
  given padded length really runs, for honest logs and summaries),
  ``"host"`` (a Python loop calling a jitted, vmapped step; the round is then
  three compiled functions instead of one; only with ``vmap``).

Defaults per backend and model family come from
``python -m experiments.bench.strategies`` runs recorded in
``experiments/results/``. On XLA:CPU a convolution inside
``lax.scan`` runs many times slower than unrolled (jax issue #12868), so conv
models default to unrolled steps there.
"""

from __future__ import annotations

import dataclasses

import jax

CLIENT_PARALLEL = ("vmap", "map", "chunked")
STEP_LOOPS = ("scan", "unroll", "host")


@dataclasses.dataclass(frozen=True)
class Strategy:
  """How a round executes. Every strategy computes the same round result.

  Attributes:
    client_parallel: one of ``CLIENT_PARALLEL``.
    step_loop: one of ``STEP_LOOPS``.
    chunk_size: clients per chunk for ``"chunked"``.
    max_unroll_steps: with ``"unroll"``, rounds padded to more local steps
      than this fall back to ``lax.scan`` (unrolled compile time grows
      linearly with the steps).
  """

  client_parallel: str = "vmap"
  step_loop: str = "scan"
  chunk_size: int = 8
  max_unroll_steps: int = 32

  def __post_init__(self):
    if self.client_parallel not in CLIENT_PARALLEL:
      raise ValueError(f"client_parallel must be one of {CLIENT_PARALLEL}, "
                       f"got {self.client_parallel!r}.")
    if self.step_loop not in STEP_LOOPS:
      raise ValueError(f"step_loop must be one of {STEP_LOOPS}, got "
                       f"{self.step_loop!r}.")
    if self.step_loop == "host" and self.client_parallel != "vmap":
      raise ValueError("step_loop='host' runs a vmapped step from Python; use "
                       "client_parallel='vmap' with it.")
    if self.chunk_size < 1:
      raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}.")

  @property
  def label(self) -> str:
    """The requested strategy, e.g. ``"chunked8+scan"`` (what was asked
    for; see :func:`effective_label` for what a round runs)."""
    return _label(self.client_parallel, self.chunk_size, self.step_loop)


def _label(client_parallel: str, chunk_size: int, step_loop: str) -> str:
  if client_parallel == "chunked":
    return f"chunked{chunk_size}+{step_loop}"
  return f"{client_parallel}+{step_loop}"


def effective_step_loop(strategy: Strategy, num_steps: int) -> str:
  """The step loop a round padded to ``num_steps`` local steps really runs.

  ``"unroll"`` becomes ``"scan"`` when ``num_steps > max_unroll_steps`` (the
  compiled round's fallback, since unrolled compile time grows with the
  steps); ``"scan"`` and ``"host"`` are always honoured. Pure: the round
  that compiles the step loop and the reports that describe it both ask
  this, so the two cannot disagree.

  Args:
    strategy: the requested strategy.
    num_steps: the round's padded number of local steps (the cohort's step
      axis, ``local_steps_padded`` in the metrics).
  """
  if num_steps < 0:
    raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
  if strategy.step_loop == "unroll" and num_steps > strategy.max_unroll_steps:
    return "scan"
  return strategy.step_loop


def effective_label(strategy: Strategy, num_steps: int) -> str:
  """:attr:`Strategy.label` with the step loop a round padded to
  ``num_steps`` steps really runs (see :func:`effective_step_loop`); e.g.
  ``"map+scan"`` for a requested ``"map+unroll"`` past ``max_unroll_steps``.
  """
  return _label(strategy.client_parallel, strategy.chunk_size,
                effective_step_loop(strategy, num_steps))


# (backend, model family) -> strategy measured fastest by
# experiments.bench.strategies (experiments/results/bench_cpu.md: W1 CNN,
# W2 logistic, W3 char-LSTM).
_DEFAULTS = {
    ("cpu", "conv"): Strategy("map", "unroll"),
    ("cpu", "dense"): Strategy("chunked", "scan", chunk_size=5),
    ("cpu", "recurrent"): Strategy("map", "scan"),
    # experiments/results/gpu_h100/: on an H100, W1 (im2col CNN) is fastest
    # vmapped and unrolled; W3's LSTM ran 18% faster as chunked5+scan than
    # vmap+scan at cohort 10, but vmap keeps larger cohorts on one launch.
    ("gpu", "conv"): Strategy("vmap", "unroll"),
    ("gpu", "dense"): Strategy("vmap", "scan"),
    ("gpu", "recurrent"): Strategy("vmap", "scan"),
}
_FALLBACK = Strategy("vmap", "scan")


def default_strategy(model_family: str, backend: str | None = None) -> Strategy:
  """The measured-fastest strategy for a model family on a backend.

  Args:
    model_family: ``"conv"``, ``"dense"`` or ``"recurrent"``.
    backend: ``"cpu"``, ``"gpu"``, ``"tpu"``; default ``jax.default_backend()``.
  """
  backend = backend or jax.default_backend()
  return _DEFAULTS.get((backend, model_family), _FALLBACK)


def parse_strategy(spec: str, model_family: str) -> Strategy:
  """Parses ``"auto"`` or ``"<parallel>+<loop>"`` (e.g. ``"chunked8+scan"``)."""
  if spec == "auto":
    return default_strategy(model_family)
  try:
    parallel, loop = spec.split("+")
  except ValueError:
    raise ValueError(
        f"strategy {spec!r} is not 'auto' or '<parallel>+<loop>' such as "
        f"'vmap+scan', 'map+unroll', 'chunked8+scan', 'vmap+host'.") from None
  chunk_size = 8
  if parallel.startswith("chunked") and parallel != "chunked":
    chunk_size = int(parallel[len("chunked"):])
    parallel = "chunked"
  return Strategy(parallel, loop, chunk_size)
