"""Leak tests: a DP run publishes nothing that depends on one client's data
without also depending on the noise.

For every algorithm x mechanism the config accepts, a short DP run is made
three times with a reproducible noise seed: A (data D, noise seed 1), B (D,
noise seed 2) and C (D with one sampled client's data and size changed,
noise seed 1). Every released output — each metrics.jsonl / CSV / TensorBoard
value, the summary, the final state — is compared: a value that differs
between A and C (it depends on that client's data) but not between A and B
(it carries no noise) is a noise-free release of private data. The
checker's own power is tested too: with ``release_diagnostics`` it must flag
the un-noised diagnostics.

Then the noise itself: from a secret-seeded run's released files, the
attempts to regenerate the noise (from config.seed, as the runner once did,
or from any seed found in a released file) fail, while the same attack on a
run with a published ``privacy.noise_seed`` recovers the exact clipped sum.
"""

import csv
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.engine import clients as engine_clients
from fedjax_lab.engine import round as round_lib
from fedjax_lab.privacy import secret_seed
from fedjax_lab.privacy.aggregators import add_gaussian_noise
from fedjax_lab.training import loop, setup

ALGORITHM_VARIANTS = {
    "fedavg": {},
    "fedopt_adam": {"algorithm": "fedopt", "server.optimizer": "adam",
                    "server.learning_rate": 0.01},
    "fedsgd": {"algorithm": "fedsgd"},
    "fedprox": {"algorithm": "fedprox", "fedprox.mu": 0.1,
                "fedprox.straggler_fraction": 0.5},
    "scaffold": {"algorithm": "scaffold"},
    "mimelite": {"algorithm": "mimelite"},
    "reptile": {"algorithm": "reptile", "reptile.num_inner_steps": 2},
    "agnostic": {"algorithm": "agnostic_fedavg",
                 "agnostic_fedavg.loss_bound": 5.0},
    "hypcluster": {"algorithm": "hypcluster", "hypcluster.init": "random"},
    "quantize": {"compression.method": "quantize",
                 "compression.num_bits": 4},
    "top_k": {"compression.method": "top_k", "compression.fraction": 0.1},
}
MECHANISMS = ("gaussian", "adaptive", "tree", "local")
_NUM_CLIENTS = 12
_LOAD_DATASET = setup.load_dataset


def _config(mechanism, **overrides):
  config = common.base_config()
  config.num_rounds = 2
  config.eval_every = 1
  config.checkpoint_every = 0
  config.strategy = "vmap+unroll"
  config.weighting = "uniform"
  config.data.update({"name": "synthetic", "alpha": 1.0, "beta": 1.0,
                      "iid": False, "num_clients": _NUM_CLIENTS, "seed": 0})
  config.model.name = "logistic"
  config.client.update({"learning_rate": 0.05, "max_steps": 3,
                        "batch_size": 8})
  if mechanism == "tree":
    config.sampling, config.cohort_size = "shuffle", 4
  else:
    config.sampling, config.sampling_rate = "poisson", 0.4
  config.privacy.update({"mechanism": mechanism, "clip_norm": 0.5,
                         "noise_multiplier": 0.8, "delta": 1e-3})
  for key, value in overrides.items():
    block, _, name = key.rpartition(".")
    (config[block] if block else config)[name] = value
  return config


def _changed_store(store: ClientStore, client: int, seed: int) -> ClientStore:
  """``store`` with ``client``'s examples replaced by others (a different
  count, features and labels): a neighbouring dataset."""
  rng = np.random.default_rng(seed)
  per_client = [store.client(i) for i in range(store.num_clients)]
  old = per_client[client]
  count = len(old["y"]) + 5
  per_client[client] = {
      "x": (3.0 * rng.normal(size=(count,) + old["x"].shape[1:])).astype(
          old["x"].dtype),
      "y": rng.integers(0, 10, size=count).astype(old["y"].dtype)}
  return ClientStore.from_client_arrays(store.client_ids, per_client)


def _run(config, workdir, monkeypatch, change_client=None):
  """Runs ``config`` into ``workdir`` (optionally with one client's training
  data changed) and returns every released output, flattened."""
  if change_client is not None:
    def load(name, **kwargs):
      dataset = _LOAD_DATASET(name, **kwargs)
      return dataset.__class__(**{
          **dataset.__dict__,
          "train": _changed_store(dataset.train, change_client, 7)})

    monkeypatch.setattr(setup, "load_dataset", load)
  loop.run_experiment(setup.build_experiment(config), str(workdir),
                      show_progress=False)
  monkeypatch.setattr(setup, "load_dataset", _LOAD_DATASET)
  return released_outputs(str(workdir))


def _flatten(value, prefix, out):
  if isinstance(value, dict):
    for k, v in value.items():
      _flatten(v, f"{prefix}.{k}", out)
  elif isinstance(value, list):
    for i, v in enumerate(value):
      _flatten(v, f"{prefix}[{i}]", out)
  else:
    out[prefix] = value


def _tensorboard(logdir):
  event_accumulator = pytest.importorskip(
      "tensorboard.backend.event_processing.event_accumulator")
  accumulator = event_accumulator.EventAccumulator(logdir)
  accumulator.Reload()
  return {f"tb.{tag}@{e.step}": e.value for tag in
          accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)}


def released_outputs(workdir: str) -> dict:
  """Every value a run writes outside its checkpoints, by a stable name."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      _flatten(row, f"jsonl@{row['round']}", out)
  with open(os.path.join(workdir, "metrics.csv"), newline="") as f:
    for row in csv.DictReader(f):
      _flatten(row, f"csv@{row['round']}", out)
  out.update(_tensorboard(os.path.join(workdir, "tensorboard")))
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  summary.pop("workdir")
  _flatten(summary, "summary", out)
  with np.load(os.path.join(workdir, loop.FINAL_STATE_FILE)) as data:
    for name in data.files:
      out[f"final_state.{name}"] = data[name].tobytes()
  with open(os.path.join(workdir, "config.json")) as f:
    _flatten(json.load(f), "config", out)
  return out


def noise_free_leaks(a: dict, noise_changed: dict, data_changed: dict
                     ) -> list[str]:
  """Names whose value (or presence) moves with one client's data but not
  with the noise seed."""
  leaks = []
  for name in sorted(set(a) | set(data_changed)):
    moves_with_data = a.get(name, "<absent>") != data_changed.get(
        name, "<absent>")
    moves_with_noise = a.get(name, "<absent>") != noise_changed.get(
        name, "<absent>")
    if moves_with_data and not moves_with_noise:
      leaks.append(name)
  return leaks


# Every run samples its cohorts with this seed, whatever its noise seed, so
# that runs A and B differ in the noise alone (the noise seed also seeds the
# sampler in a real run).
_SAMPLING_SEED = 1


def _sampled_client(config):
  """A client of round 1's cohort."""
  sampler = setup.make_sampler(config, _NUM_CLIENTS, _SAMPLING_SEED)
  return int(sampler.sample(0)[0])


def _check_combination(tmp_path, monkeypatch, mechanism, overrides,
                       **privacy):
  """``(noise-free leaks, None)`` of one algorithm x mechanism, or
  ``(None, refusal message)``."""
  def config(noise_seed):
    out = _config(mechanism, **overrides)
    out.privacy.update({"noise_seed": noise_seed, **privacy})
    return out

  try:
    setup.build_experiment(config(1))
  except setup.ConfigError as e:
    return None, str(e)
  monkeypatch.setattr(secret_seed, "sampling_seed",
                      lambda seed: _SAMPLING_SEED)
  client = _sampled_client(config(1))
  a = _run(config(1), tmp_path / "a", monkeypatch)
  b = _run(config(2), tmp_path / "b", monkeypatch)
  c = _run(config(1), tmp_path / "c", monkeypatch, change_client=client)
  moved = [k for k in a if k.startswith("final_state") and a[k] != c[k]]
  assert moved, "the changed client had no effect: the test would be vacuous"
  leaks = noise_free_leaks(a, b, c)
  if leaks:
    # Confirm on the changed data: a value that only thresholds a noisy
    # quantity (e.g. which clusters got a positive noisy count) can agree
    # across two noise seeds by chance where the signal dominates, but not
    # where the noise decides.
    d = _run(config(2), tmp_path / "d", monkeypatch, change_client=client)
    leaks = [k for k in leaks if c.get(k, "<absent>") == d.get(k, "<absent>")]
  return leaks, None


# The runner-level check (every sink, the summary, the final state) covers
# every mechanism with FedAvg and every algorithm with DP-FedAvg; the other
# accepted pairs are checked at the round level (the same release policy on
# the compiled round's metrics and the parameters it produces), which costs
# a fraction of a full run.
# Pairs the config refuses (each with a message; tested below): the tree
# mechanism noises only the model delta's running sum, which these
# algorithms' extra statistics bypass; local DP would noise after decoding.
REFUSED_PAIRS = {("mimelite", "tree"), ("agnostic", "tree"),
                 ("hypcluster", "tree"), ("fedopt_adam", "tree"),
                 ("quantize", "local"), ("top_k", "local")}
RUNNER_PAIRS = sorted(({("fedavg", m) for m in MECHANISMS} |
                       {(v, "gaussian") for v in ALGORITHM_VARIANTS})
                      - REFUSED_PAIRS)
ROUND_PAIRS = sorted({(v, m) for v in ALGORITHM_VARIANTS for m in MECHANISMS}
                     - set(RUNNER_PAIRS) - REFUSED_PAIRS)


@pytest.mark.parametrize("variant, mechanism", sorted(REFUSED_PAIRS))
def test_refused_pairs_are_refused_with_a_reason(variant, mechanism):
  """Every pair the leak tests leave out is refused before anything runs
  (if a refusal is lifted, the pair must join the checked ones)."""
  with pytest.raises(setup.ConfigError, match=mechanism):
    setup.build_experiment(_config(mechanism, **ALGORITHM_VARIANTS[variant]))


@pytest.mark.parametrize("variant, mechanism", RUNNER_PAIRS)
def test_no_noise_free_release_of_a_clients_data(tmp_path, monkeypatch,
                                                   variant, mechanism):
  leaks, refused = _check_combination(tmp_path, monkeypatch, mechanism,
                                      ALGORITHM_VARIANTS[variant])
  assert refused is None, refused
  assert leaks == [], (
      f"{variant} x {mechanism} releases values that depend on one client's "
      f"data but carry no noise: {leaks}")


def _round_level_release(exp, round_fn, noise_seed, rounds=2):
  """The released metrics of ``rounds`` rounds and the final parameters,
  run as the loop runs them (noise key from ``noise_seed``, the release
  policy on the round's metrics), without evaluation or files."""
  from fedjax_lab.data import cohort as cohort_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lab.training import privacy_run  # pylint: disable=g-import-not-at-top
  config = exp.config
  private = privacy_run.PrivacyRun.start(
      exp.privacy, evaluation_reads_train_data=exp.evaluate_params is not None,
      checkpoint_record={"noise_seed": noise_seed})
  sampler = setup.make_sampler(config, exp.dataset.train.num_clients,
                               _SAMPLING_SEED)
  rng = jax.random.key(config.seed)
  params = exp.model.init(jax.random.fold_in(rng, 0))
  state = exp.algorithm.server_init(params)
  train = exp.dataset.train
  states = (exp.client_states_init(params, train.num_clients)
            if exp.client_states_init is not None else
            round_lib.stack_client_states(
                exp.algorithm.client_state_init(params), train.num_clients))
  out = {}
  for t in range(rounds):
    batch = cohort_lib.make_round_cohort(
        train, sampler.sample(t), batch_size=config.client.batch_size,
        num_epochs=exp.local_epochs, max_steps=exp.local_max_steps,
        seed=config.seed, round_index=t,
        fixed_cohort_size=(config.cohort_size if config.sampling != "poisson"
                           else None))
    cohort = round_lib.cohort_arrays(batch)
    state, new_states, metrics = round_fn(
        state, round_lib.place_cohort(cohort, None),
        round_lib.gather_client_states(states, cohort["client_indices"]),
        jax.random.fold_in(rng, 1), private.noise_key())
    states = round_lib.scatter_client_states(states, cohort["client_indices"],
                                             new_states)
    record = {"round": t + 1, **{k: float(v) for k, v in metrics.items()},
              "local_steps_padded": int(cohort["example_mask"].shape[1]),
              **private.round_metrics(t)}
    _flatten(private.release_record(record, round_fn.metric_origins()),
             f"round@{t + 1}", out)
  for i, leaf in enumerate(jax.tree.leaves(state.params)):
    out[f"params.{i}"] = np.asarray(leaf).tobytes()
  return out


@pytest.mark.parametrize("variant, mechanism", ROUND_PAIRS)
def test_no_noise_free_release_in_the_rounds_of_every_pair(
    variant, mechanism, monkeypatch):
  config = _config(mechanism, **ALGORITHM_VARIANTS[variant])
  # Fixed-size cohorts: one compiled shape (the runner-level tests and the
  # removal test cover Poisson cohorts).
  config.sampling, config.cohort_size = (
      "shuffle" if mechanism == "tree" else "fixed"), 4
  exp = setup.build_experiment(config)
  round_fn = round_lib.build_round(exp.algorithm, exp.strategy, donate=False)
  a = _round_level_release(exp, round_fn, noise_seed=1)
  b = _round_level_release(exp, round_fn, noise_seed=2)
  # The neighbouring dataset goes through the whole build (algorithms may
  # read the data when they are built).
  client = _sampled_client(config)
  monkeypatch.setattr(setup, "load_dataset", lambda name, **kwargs: (
      lambda d: d.__class__(**{**d.__dict__, "train": _changed_store(
          d.train, client, 7)}))(_LOAD_DATASET(name, **kwargs)))
  changed = setup.build_experiment(config)
  changed_fn = round_lib.build_round(changed.algorithm, changed.strategy,
                                     donate=False)
  c = _round_level_release(changed, changed_fn, noise_seed=1)
  assert any(a[k] != c[k] for k in a if k.startswith("params")), (
      "the changed client had no effect: the test would be vacuous")
  leaks = noise_free_leaks(a, b, c)
  if leaks:  # confirm on the changed data (see _check_combination)
    d = _round_level_release(changed, changed_fn, noise_seed=2)
    leaks = [k for k in leaks if c.get(k, "<absent>") == d.get(k, "<absent>")]
  assert leaks == []


def test_the_checker_flags_released_diagnostics(tmp_path, monkeypatch):
  """With diagnostics released (labelled), the same check finds them: the
  tests above would catch any of them slipping into a default release."""
  leaks, _ = _check_combination(tmp_path, monkeypatch, "gaussian", {},
                                release_diagnostics=True)
  for diagnostic in ("diagnostic/train_loss", "diagnostic/update_norm",
                     "diagnostic/clipped_sum_norm",
                     "diagnostic/fraction_clipped"):
    assert any(name.endswith("." + diagnostic) for name in leaks), (
        diagnostic, leaks)


# Released values that depend on the population size N, which DP-FedAvg
# treats as public (the expected cohort q N is the fixed denominator).
_POPULATION_DEPENDENT = ("population", "accounted_cohort_size",
                         "simulated_cohort_size", "dp_noise_std_on_mean",
                         "delta_chosen", "dataset")


def test_removing_a_client_changes_no_noise_free_release(tmp_path,
                                                         monkeypatch):
  """Add/remove neighbours (Poisson's relation): dropping the last client,
  sampled in round 1, changes nothing released except through the noise
  (and through the public population size) — in particular the realised
  cohort size stays withheld."""
  monkeypatch.setattr(secret_seed, "sampling_seed", lambda seed: seed)
  last = _NUM_CLIENTS - 1

  def config(noise_seed):
    out = _config("gaussian", num_rounds=3)
    out.privacy.noise_seed = noise_seed
    return out

  seed = next(s for s in range(1, 200) if last in setup.make_sampler(
      config(s), _NUM_CLIENTS, s).sample(0))
  a = _run(config(seed), tmp_path / "a", monkeypatch)
  # Another noise key, the same cohorts.
  monkeypatch.setattr(secret_seed, "sampling_seed", lambda _: seed)
  b = _run(config(seed + 1000), tmp_path / "b", monkeypatch)
  monkeypatch.setattr(setup, "load_dataset", lambda name, **kwargs: (
      lambda d: d.__class__(**{**d.__dict__, "train": d.train.subset(
          range(last))}))(_LOAD_DATASET(name, **kwargs)))
  loop.run_experiment(setup.build_experiment(config(seed)),
                      str(tmp_path / "c"), show_progress=False)
  c = released_outputs(str(tmp_path / "c"))
  leaks = [k for k in noise_free_leaks(a, b, c)
           if not any(word in k for word in _POPULATION_DEPENDENT)]
  assert leaks == []


# ------------------------------------------------------ regenerating noise


def _one_round_config(**privacy):
  config = _config("gaussian", num_rounds=1)
  config.client.learning_rate = 0.5
  config.privacy.update({"noise_multiplier": 5.0, **privacy})
  return config


def _noisy_sum(workdir, config):
  """The released noisy sum of round 1: (params_1 - params_0) * E|S|."""
  exp = setup.build_experiment(config)
  params0 = exp.model.init(jax.random.fold_in(jax.random.key(config.seed), 0))
  params1 = loop.load_final_state(str(workdir),
                                  exp.algorithm.server_init(params0))
  expected = config.sampling_rate * _NUM_CLIENTS
  return jax.tree.map(lambda p1, p0: (p1 - p0) * expected, params1, params0)


def _noise_with(round_key, like):
  """The aggregator's noise on the sum for a round key (the engine's
  derivation: finalize gets fold_in(round_key, tag))."""
  key = jax.random.fold_in(round_key, engine_clients._AGGREGATOR_RNG_TAG)  # pylint: disable=protected-access
  zeros = jax.tree.map(jnp.zeros_like, like)
  return add_gaussian_noise(zeros, 5.0 * 0.5, key)


def _residual_norm(noisy_sum, noise):
  return float(jnp.sqrt(sum(jnp.sum((s - n)**2) for s, n in zip(
      jax.tree.leaves(noisy_sum), jax.tree.leaves(noise)))))


def _attack_keys(config, released_text):
  """Every noise key an attacker can derive from released files: the old
  derivation from config.seed, and the new one from every integer found."""
  base = jax.random.key(config.seed)
  keys = [jax.random.fold_in(jax.random.fold_in(base, 1), 0)]
  for token in set(released_text.replace(",", " ").replace(":", " ")
                   .replace("}", " ").replace("]", " ").split()):
    if token.isdigit() and int(token) < 2**64:
      keys.append(jax.random.fold_in(secret_seed.noise_key(int(token)), 0))
  return keys


def _released_text(workdir):
  text = ""
  for name in ("config.json", "summary.json", "metrics.jsonl",
               "versions.json", "metrics.csv"):
    with open(os.path.join(workdir, name)) as f:
      text += f.read() + " "
  return text


def test_noise_cannot_be_regenerated_from_released_files(tmp_path):
  config = _one_round_config(release_diagnostics=True)
  loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                      show_progress=False)
  released = _released_text(str(tmp_path))
  noisy = _noisy_sum(tmp_path, config)
  clip_bound = 0.5 * _NUM_CLIENTS  # any real clipped sum has norm <= this
  for key in _attack_keys(config, released):
    residual = _residual_norm(noisy, _noise_with(key, noisy))
    assert residual > 3 * clip_bound, "the noise was regenerated"
  # The secret itself appears in no released file.
  record_seed = None
  for root, _, files in os.walk(tmp_path / "checkpoints"):
    for name in files:
      if root.endswith("record") or name == "metadata":
        try:
          with open(os.path.join(root, name)) as f:
            record_seed = json.load(f).get("noise_seed", record_seed)
        except (ValueError, UnicodeDecodeError, AttributeError):
          pass
  assert record_seed is not None, "the checkpoint must hold the seed"
  assert str(record_seed) not in released
  with open(tmp_path / loop.FINAL_STATE_FILE, "rb") as f:
    assert np.uint64(record_seed).tobytes() not in f.read()


def test_a_published_noise_seed_lets_anyone_remove_the_noise(tmp_path):
  """The control: the same attack succeeds on a seeded run, so the test
  above would fail if the noise came from anything released."""
  config = _one_round_config(noise_seed=12345, release_diagnostics=True)
  loop.run_experiment(setup.build_experiment(config), str(tmp_path),
                      show_progress=False)
  released = _released_text(str(tmp_path))
  assert "SEEDED" in released  # the summary says the noise is seeded
  noisy = _noisy_sum(tmp_path, config)
  residuals = [_residual_norm(noisy, _noise_with(key, noisy))
               for key in _attack_keys(config, released)]
  with open(tmp_path / "metrics.jsonl") as f:
    clipped_sum_norm = json.loads(f.readline())[
        "diagnostic/clipped_sum_norm"]
  assert min(residuals) == pytest.approx(clipped_sum_norm, rel=1e-3)
