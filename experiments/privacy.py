r"""Privacy calculator: epsilon of a DP training run, or the noise it needs.

  python -m experiments.privacy --noise_multiplier=Z --sampling_rate=Q \
      --rounds=T --delta=D [--accountant=rdp|pld] \
      [--sampling=poisson|fixed|shuffle --population=N --cohort_size=M] \
      [--mechanism=gaussian|tree|local --rounds_per_tree=R] [--json]
  fedjax-lab privacy ...                 (the same)

prints epsilon; with ``--target_epsilon=E`` instead of ``--noise_multiplier``
it prints the smallest noise multiplier reaching E. With ``--json`` the last
stdout line is one JSON object (epsilon, delta, noise_multiplier, accountant,
sampling, rounds, mechanism, sampling_rate, population, cohort_size, ...).
Poisson sampling needs only q (``--population`` is optional and does not
change the result); fixed and shuffle need ``--population`` and
``--cohort_size`` (q = M / N; a given ``--sampling_rate`` must agree).
For the RDP accountant the JSON also carries ``epsilon_rdp_classic``: the same
RDP values converted with the classic eps = min_a rdp(a) + log(1/delta)/(a-1)
that older tables used. Refused or bad inputs: ``error: ...`` on stderr,
exit status 2.
"""

import dataclasses
import json
import math
from typing import Sequence

from absl import app
from absl import flags

from experiments.lib import cli

_NOISE = flags.DEFINE_float("noise_multiplier", None,
                            "Noise std / clip norm (on the sum of updates).")
_TARGET = flags.DEFINE_float(
    "target_epsilon", None,
    "Calibrate the noise multiplier to this epsilon instead.")
_Q = flags.DEFINE_float("sampling_rate", None,
                        "Poisson: probability q that a client joins a round.")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Number of rounds T.")
_DELTA = flags.DEFINE_float("delta", None, "Target delta.")
_ACCOUNTANT = flags.DEFINE_string("accountant", "rdp", "rdp | pld.")
_SAMPLING = flags.DEFINE_string("sampling", "poisson",
                                "poisson | fixed | shuffle.")
_POPULATION = flags.DEFINE_integer("population", None, "Clients N.")
_COHORT = flags.DEFINE_integer("cohort_size", None,
                               "Clients per round M (fixed / shuffle).")
_MECHANISM = flags.DEFINE_string("mechanism", "gaussian",
                                 "gaussian | tree | local.")
_ROUNDS_PER_TREE = flags.DEFINE_integer(
    "rounds_per_tree", 0, "Tree restart period in rounds (0 = one epoch).")
_JSON = flags.DEFINE_bool("json", False, "End with one JSON line.")


class _UsageError(ValueError):
  """Flags that do not describe one calculation."""


def _build_spec(accounting):
  """The AccountingSpec the flags describe (raises _UsageError)."""
  sampling, q = _SAMPLING.value, _Q.value
  population, cohort = _POPULATION.value, _COHORT.value
  if sampling == "poisson":
    if q is None:
      raise _UsageError("--sampling=poisson needs --sampling_rate")
    population = population or 1  # Poisson accounting depends on q only.
    cohort = cohort or 0
  else:
    if population is None:
      raise _UsageError(f"--sampling={sampling} needs --population")
    if cohort is None and q is not None:
      cohort = round(q * population)
    if cohort is None:
      raise _UsageError(f"--sampling={sampling} needs --cohort_size")
    if q is not None and population > 0 and not math.isclose(
        q, cohort / population, rel_tol=1e-6):
      raise _UsageError(f"--sampling_rate={q} disagrees with cohort_size / "
                        f"population = {cohort}/{population}")
    q = 0.0
  return accounting.AccountingSpec(
      noise_multiplier=_NOISE.value or 0.0, sampling=sampling,
      population=population, sampling_rate=q, cohort_size=cohort,
      mechanism=_MECHANISM.value, accountant=_ACCOUNTANT.value,
      rounds_per_tree=_ROUNDS_PER_TREE.value)


def _classic_rdp_epsilon(accounting, spec, rounds, delta):
  """eps = min over orders of rdp(a) + log(1/delta) / (a - 1) (Mironov 2017)."""
  if rounds == 0:
    return 0.0
  if spec.noise_multiplier == 0:
    return math.inf
  accountant = accounting.make_accountant(spec)
  accountant.compose(accounting.dp_event(spec, rounds))
  return float(min(r + math.log(1 / delta) / (a - 1)
                   for a, r in zip(accountant.orders, accountant.rdp)
                   if a > 1))


def _calculate(accounting):
  """Runs the calculation the flags ask for; returns the JSON record."""
  if (_NOISE.value is None) == (_TARGET.value is None):
    raise _UsageError(
        "give exactly one of --noise_multiplier and --target_epsilon")
  if _ROUNDS.value is None or _DELTA.value is None:
    raise _UsageError("--rounds and --delta are required")
  rounds, delta = _ROUNDS.value, _DELTA.value
  spec = _build_spec(accounting)
  record = {}
  if _TARGET.value is not None:
    z = accounting.calibrate_noise_multiplier(spec, rounds, _TARGET.value,
                                              delta)
    spec = dataclasses.replace(spec, noise_multiplier=z)
    record["target_epsilon"] = _TARGET.value
  eps = accounting.epsilon(spec, rounds, delta)
  record.update(
      epsilon=eps, delta=delta, noise_multiplier=spec.noise_multiplier,
      accountant=spec.accountant, sampling=spec.sampling, rounds=rounds,
      mechanism=spec.mechanism,
      sampling_rate=(spec.sampling_rate if spec.sampling == "poisson"
                     else spec.cohort_size / spec.population),
      population=(_POPULATION.value if spec.sampling == "poisson"
                  else spec.population),
      cohort_size=spec.cohort_size if spec.sampling != "poisson" else None)
  if spec.mechanism == "tree":
    record["rounds_per_tree"] = spec.rounds_per_tree or spec.rounds_per_epoch
  if spec.accountant == "rdp":
    record["epsilon_rdp_classic"] = _classic_rdp_epsilon(accounting, spec,
                                                         rounds, delta)
  return record


def main(argv: Sequence[str]) -> None:
  """Prints epsilon (or the calibrated noise multiplier); exit 2 on errors."""
  cli.reject_extra_args(argv)
  # Imported here so --help stays fast.
  from fedjax_lab.privacy import accounting  # pylint: disable=g-import-not-at-top

  try:
    record = _calculate(accounting)
  except (_UsageError, accounting.PrivacyError) as e:
    cli.fail(str(e), 2)
  if "target_epsilon" in record:
    print(f"noise_multiplier: {record['noise_multiplier']:.6f} (epsilon "
          f"{record['epsilon']:.4f} at delta {record['delta']:g} after "
          f"{record['rounds']} rounds, {record['accountant']})")
  else:
    print(f"epsilon: {record['epsilon']:.4f} at delta {record['delta']:g} "
          f"after {record['rounds']} rounds ({record['accountant']})")
  if _JSON.value:
    print(json.dumps(record))


def _parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, but a bad flag value or an extra argument exits 2
  like other errors."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    cli.fail(str(e), 2)
  cli.reject_extra_args(rest)
  return rest


def run_program() -> None:
  """The program: parses ``sys.argv`` (errors: exit 2) and runs ``main``."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run_program()
