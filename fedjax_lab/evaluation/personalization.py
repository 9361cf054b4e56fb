"""Personalization evaluation: global model vs. fine-tuned copy, per client.

The protocol of Wang et al., "Federated Evaluation of On-device
Personalization", arXiv 2019 (also used by Jiang et al., "Improving Federated
Learning Personalization via Model Agnostic Meta Learning", arXiv 2019): for
every client that holds both a train and a test split,

1. evaluate the global model on the client's test split;
2. fine-tune a copy of the global model on the client's train split (a few
   epochs of local optax steps);
3. evaluate the fine-tuned copy on the same test split,

and report the distribution over clients of the metrics before and after, not
only their mean: personalization that helps the average client can still
hurt the worst ones.

Everything runs vectorised: a chunk of clients is fine-tuned together (vmap
over clients, ``lax.scan`` over local steps, an all-masked step an exact
no-op) and evaluated on padded ``[C, T, B, ...]`` test batches, one jitted call
per chunk, so memory stays bounded by the chunk whatever the population. A
client's result depends only on its own data, the run's shuffle seed and its
key ``fold_in(rng, client_index)``, not on which clients share its chunk.

* :func:`build_personalization_evaluator` — the protocol above, for any
  model, optimizer and stores;
* :func:`build_runner` — the runner's evaluation from a config's
  ``personalization`` block (a fixed subset of clients, built once so it
  compiles once), and :func:`describe`, what ``summary.json`` keeps of it;
* the result and its summary:
  :mod:`fedjax_lab.evaluation.personalization_report`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lab.algorithms import local
from fedjax_lab.algorithms.optimizers import build_optimizer
from fedjax_lab.data import cohort as cohort_lib
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.data.federated import FederatedDataset
from fedjax_lab.evaluation.personalization_report import PersonalizationResult
from fedjax_lab.models import base as model_base

PyTree = Any
# Mixed into the seed for the runner's fixed subset of evaluated clients.
_CLIENT_SUBSET_SALT = 0x9E25


def match_test_clients(train_store: ClientStore, test_store: ClientStore,
                       client_indices: np.ndarray) -> np.ndarray:
  """Positions in ``test_store`` of the train clients at ``client_indices``.

  Clients are matched by id; ``-1`` where the test store lacks the id.
  Returns int64 ``[K]``.
  """
  indices = np.asarray(client_indices, np.int64)
  if (train_store.num_clients == test_store.num_clients and
      np.array_equal(train_store.client_ids, test_store.client_ids)):
    return indices.copy()
  lookup = {cid: i for i, cid in enumerate(test_store.client_ids.tolist())}
  ids = train_store.client_ids[indices].tolist()
  return np.asarray([lookup.get(cid, -1) for cid in ids], np.int64)


class FineTuneCarry(NamedTuple):
  """One client's state during fine-tuning."""

  params: PyTree
  opt_state: PyTree
  rng: jax.Array


def _check_count(name: str, value: int | None, minimum: int) -> None:
  if value is None or int(value) != value or value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def build_personalization_evaluator(
    model: model_base.Model,
    fine_tune_optimizer: optax.GradientTransformation,
    num_epochs: int,
    batch_size: int,
    max_steps: int | None = None,
    eval_batch_size: int = 256,
    clients_per_chunk: int = 64,
    shuffle_seed: int = 0,
) -> Callable[..., PersonalizationResult]:
  """Builds the per-client fine-tune-and-evaluate protocol (Wang et al. 2019).

  Args:
    model: the model whose global parameters are evaluated.
    fine_tune_optimizer: optax transformation for the local steps (a fresh
      state per client), fed the gradient of the masked mean batch loss.
    num_epochs: passes over each client's train split; 0 skips fine-tuning
      (the personalized metrics then equal the global ones).
    batch_size: examples per fine-tuning step.
    max_steps: optional cap on fine-tuning steps per client.
    eval_batch_size: examples per test batch.
    clients_per_chunk: clients fine-tuned and evaluated together in one
      jitted call (bounds memory: ``C * S * B`` train and ``C * T * B`` test
      examples per call).
    shuffle_seed: seed of the train-split shuffle (batches are drawn as by
      :func:`fedjax_lab.data.cohort.make_cohort` with ``round_index=0``).

  Returns:
    ``evaluate(params, train_store, test_store, client_indices=None,
    rng=None) -> PersonalizationResult``: ``client_indices`` are positions in
    ``train_store`` (default: every client); test splits are matched by
    client id; ``rng`` drives stochastic layers during fine-tuning (client
    ``i`` uses ``fold_in(rng, i)``; default ``jax.random.key(0)``).
  """
  _check_count("num_epochs", num_epochs, 0)
  _check_count("batch_size", batch_size, 1)
  if max_steps is not None:
    _check_count("max_steps", max_steps, 1)
  _check_count("eval_batch_size", eval_batch_size, 1)
  _check_count("clients_per_chunk", clients_per_chunk, 1)
  _check_count("shuffle_seed", shuffle_seed, 0)
  fine_tune = num_epochs > 0
  metric_names = ("loss", *model.example_metrics)

  def client_eval_sums(params, features, mask):
    """Per metric (value_sum, weight_sum) over a client's ``[T, B]`` batches."""
    def body(total, t):
      batch = jax.tree.map(lambda a: a[t], features)
      sums = model_base.eval_sums(model, params, batch, mask[t])
      return jax.tree.map(jnp.add, total, sums), None

    zero = jnp.zeros([], jnp.float32)
    zeros = {name: (zero, zero) for name in metric_names}
    total, _ = jax.lax.scan(body, zeros, jnp.arange(mask.shape[0]))
    return total

  def fine_tune_step(carry, batch, mask):
    rng, step_rng = jax.random.split(carry.rng)
    grads, _, _ = local.masked_loss_and_grad(model, carry.params, batch, mask,
                                             step_rng)
    updates, opt_state = fine_tune_optimizer.update(grads, carry.opt_state,
                                                    carry.params)
    new_carry = FineTuneCarry(optax.apply_updates(carry.params, updates),
                              opt_state, rng)
    active = jnp.any(mask > 0)
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new_carry, carry)

  def fine_tune_chunk(params, features, mask, client_rngs):
    """A chunk's fine-tuned params ``[C, ...]``; features ``[C, S, B, ...]``."""
    init = jax.vmap(lambda rng: FineTuneCarry(
        params, fine_tune_optimizer.init(params), rng))
    step = jax.vmap(fine_tune_step)

    def body(carry, s):
      batch = jax.tree.map(lambda a: a[:, s], features)
      step_mask = mask[:, s]
      # Steps where no client of the chunk has data are skipped outright.
      carry = jax.lax.cond(jnp.any(step_mask > 0), step,
                           lambda c, b, m: c, carry, batch, step_mask)
      return carry, None

    carry, _ = jax.lax.scan(body, init(client_rngs),
                            jnp.arange(mask.shape[1]))
    return carry.params

  @jax.jit
  def evaluate_chunk(params, train_features, train_mask, test_features,
                     test_mask, rng, client_indices):
    global_sums = jax.vmap(client_eval_sums, in_axes=(None, 0, 0))(
        params, test_features, test_mask)
    if not fine_tune:
      return global_sums, global_sums
    client_rngs = jax.vmap(lambda i: jax.random.fold_in(rng, i))(
        client_indices)
    tuned = fine_tune_chunk(params, train_features, train_mask, client_rngs)
    personalized_sums = jax.vmap(client_eval_sums)(tuned, test_features,
                                                   test_mask)
    return global_sums, personalized_sums

  def evaluate(params: PyTree, train_store: ClientStore,
               test_store: ClientStore,
               client_indices: np.ndarray | None = None,
               rng: jax.Array | None = None) -> PersonalizationResult:
    requested = np.asarray(
        np.arange(train_store.num_clients) if client_indices is None else
        client_indices, np.int64)
    if requested.ndim != 1 or (requested.size and (
        requested.min() < 0 or requested.max() >= train_store.num_clients)):
      raise IndexError("client_indices must be 1-D positions in [0, "
                       f"{train_store.num_clients}), got {client_indices}.")
    rng = jax.random.key(0) if rng is None else rng
    test_positions = match_test_clients(train_store, test_store, requested)
    num_test = np.where(test_positions >= 0,
                        test_store.client_sizes[np.maximum(test_positions, 0)],
                        0)
    kept = num_test > 0
    train_indices, test_positions = requested[kept], test_positions[kept]
    num_clients = len(train_indices)
    train_sizes = train_store.client_sizes[train_indices]
    steps = np.zeros(num_clients, np.int64)
    if fine_tune:
      steps = cohort_lib.client_steps(train_sizes, batch_size, num_epochs,
                                      max_steps)
    chunk_size = (clients_per_chunk if num_clients >= clients_per_chunk else
                  cohort_lib.round_up_to_bucket(num_clients))
    # Largest clients first, so a chunk's clients stop at similar steps.
    order = np.argsort(-train_sizes, kind="stable")
    global_sums, personalized_sums = [], []
    for start in range(0, num_clients, clients_per_chunk):
      members = order[start:start + clients_per_chunk]
      test_features, test_mask = cohort_lib.make_client_eval_batches(
          test_store, test_positions[members], eval_batch_size, chunk_size)
      padded_indices = np.zeros(chunk_size, np.int64)
      padded_indices[:len(members)] = train_indices[members]
      train_features = {}
      train_mask = np.zeros([chunk_size, 1, 1], np.float32)
      if fine_tune:
        cohort = cohort_lib.make_cohort(
            train_store, train_indices[members], batch_size=batch_size,
            num_epochs=num_epochs, max_steps=max_steps, seed=shuffle_seed,
            round_index=0, cohort_buckets=[chunk_size])
        train_features, train_mask = cohort.features, cohort.example_mask
      chunk_sums = jax.device_get(evaluate_chunk(
          params, train_features, train_mask, test_features, test_mask, rng,
          padded_indices))
      real = jax.tree.map(lambda a, n=len(members): a[:n], chunk_sums)
      global_sums.append(real[0])
      personalized_sums.append(real[1])

    inverse = np.empty(num_clients, np.int64)
    inverse[order] = np.arange(num_clients)

    def per_client(chunks):
      """Chunks of (value_sum, weight) -> per-client values, requested order."""
      if not chunks:
        return {}, {}
      stacked = jax.tree.map(lambda *a: np.concatenate(a), *chunks)
      values = {name: (np.asarray(v, np.float64) /
                       np.maximum(np.asarray(n, np.float64), 1e-12))[inverse]
                for name, (v, n) in stacked.items()}
      weights = {name: np.asarray(n, np.float64)[inverse]
                 for name, (_, n) in stacked.items()}
      return values, weights

    global_metrics, metric_weights = per_client(global_sums)
    personalized_metrics, _ = per_client(personalized_sums)
    return PersonalizationResult(
        client_ids=train_store.client_ids[train_indices],
        client_indices=train_indices,
        num_train_examples=train_sizes,
        num_test_examples=num_test[kept],
        num_fine_tune_steps=steps,
        global_metrics=global_metrics,
        personalized_metrics=personalized_metrics,
        metric_weights=metric_weights,
        num_skipped_no_test_examples=int(np.count_nonzero(~kept)))

  return evaluate


# ---- the runner's evaluation, from the config ------------------------------


@dataclasses.dataclass(frozen=True)
class PersonalizationRunner:
  """Fine-tune-and-evaluate for a run.

  Attributes:
    every: evaluate every this many rounds (0: only after the last round).
    evaluate: ``params -> PersonalizationResult``.
  """

  every: int
  evaluate: Callable[[PyTree], PersonalizationResult]

  def __call__(self, params: PyTree) -> PersonalizationResult:
    return self.evaluate(params)


def build_runner(config: Any, model: model_base.Model,
                 dataset: FederatedDataset) -> PersonalizationRunner:
  """The ``personalization`` block of ``config`` as a runner.

  ``max_clients`` > 0 evaluates a fixed random subset of that many training
  clients (the same every time); fine-tuning uses SGD at
  ``learning_rate`` for ``num_epochs`` epochs of ``batch_size``. Memory grows
  with ``clients_per_chunk x eval_batch_size`` examples in flight (a CNN's
  activations are ~1 MB per MNIST example): keep both small.
  """
  block = config.personalization
  evaluator = build_personalization_evaluator(
      model, build_optimizer("sgd", block.learning_rate, {}),
      num_epochs=block.num_epochs, batch_size=block.batch_size,
      eval_batch_size=block.get("eval_batch_size", 32),
      clients_per_chunk=block.get("clients_per_chunk", 16),
      shuffle_seed=config.seed)
  population = dataset.train.num_clients
  clients = None
  if block.max_clients and block.max_clients < population:
    clients = np.sort(np.random.default_rng(
        [config.seed, _CLIENT_SUBSET_SALT]).choice(
            population, block.max_clients, replace=False))
  rng = jax.random.fold_in(jax.random.key(config.seed), _CLIENT_SUBSET_SALT)
  return PersonalizationRunner(
      every=block.get("every", 0),
      evaluate=lambda params: evaluator(params, dataset.train, dataset.test,
                                        clients, rng=rng))


def describe(result: PersonalizationResult) -> dict[str, Any]:
  """The distribution summary plus per-client metrics (for plots)."""
  out: dict[str, Any] = dict(result.summary())
  out["client_ids"] = [str(c) for c in result.client_ids]
  for name, values in result.global_metrics.items():
    out[f"global_{name}_per_client"] = np.asarray(values).tolist()
  for name, values in result.personalized_metrics.items():
    out[f"personalized_{name}_per_client"] = np.asarray(values).tolist()
  return out
