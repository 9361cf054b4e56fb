r"""Federated rounds of the word-level language models, against an ideal.

  python -m experiments.bench.language_models \
      [--workloads=transformer_lm,word_lstm] [--rounds=3] \
      [--strategies=auto,map+scan,chunked5+scan,vmap+scan] [--quick] \
      [--out=experiments/results/language_models_<backend>]

The next-word task of Stack Overflow at its real shapes: 10,004 token ids
(10,000 words + pad, OOV, BOS, EOS), sequences of 20, cohorts of 10 clients,
batch 16, 4 local steps (each client holds exactly 64 sequences and trains one
epoch), FedAvg with client SGD. The data are seeded random token ids drawn
from ``1..V-1`` (timing only: speed does not depend on which words they are,
and no target is padding, so every target token counts).

For ``transformer_lm`` (pfl-research's Stack Overflow configuration) and
``word_lstm`` (Reddi et al. 2021), each round is the engine's compiled round
(``engine.round.build_round``), run as the runner runs it (cohort batching
and client-state bookkeeping included: ``experiments.bench.workloads``), with
the strategy a run would pick (``--strategies=auto``: the model's family in
``training.setup.MODEL_FAMILIES`` through ``parse_strategy``) and any other
strategies listed (a strategy equal to one already timed is skipped). Timing
as in ``experiments.bench.strategies``: a warm-up that compiles every padded
shape, then the rounds timed from a fresh state.

Reported per strategy: seconds per round, target tokens per second (the
round's real target tokens / its median seconds) and the ratio to the
bare-compute ideal of ``experiments.bench.strategies``: the same real client
steps as a bare jitted SGD step on device-resident batches, the faster of one
client at a time and all clients vmapped.

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
import jax
import numpy as np

from experiments.bench import report as report_lib
from experiments.bench import strategies as strategies_lib
from experiments.bench import workloads
from experiments.bench.workloads import Workload
from experiments.lib import cli
from fedjax_lab.data.federated import ClientStore
from fedjax_lab.engine.strategy import Strategy, parse_strategy
from fedjax_lab.training.setup import MODEL_FAMILIES

MODELS = ("transformer_lm", "word_lstm")
DEFAULT_STRATEGIES = ("auto", "map+scan", "chunked5+scan", "vmap+scan")
# --quick: the same architectures, narrow (tests; not for timing).
QUICK_KWARGS = {
    "transformer_lm": {"embed_dim": 16, "num_heads": 2, "mlp_dim": 32,
                       "num_layers": 1},
    "word_lstm": {"embed_dim": 8, "hidden_size": 16},
}
TITLES = {
    "transformer_lm": "Transformer LM (pfl-research Stack Overflow config)",
    "word_lstm": "Word LSTM (Reddi et al. 2021 Stack Overflow)",
}
PAD_ID = 0
# The command-line flags, once define_flags() ran: name -> FlagHolder.
_FLAGS: dict[str, flags.FlagHolder] = {}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The synthetic next-word workload's shapes and FedAvg settings."""

  vocab_size: int = 10_004
  seq_len: int = 20
  num_clients: int = 100
  cohort_size: int = 10
  batch_size: int = 16
  local_steps: int = 4
  client_lr: float = 0.1
  seed: int = 0


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines the benchmark's flags (only when run as a program)."""
  _FLAGS.update(workloads.define_common_flags(flag_values, MODELS))
  defaults = Settings()
  define = lambda kind, name, default, text: kind(  # noqa: E731
      name, default, text, flag_values=flag_values)
  _FLAGS.update(
      strategies=define(flags.DEFINE_list, "strategies",
                        list(DEFAULT_STRATEGIES),
                        "Strategies to time; 'auto' is the one a run picks."),
      vocab_size=define(flags.DEFINE_integer, "vocab_size",
                        defaults.vocab_size, "Token ids (words + 4)."),
      seq_len=define(flags.DEFINE_integer, "seq_len", defaults.seq_len,
                     "Sequence length T."),
      num_clients=define(flags.DEFINE_integer, "num_clients",
                         defaults.num_clients, "Clients in the population."),
      cohort_size=define(flags.DEFINE_integer, "cohort_size",
                         defaults.cohort_size, "Clients per round."),
      batch_size=define(flags.DEFINE_integer, "batch_size",
                        defaults.batch_size, "Sequences per local step."),
      local_steps=define(flags.DEFINE_integer, "local_steps",
                         defaults.local_steps,
                         "Local steps (each client holds exactly this many "
                         "batches and trains one epoch)."),
      client_lr=define(flags.DEFINE_float, "client_lr", defaults.client_lr,
                       "Client SGD learning rate."))


def synthetic_store(settings: Settings) -> ClientStore:
  """Every client: ``batch_size * local_steps`` sequences of seeded random
  ids in ``1..V-1`` (``x`` and ``y`` = the same sequence shifted by one)."""
  s = settings
  per_client = s.batch_size * s.local_steps
  rng = np.random.default_rng(s.seed)
  tokens = rng.integers(1, s.vocab_size, (s.num_clients * per_client,
                                          s.seq_len + 1), dtype=np.int32)
  return ClientStore(np.arange(s.num_clients).astype(str),
                     np.arange(s.num_clients + 1) * per_client,
                     {"x": tokens[:, :-1], "y": tokens[:, 1:]})


def build_workload(name: str, settings: Settings,
                   quick: bool = False) -> Workload:
  """The benchmark workload of model ``name`` (``quick``: narrow model)."""
  if name not in MODELS:
    raise ValueError(f"unknown workload {name!r}; choose from {MODELS}.")
  s = settings
  return Workload(
      name, TITLES[name] + (" (quick: narrow)" if quick else ""),
      f"seeded random token ids 1..{s.vocab_size - 1}, {s.num_clients} "
      f"clients x {s.batch_size * s.local_steps} sequences of "
      f"{s.seq_len} (timing only: speed does not depend on the words)",
      synthetic_store(s), name, dict(QUICK_KWARGS[name]) if quick else {},
      (s.seq_len,), s.vocab_size, s.cohort_size, s.batch_size, 1, s.client_lr,
      5, MODEL_FAMILIES.get(name, "dense"), max_steps=s.local_steps)


def plan(labels: Sequence[str], family: str
         ) -> list[tuple[str, Strategy]]:
  """``[(label, Strategy)]``; ``"auto"`` is labelled with what it resolves
  to, and a strategy equal to an earlier one is dropped."""
  planned: list[tuple[str, Strategy]] = []
  for label in labels:
    strategy = parse_strategy(label, family)
    if any(strategy == other for _, other in planned):
      continue
    shown = f"auto = {strategy.label}" if label == "auto" else strategy.label
    planned.append((shown, strategy))
  return planned


def target_tokens(cohort, pad_id: int = PAD_ID) -> int:
  """Real (unmasked) non-pad target tokens of a cohort."""
  per_example = (np.asarray(cohort.features["y"]) != pad_id).sum(-1)
  return int((per_example * np.asarray(cohort.example_mask)).sum())


def bench_model(w: Workload, labels: Sequence[str], num_rounds: int,
                full_warmup: bool = False, log=print) -> dict[str, Any]:
  """Times ``w``'s rounds under each strategy; the report's entry."""
  rounds = list(range(num_rounds))
  cohorts = [w.cohort(r) for r in rounds]
  shapes = [c.padded_shape for c in cohorts]
  warmup = rounds if full_warmup else [shapes.index(s)
                                       for s in dict.fromkeys(shapes)]
  tokens = [target_tokens(c) for c in cohorts]
  real_steps = [int(c.num_steps.sum()) for c in cohorts]
  model = w.make_model()
  num_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(
      jax.eval_shape(model.init, jax.random.key(0))))
  auto = parse_strategy("auto", w.family)
  entry = {
      "title": w.title, "data": w.data_note, "model": w.model_name,
      "model_kwargs": w.model_kwargs, "num_params": num_params,
      "family": w.family, "auto_strategy": auto.label,
      "settings": {"vocab_size": w.num_classes,
                   "seq_len": w.input_shape[0],
                   "cohort_size": w.cohort_size,
                   "batch_size": w.batch_size, "local_steps": w.max_steps,
                   "client_lr": w.client_lr, "timed_rounds": rounds,
                   "warmup_rounds": warmup},
      "cohorts": [{"round": r, "padded_shape": list(s), "real_steps": n,
                   "target_tokens": t}
                  for r, s, n, t in zip(rounds, shapes, real_steps, tokens)],
      "target_tokens_per_round": float(np.median(tokens)),
      "load_average_start": list(os.getloadavg())}
  log(f"[{w.name}] {num_params:,} parameters, shapes {sorted(set(shapes))}, "
      f"{tokens[0]} target tokens a round, auto = {auto.label}")
  ideal = strategies_lib.measure_ideal(w, cohorts)
  entry["ideal"] = ideal
  entry["results"], reference = [], None
  for label, strategy in plan(labels, w.family):
    timing, params = strategies_lib.time_strategy(w, strategy, rounds, warmup)
    row = {"strategy": label, **timing}
    if reference is None:
      reference, row["reference"] = params, True
    row["max_abs_param_diff_vs_reference"] = workloads.max_abs_diff(
        params, reference)
    entry["results"].append(row)
    _finish(entry)
    log(f"[{w.name}] {label}: {row['median_round_s']:.3f} s/round, "
        f"{row['tokens_per_s']:,.0f} tokens/s, ratio to ideal "
        f"{row['ratio_to_ideal']:.2f}")
  # Measured again after the strategies; the less disturbed (smaller) wins.
  again = strategies_lib.measure_ideal(w, cohorts)
  measurements = [ideal["ideal_s_per_round"], again["ideal_s_per_round"]]
  if again["ideal_s_per_round"] < ideal["ideal_s_per_round"]:
    entry["ideal"] = again
  entry["ideal"]["measurements_s"] = measurements
  _finish(entry)
  entry["load_average_end"] = list(os.getloadavg())
  return entry


def _finish(entry: dict[str, Any]) -> None:
  """Tokens per second and ratios to the current ideal (in place)."""
  tokens = entry["target_tokens_per_round"]
  ideal = entry["ideal"]
  ideal["tokens_per_s"] = tokens / ideal["ideal_s_per_round"]
  for row in entry["results"]:
    row["tokens_per_s"] = tokens / row["median_round_s"]
    row["round_fn_tokens_per_s"] = tokens / row["median_round_fn_s"]
    row["ratio_to_ideal"] = row["median_round_s"] / ideal["ideal_s_per_round"]
    row["round_fn_ratio_to_ideal"] = (row["median_round_fn_s"] /
                                      ideal["ideal_s_per_round"])
  if entry["results"]:
    best = min(entry["results"], key=lambda r: r["median_round_s"])
    entry["fastest"] = best["strategy"]


def _f(x: float, digits: int = 3) -> str:
  return f"{x:.{digits}g}" if x < 1e-2 else f"{x:.{digits}f}"


def render_markdown(report: dict[str, Any]) -> str:
  """The report as one table per model plus a reading."""
  m = report["machine"]
  lines = [f"# Language-model rounds ({m['backend']}, {m['device_kind']})",
           "", f"`{report['command']}` ({report['date']}); {m['cpu_model']}, "
           f"{m['cpu_cores']} cores; jax {m['jax']}, flax {m['flax']}, optax "
           f"{m['optax']}." + (" **Quick mode (narrow models; not a "
                               "measurement).**" if report["quick"] else ""),
           ""]
  reading = []
  for e in report["workloads"].values():
    s, i = e["settings"], e["ideal"]
    lines += [
        f"## {e['title']}", "",
        f"{e['num_params']:,} parameters (`{e['model']}`"
        + (f", {e['model_kwargs']}" if e["model_kwargs"] else "") + "). "
        f"Data: {e['data']}. Vocabulary {s['vocab_size']}, sequence length "
        f"{s['seq_len']}, cohort {s['cohort_size']}, batch "
        f"{s['batch_size']}, {s['local_steps']} local steps, client lr "
        f"{s['client_lr']}; padded [C, S, B] "
        f"{sorted({tuple(c['padded_shape']) for c in e['cohorts']})}; "
        f"{e['target_tokens_per_round']:,.0f} target tokens a round; timed "
        f"rounds {s['timed_rounds']}. A run picks **{e['auto_strategy']}** "
        f"(family `{e['family']}`).", "",
        "| strategy | compile s | median s/round | round_fn-only s | tokens/s "
        "| ratio to ideal | round_fn ratio | max abs diff vs ref |",
        "|---|---|---|---|---|---|---|---|"]
    for r in e["results"]:
      lines.append(
          f"| {r['strategy']} | {r['compile_s']:.1f} | "
          f"{_f(r['median_round_s'])} | {_f(r['median_round_fn_s'])} | "
          f"{r['tokens_per_s']:,.0f} | {r['ratio_to_ideal']:.2f} | "
          f"{r['round_fn_ratio_to_ideal']:.2f} | "
          f"{r['max_abs_param_diff_vs_reference']:.1e} |")
    lines += ["", f"Ideal (bare jitted SGD steps): serial "
              f"{_f(i['serial_step_s'], 4)} s/step = "
              f"{_f(i['serial_s_per_round'])} s/round; packed (vmap over "
              f"{s['cohort_size']}) {_f(i['packed_step_s'], 4)} s/step = "
              f"{_f(i['packed_s_per_round'])} s/round; **ideal "
              f"{_f(i['ideal_s_per_round'])} s/round ({i['kind']}), "
              f"{i['tokens_per_s']:,.0f} tokens/s**.", ""]
    auto = next((r for r in e["results"] if r["strategy"].startswith("auto")),
                None)
    if auto is not None:
      reading.append(
          f"{e['model']}: a run's strategy ({e['auto_strategy']}) trains "
          f"{auto['tokens_per_s']:,.0f} target tokens/s, "
          f"{auto['ratio_to_ideal']:.2f}x the {i['kind']} ideal's time; "
          f"fastest here: {e['fastest']}.")
  reading.append(
      f"Machine: {m['cpu_cores']} cores ({m['cpu_model']}), backend "
      f"{m['backend']}; load averages before/after each model are in the "
      "JSON (other processes inflate absolute times, not the ratios of "
      "strategies timed side by side).")
  return "\n".join(lines + ["## Reading", "", " ".join(reading), ""])


def run_bench(names: Sequence[str], labels: Sequence[str], rounds: int,
              settings: Settings, quick: bool = False,
              full_warmup: bool = False, command: str = "",
              out: str | None = None, log=print) -> dict[str, Any]:
  """Runs the benchmark; returns the report (rewritten to ``<out>.{json,md}``
  after every model when ``out`` is given)."""
  report = {"machine": report_lib.machine_info(), "command": command,
            "quick": quick,
            "date": datetime.datetime.now().astimezone().isoformat(
                timespec="seconds"),
            "strategies": list(labels),
            "settings": dataclasses.asdict(settings), "workloads": {}}
  start = time.perf_counter()
  for name in names:
    entry = bench_model(build_workload(name, settings, quick), labels, rounds,
                        full_warmup=full_warmup, log=log)
    report["workloads"][name] = entry
    report["total_seconds"] = time.perf_counter() - start
    if out:
      report_lib.write_outputs(report, out, render_markdown)
  return report


def main(argv: Sequence[str]) -> None:
  """Command-line entry: the benchmark the flags describe."""
  cli.reject_extra_args(argv)
  value = {name: holder.value for name, holder in _FLAGS.items()}
  unknown = sorted(set(value["workloads"]) - set(MODELS))
  if unknown:
    cli.fail(f"unknown --workloads {unknown}; choose from {list(MODELS)}")
  settings = Settings(
      vocab_size=value["vocab_size"], seq_len=value["seq_len"],
      num_clients=value["num_clients"], cohort_size=value["cohort_size"],
      batch_size=value["batch_size"], local_steps=value["local_steps"],
      client_lr=value["client_lr"])
  if settings.cohort_size > settings.num_clients:
    cli.fail(f"--cohort_size={settings.cohort_size} exceeds --num_clients="
             f"{settings.num_clients}")
  out = value["out"] or os.path.join(
      "experiments", "results", f"language_models_{jax.default_backend()}")
  command = ("python -m experiments.bench.language_models "
             + " ".join(sys.argv[1:])).strip()
  try:
    run_bench(value["workloads"], value["strategies"], value["rounds"],
              settings, quick=value["quick"],
              full_warmup=value["full_warmup"], command=command, out=out)
  except ValueError as e:  # a bad strategy label or model option
    cli.fail(str(e))
  print(f"wrote {out}.json and {out}.md")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=cli.parse_flags_or_exit())
