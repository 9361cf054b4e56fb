"""The refusal table: every row refuses its example with its reason, passes
without DP, and is what the config, the plan and the accountant raise."""

import dataclasses

import pytest

from fedjax_lab import algorithms
from fedjax_lab.algorithms import compression
from fedjax_lab.privacy import accounting, mechanisms, plan, refusals
from fedjax_lab.training import setup
from tests.config_helpers import tiny_config as _config

# Options that make an algorithm's option-dependent refusal apply.
OPTION_TRIGGERS = {"fedprox": {"adaptive_mu": True}, "mime": {},
                   "hypcluster": {"init": "kmeans"}}
ROWS = refusals.table()


def _context(algorithm: str, **options):
  recipe = algorithms.get(algorithm)
  config = _config("synthetic_logreg_fedavg", algorithm=algorithm)
  return algorithms.BuildContext(config, {**recipe.option_defaults(),
                                          **options})


def _refused_setting(row: refusals.Refusal) -> refusals.Setting:
  """The row's example, completed with a context that triggers it."""
  fields = dict(row.example)
  if "context" in row.needs:
    name = fields["algorithm"]
    if name not in OPTION_TRIGGERS:
      pytest.skip(f"no trigger known for {name}'s option refusal")
    fields["context"] = _context(name, **OPTION_TRIGGERS[name])
    fields.setdefault("mechanism", "gaussian")
  elif "algorithm" in row.needs:
    fields["context"] = _context(fields["algorithm"])
  return refusals.Setting(**fields)


def test_the_table_has_every_kind_of_row():
  names = {row.name for row in ROWS}
  for expected in ("local x compression", "mechanism x weighting",
                   "tree x server optimizer", "gaussian x shuffle",
                   "tree x sampling", "noise cohort x shuffle",
                   "mimelite x tree", "agnostic_fedavg x tree",
                   "hypcluster x options", "fedprox x options",
                   "mime x options", "mechanism x pre-round",
                   "mechanism x client metrics"):
    assert expected in names
  assert len(names) == len(ROWS)
  assert {row.scope for row in ROWS} == {"algorithm", "config", "plan",
                                         "accounting", "built"}


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_every_row_refuses_its_example_with_its_reason(row):
  setting = _refused_setting(row)
  reason = row.check(setting)
  assert reason and reason == row.reason(setting)
  assert refusals.first_refusal(setting, scopes=(row.scope,)) is not None


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_no_row_refuses_a_run_without_dp(row):
  setting = dataclasses.replace(_refused_setting(row), mechanism="none")
  assert row.check(setting) is None


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_rows_skip_unknown_facts(row):
  assert row.check(refusals.Setting()) is None


# ----------------------------------------------- the callers raise the rows

@pytest.mark.parametrize("name, overrides, row_name", [
    ("mnist_cnn_compressed", {"privacy.mechanism": "local"},
     "local x compression"),
    ("synthetic_logreg_fedavg", {"privacy.mechanism": "gaussian",
                                 "weighting": "num_examples"},
     "mechanism x weighting"),
    ("synthetic_logreg_fedavg", {"privacy.mechanism": "tree",
                                 "server.optimizer": "adam"},
     "tree x server optimizer"),
    ("synthetic_logreg_fedavg", {"privacy.mechanism": "adaptive",
                                 "eval_train_split": True},
     "mechanism x eval_train_split"),
    ("synthetic_mime", {"privacy.mechanism": "tree",
                        "algorithm": "mimelite"}, "mimelite x tree"),
    ("synthetic_mime", {"privacy.mechanism": "gaussian"}, "mime x options"),
    ("synthetic_fedprox", {"privacy.mechanism": "gaussian",
                           "fedprox.adaptive_mu": True}, "fedprox x options"),
])
def test_validate_raises_the_rows_reason(name, overrides, row_name):
  config = _config(name, weighting="uniform")
  for key, value in overrides.items():
    target = config
    *path, last = key.split(".")
    for part in path:
      target = target[part]
    target[last] = value
  row = {r.name: r for r in ROWS}[row_name]
  with pytest.raises(setup.ConfigError) as error:
    setup.validate(config)
  reason = str(error.value)
  assert reason == row.check(_setting_of(config))


def _setting_of(config):
  mechanism = config.privacy.mechanism
  recipe = algorithms.get(config.algorithm)
  context = algorithms.BuildContext(config, recipe.options(config))
  switched_on = {"eval_train_split": config.eval_train_split,
                 "personalization.enabled": config.personalization.enabled}
  diagnostics = tuple(key for key, on in switched_on.items() if on)
  return refusals.Setting(
      mechanism=mechanism, algorithm=config.algorithm, context=context,
      compression=config.compression.method, weighting=config.weighting,
      server_optimizer=config.server.optimizer, diagnostics=diagnostics,
      release_diagnostics=config.privacy.release_diagnostics)


def test_build_plan_raises_the_plan_rows():
  config = _config("dp_ftrl_mnist")
  config.privacy.noise_cohort_size = 1000
  with pytest.raises(accounting.PrivacyError, match="noise_cohort_size"):
    plan.build_plan(config.privacy, sampling="shuffle", num_clients=100,
                    cohort_size=10, sampling_rate=0.0, num_rounds=2)
  config.privacy.noise_cohort_size = 0
  config.privacy.accounting_population = 10**6
  with pytest.raises(accounting.PrivacyError,
                     match="accounting_population"):
    plan.build_plan(config.privacy, sampling="shuffle", num_clients=100,
                    cohort_size=10, sampling_rate=0.0, num_rounds=2)


@pytest.mark.parametrize("row", [r for r in ROWS if r.scope == "accounting"],
                         ids=lambda r: r.name)
def test_the_accountant_raises_the_accounting_rows(row):
  example = row.example
  spec = accounting.AccountingSpec(
      noise_multiplier=1.0, sampling=example.get("sampling", "shuffle"),
      population=100, sampling_rate=0.1, cohort_size=10,
      mechanism=example["mechanism"],
      accountant=example.get("accountant", "rdp"))
  with pytest.raises(accounting.PrivacyError) as error:
    spec.validate()
  assert str(error.value) == row.check(refusals.Setting(
      mechanism=spec.mechanism, sampling=spec.sampling,
      accountant=spec.accountant))


def test_direct_api_weighting_check():
  refusals.check_weighting("uniform")
  refusals.check_weighting("num_examples", mechanism="none")
  with pytest.raises(ValueError, match="weight 1"):
    refusals.check_weighting("num_examples")


def test_compressed_local_dp_aggregator_is_refused():
  config = _config("ldp_mnist")
  privacy = setup.build_privacy(config, 100)
  with pytest.raises(ValueError, match="local noise after decoding"):
    mechanisms.build_aggregator(privacy, compression.compress(
        compression.identity()))


@pytest.mark.parametrize("row", [r for r in ROWS if r.scope == "built"],
                         ids=lambda r: r.name)
def test_check_private_algorithm_raises_the_built_rows(row):
  algorithm = row.example["built_algorithm"]
  with pytest.raises(accounting.PrivacyError) as error:
    plan.check_private_algorithm(algorithm)
  assert str(error.value) == row.check(refusals.Setting(**row.example))
