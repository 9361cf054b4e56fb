r"""Scale benchmark: populations on disk, 1,000-client cohorts, processes.

  python -m experiments.bench.scale --data_root=DATA --work_root=RUNS \
      [--populations=10000,1000000] [--rounds=3] [--dp_seconds=150] \
      [--out=experiments/results/scale_cpu]

Runs ``configs/scale_image_cnn.py`` (FedAvg, the EMNIST CNN, cohort 1,000,
one epoch of batch 10) with ``python -m experiments.run`` on the simulated
image population written under ``DATA/image-<N>`` (written first with
``experiments.make_population`` when missing), each run in its own process
and starting with the population's files dropped from the page cache (cold
reads from disk):

* per population: seconds per round (rounds after the first, which
  compiles), the ratio to the bare-compute ideal (one jitted SGD step of the
  CNN on a batch of 10, times the round's real local steps), the host's
  share of the round (the time the loop waited for its cohort; the cohort is
  built in a background thread while the previous round trains) and the
  process's peak RSS (``ru_maxrss`` of the finished process);
* 1 vs 2 processes (``--num_processes=2``, gloo) on the first population:
  throughput ratio and the largest relative metric difference;
* pfl-research's private setting on the largest population (``:dp``: Poisson
  sampling of 400 expected clients, noise of a 5,000-client cohort, noise
  calibrated for 2,000 rounds at epsilon 2) for ``--dp_seconds``, with
  epsilon and seconds per round (the run releases its per-round times as
  labelled diagnostics, ``release_diagnostics``).

Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags

from fedjax_lab.training import workdir as workdir_lib

_DATA_ROOT = flags.DEFINE_string("data_root", None,
                                 "Folder of the populations (written if "
                                 "missing).")
_WORK_ROOT = flags.DEFINE_string("work_root", None,
                                 "Folder for the runs' workdirs.")
_POPULATIONS = flags.DEFINE_list("populations", ["10000", "1000000"],
                                 "Population sizes.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Rounds per run (the first "
                               "compiles and is not timed).")
_COHORT_SIZE = flags.DEFINE_integer(
    "cohort_size", 1000, "Clients per round of the FedAvg runs.")
_PROCESS_ROUNDS = flags.DEFINE_integer(
    "process_rounds", 3, "Rounds of the 1- vs 2-process comparison.")
_DP_SECONDS = flags.DEFINE_float("dp_seconds", 150.0,
                                 "Training seconds of the private run (0: "
                                 "skip it).")
_SECTIONS = flags.DEFINE_list(
    "sections", ["populations", "processes", "dp"],
    "Parts to run; the others are kept from an existing <out>.json.")
_REPORT_ONLY = flags.DEFINE_bool(
    "report_only", False, "Only rewrite <out>.md (and the derived numbers "
    "of <out>.json) from <out>.json.")
_OUT = flags.DEFINE_string("out", "experiments/results/scale_cpu",
                           "Results path without extension.")

CONFIG = "configs/scale_image_cnn.py"


def _run(command: Sequence[str]) -> dict[str, Any]:
  """Runs ``command``; its exit code, wall seconds and output."""
  start = time.perf_counter()
  child = subprocess.Popen(list(command), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  stdout, stderr = child.communicate()
  return {"returncode": child.returncode,
          "wall_s": time.perf_counter() - start,
          "stdout": stdout, "stderr": stderr}


def _run_measured(command: Sequence[str]) -> dict[str, Any]:
  """Runs ``command`` in a fresh process whose own peak RSS is reported:
  a tiny wrapper process runs it and prints ``ru_maxrss`` of its children
  (only that command), so earlier runs do not count."""
  wrapper = ("import resource, subprocess, sys, json\n"
             "code = subprocess.call(sys.argv[1:])\n"
             "usage = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
             "print(json.dumps({'code': code, 'max_rss_kb': usage.ru_maxrss}),"
             " file=sys.stderr)\n")
  result = _run([sys.executable, "-c", wrapper, *command])
  last = result["stderr"].strip().splitlines()[-1]
  measured = json.loads(last)
  result["peak_rss_bytes"] = measured["max_rss_kb"] * 1024
  result["returncode"] = measured["code"]
  return result


def _value(record: dict[str, Any], key: str) -> Any:
  """A record's ``key``, or its labelled diagnostic ``diagnostic/<key>``."""
  return record.get(key, record.get(f"diagnostic/{key}"))


def _drop_from_page_cache(path: str) -> None:
  """Asks the kernel to forget the population's cached pages, so every
  run starts from a cold cache (a VM's host may still cache them)."""
  for root, _, names in os.walk(path):
    for name in names:
      descriptor = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(descriptor)


def _redact(value: Any) -> Any:
  """``value`` with this machine's data and run folders written as
  ``DATA`` and ``RUNS`` (results name no machine paths)."""
  if isinstance(value, str):
    for root, name in ((_DATA_ROOT.value, "DATA"), (_WORK_ROOT.value, "RUNS")):
      if root:
        value = value.replace(os.path.abspath(root), name).replace(root, name)
    return value
  if isinstance(value, dict):
    return {k: _redact(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_redact(v) for v in value]
  return value


def _ensure_population(num_clients: int) -> tuple[str, dict[str, Any]]:
  path = os.path.join(_DATA_ROOT.value, f"image-{num_clients}")
  if os.path.isdir(path):
    return path, {"written_by_this_run": False}
  result = _run_measured([sys.executable, "-m", "experiments.make_population",
                          "--kind=image", f"--num_clients={num_clients}",
                          "--noprogress", f"--out={path}"])
  if result["returncode"] != 0:
    raise RuntimeError(result["stderr"][-3000:])
  return path, {"written_by_this_run": True, "seconds": result["wall_s"],
                "peak_rss_bytes": result["peak_rss_bytes"],
                "summary": json.loads(result["stdout"].strip().splitlines()[-1])}


def _ideal_step_seconds(path: str) -> float:
  """Median seconds of one jitted SGD step of the scale config's CNN on a
  batch of 10 examples of the population (the bare compute of a step)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from experiments.bench import workloads  # pylint: disable=g-import-not-at-top
  from experiments.lib import paths  # pylint: disable=g-import-not-at-top
  from fedjax_lab.training import setup  # pylint: disable=g-import-not-at-top
  paths.ensure_configs_importable()
  from configs import scale_image_cnn  # pylint: disable=g-import-not-at-top
  config = scale_image_cnn.get_config()
  config.data.path = path
  config.cohort_size = _COHORT_SIZE.value
  exp = setup.build_experiment(config)
  model = exp.model
  batch_size = config.client.batch_size
  store = exp.dataset.train
  batch = {name: np.asarray(column[:batch_size]).astype(
      np.float32 if np.issubdtype(column.dtype, np.floating) else column.dtype)
           for name, column in store.features.items()}
  batch = jax.device_put(batch)
  step = jax.jit(workloads.sgd_step_fn(model, config.client.learning_rate),
                 donate_argnums=0)
  params, rng = model.init(jax.random.key(0)), jax.random.key(1)
  params = jax.block_until_ready(step(params, batch, rng))
  samples = []
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(50):
      params = step(params, batch, rng)
    jax.block_until_ready(params)
    samples.append((time.perf_counter() - start) / 50)
  return statistics.median(samples)


def _real_steps(path: str, num_rounds: int) -> list[int]:
  """Real local steps of each round's cohort (the runner's sampler)."""
  from experiments.lib import paths  # pylint: disable=g-import-not-at-top
  from fedjax_lab.data import cohort as cohort_lib  # pylint: disable=g-import-not-at-top
  from fedjax_lab.training import setup  # pylint: disable=g-import-not-at-top
  paths.ensure_configs_importable()
  from configs import scale_image_cnn  # pylint: disable=g-import-not-at-top
  config = scale_image_cnn.get_config()
  config.data.path = path
  config.cohort_size = _COHORT_SIZE.value
  exp = setup.build_experiment(config)
  store = exp.dataset.train
  return [int(cohort_lib.client_steps(
      store.sizes_of(exp.sampler.sample(r)), config.client.batch_size,
      config.client.num_epochs).sum()) for r in range(num_rounds)]


def _fedavg_run(path: str, workdir: str, num_rounds: int,
                num_processes: int = 1) -> dict[str, Any]:
  command = [sys.executable, "-m", "experiments.run", f"--config={CONFIG}",
             f"--config.data.path={path}",
             f"--config.num_rounds={num_rounds}",
             f"--config.cohort_size={_COHORT_SIZE.value}",
             f"--workdir={workdir}", "--noprogress",
             f"--num_processes={num_processes}"]
  _drop_from_page_cache(path)
  result = _run_measured(command)
  if result["returncode"] != 0:
    raise RuntimeError(result["stderr"][-3000:])
  history = workdir_lib.read_history(workdir)
  timed = history[1:] or history
  round_s = statistics.median(r["seconds"] + r["host_wait_seconds"]
                              for r in timed)
  wait_s = statistics.median(r["host_wait_seconds"] for r in timed)
  return {"command": " ".join(["python"] + command[1:]),
          "wall_s": result["wall_s"], "peak_rss_bytes": result["peak_rss_bytes"],
          "s_per_round": round_s, "host_wait_s": wait_s,
          "host_prepare_s": statistics.median(
              r["host_prepare_seconds"] for r in timed),
          "host_share": wait_s / round_s,
          "rounds": [{k: r[k] for k in ("round", "seconds", "host_wait_seconds",
                                        "host_prepare_seconds", "train_loss",
                                        "local_steps_padded",
                                        "cohort_padded_size")}
                     for r in history],
          "summary": json.loads(result["stdout"].strip().splitlines()[-1])}


def _metric_diffs(one: list[dict], two: list[dict]) -> dict[str, float]:
  """The largest relative difference of each per-round metric between two
  runs' histories (timings and padding excluded)."""
  worst: dict[str, float] = {}
  for a, b in zip(one, two):
    for key, value in a.items():
      if key.endswith("seconds") or key == "cohort_padded_size":
        continue
      if isinstance(value, float):
        diff = abs(value - b[key]) / max(abs(value), 1e-12)
        worst[key] = max(worst.get(key, 0.0), diff)
  return worst


def _dp_run(path: str, workdir: str, seconds: float) -> dict[str, Any]:
  command = [sys.executable, "-m", "experiments.run", f"--config={CONFIG}:dp",
             f"--config.data.path={path}", f"--config.max_seconds={seconds}",
             "--config.privacy.release_diagnostics=True",
             f"--workdir={workdir}", "--noprogress"]
  _drop_from_page_cache(path)
  result = _run_measured(command)
  if result["returncode"] != 0:
    raise RuntimeError(result["stderr"][-3000:])
  history = workdir_lib.read_history(workdir)
  summary = json.loads(result["stdout"].strip().splitlines()[-1])
  return {"command": " ".join(["python"] + command[1:]),
          "wall_s": result["wall_s"], "peak_rss_bytes": result["peak_rss_bytes"],
          "noise_multiplier": history[0].get("noise_multiplier"),
          "summary": summary,
          "rounds": [{"round": r["round"], "epsilon": r.get("epsilon"),
                      "seconds": _value(r, "seconds"),
                      "host_wait_seconds": _value(r, "host_wait_seconds"),
                      "cohort_size": _value(r, "num_clients")}
                     for r in history]}


def _machine() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  return {"platform": platform.platform(), "processor": platform.processor(),
          "cpu_count": os.cpu_count(), "python": platform.python_version(),
          "jax": jax.__version__,
          "date": datetime.date.today().isoformat()}


def _shared_ideal(results: dict[str, Any]) -> None:
  """Every population runs the same model on the same batch shape, so the
  step's bare compute is one number: the fastest of the measurements (each
  is a median; the machine is shared, noise only slows a measurement down).
  Sets each population's ideal and ratio from it (in place)."""
  pops = results["populations"]
  if not pops:
    return
  step_s = min(p["ideal_step_s"] for p in pops)
  results["ideal_step_s"] = step_s
  for p in pops:
    steps = p["real_steps"][1:] or p["real_steps"]
    p["ideal_s_per_round"] = statistics.median(step_s * n for n in steps)
    p["ratio_to_ideal"] = p["run"]["s_per_round"] / p["ideal_s_per_round"]


def _markdown(results: dict[str, Any]) -> str:
  lines = ["# Scale: populations on disk, cohort 1,000, processes (CPU)", "",
           f"Machine: {results['machine']['cpu_count']} CPU cores, "
           f"{results['machine']['platform']}, jax "
           f"{results['machine']['jax']}; {results['machine']['date']}.", "",
           f"Command: `{results['command']}`" + "".join(
               f"; {name} rerun with `{text}`" for name, text in
               results.get("commands", {}).items()
               if text != results["command"]), "",
           "Workload: `configs/scale_image_cnn.py` (FedAvg, EMNIST CNN, "
           "cohort 1,000, 1 epoch of batch 10) on the simulated MNIST-derived "
           "image population (`experiments.make_population --kind=image`, "
           "10-50 examples per client, float16 pixels). Seconds per round: "
           "median over the rounds after the first (which compiles), the "
           "compiled round plus the time the loop waited for its cohort. "
           "Ideal: one jitted SGD step of the CNN on a batch of 10 times the "
           "round's real local steps (the fastest of the populations' "
           f"step measurements: {results.get('ideal_step_s', 0) * 1e3:.2f} "
           "ms). Peak RSS: the run's process.", "",
           "| population | s/round | ideal s/round | ratio to ideal | host "
           "wait s (share) | cohort build s (background) | peak RSS MB |",
           "|---:|---:|---:|---:|---:|---:|---:|"]
  for entry in results["populations"]:
    run = entry["run"]
    lines.append(
        f"| {entry['num_clients']:,} | {run['s_per_round']:.1f} | "
        f"{entry['ideal_s_per_round']:.1f} | {entry['ratio_to_ideal']:.2f} | "
        f"{run['host_wait_s']:.3f} ({100 * run['host_share']:.1f}%) | "
        f"{run['host_prepare_s']:.2f} | {run['peak_rss_bytes'] / 1e6:,.0f} |")
  pops = results["populations"]
  if len(pops) >= 2:
    ratio = pops[-1]["run"]["peak_rss_bytes"] / pops[0]["run"][
        "peak_rss_bytes"]
    lines += ["", f"Peak RSS at {pops[-1]['num_clients']:,} / at "
              f"{pops[0]['num_clients']:,}: {ratio:.2f}x."]
  processes = results.get("processes")
  if processes:
    lines += ["", "## 1 vs 2 processes (jax.distributed, gloo, this machine)",
              "", f"Population {processes['num_clients']:,}, "
              f"{processes['rounds']} rounds each.", "",
              "| processes | s/round | peak RSS MB (largest process) |",
              "|---:|---:|---:|"]
    for n in ("1", "2"):
      run = processes["runs"][n]
      lines.append(f"| {n} | {run['s_per_round']:.1f} | "
                   f"{run['peak_rss_bytes'] / 1e6:,.0f} |")
    diffs = processes["max_rel_metric_diff"]
    lines += ["", f"Throughput of 2 processes / 1 process: "
              f"{processes['throughput_ratio']:.2f}. Largest relative "
              "difference of each per-round metric (the sums over 1,000 "
              "clients run in another order): " + ", ".join(
                  f"{key} {value:.1e}" for key, value in sorted(
                      diffs.items())) + "."]
  dp = results.get("dp")
  if dp:
    lines += ["", "## Private run at the largest population (`:dp`)", "",
              f"`{dp['command']}`", "",
              f"Noise multiplier {dp['noise_multiplier']} (calibrated so "
              "2,000 rounds spend epsilon 2), Poisson sampling, 400 clients "
              "expected, noise of a 5,000-client cohort. Per-round seconds "
              "and cohort sizes are released diagnostics (not covered by "
              "epsilon).", "", "| round | epsilon | seconds | cohort |",
              "|---:|---:|---:|---:|"]
    for r in dp["rounds"]:
      lines.append(f"| {r['round']} | {r['epsilon']:.4f} | "
                   f"{r['seconds']:.1f} | {r['cohort_size']:.0f} |")
    lines.append(f"\nPeak RSS {dp['peak_rss_bytes'] / 1e6:,.0f} MB.")
  return "\n".join(lines) + "\n"


def main(argv: Sequence[str]) -> None:
  del argv
  if _REPORT_ONLY.value:
    with open(_OUT.value + ".json") as f:
      results = json.load(f)
    _shared_ideal(results)
    with open(_OUT.value + ".json", "w") as f:
      json.dump(results, f, indent=1)
    with open(_OUT.value + ".md", "w") as f:
      f.write(_markdown(results))
    print(_markdown(results))
    return
  if not (_DATA_ROOT.value and _WORK_ROOT.value):
    sys.exit("error: pass --data_root and --work_root.")
  os.makedirs(_WORK_ROOT.value, exist_ok=True)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  sections = set(_SECTIONS.value)
  command = ("python -m experiments.bench.scale "
             f"--populations={','.join(_POPULATIONS.value)} "
             f"--rounds={_ROUNDS.value} "
             f"--process_rounds={_PROCESS_ROUNDS.value} "
             + (f"--cohort_size={_COHORT_SIZE.value} "
                if _COHORT_SIZE.value != 1000 else "") +
             f"--dp_seconds={_DP_SECONDS.value} "
             "--data_root=DATA --work_root=RUNS")
  results: dict[str, Any] = {"populations": []}
  if os.path.exists(_OUT.value + ".json"):
    with open(_OUT.value + ".json") as f:
      results = json.load(f)
  results["machine"] = _machine()
  results.setdefault("commands", {})
  for section in sections:
    results["commands"][section] = (
        command + f" --sections={section}"
        if sections != {"populations", "processes", "dp"} else command)
  results["command"] = command

  def save():
    _shared_ideal(results)
    redacted = _redact(results)
    with open(_OUT.value + ".json", "w") as f:
      json.dump(redacted, f, indent=1)
    with open(_OUT.value + ".md", "w") as f:
      f.write(_markdown(redacted))

  paths_by_size = {}
  for size in [int(n) for n in _POPULATIONS.value]:
    path, written = _ensure_population(size)
    paths_by_size[size] = path
    if "populations" not in sections:
      continue
    if size == int(_POPULATIONS.value[0]):
      results["populations"] = []
    print(f"[{size}] population at {path}", flush=True)
    step_s = _ideal_step_seconds(path)
    steps = _real_steps(path, _ROUNDS.value)
    run = _fedavg_run(path, os.path.join(_WORK_ROOT.value,
                                         f"fedavg-{size}-{stamp}"),
                      _ROUNDS.value)
    ideal = statistics.median(step_s * s for s in steps[1:] or steps)
    results["populations"].append({
        "num_clients": size, "population": written,
        "ideal_step_s": step_s, "real_steps": steps,
        "ideal_s_per_round": ideal,
        "ratio_to_ideal": run["s_per_round"] / ideal, "run": run})
    print(f"[{size}] {run['s_per_round']:.1f} s/round, ideal {ideal:.1f}, "
          f"host share {run['host_share']:.3f}, peak RSS "
          f"{run['peak_rss_bytes'] / 1e6:.0f} MB", flush=True)
    save()

  if _PROCESS_ROUNDS.value and "processes" in sections:
    size = int(_POPULATIONS.value[0])
    runs = {}
    for n in (1, 2):
      runs[str(n)] = _fedavg_run(
          paths_by_size[size],
          os.path.join(_WORK_ROOT.value, f"procs{n}-{size}-{stamp}"),
          _PROCESS_ROUNDS.value, num_processes=n)
      print(f"[{n} processes] {runs[str(n)]['s_per_round']:.1f} s/round",
            flush=True)
    results["processes"] = {
        "num_clients": size, "rounds": _PROCESS_ROUNDS.value, "runs": runs,
        "throughput_ratio": runs["1"]["s_per_round"] /
                            runs["2"]["s_per_round"],
        "max_rel_metric_diff": _metric_diffs(*(
            workdir_lib.read_history(os.path.join(
                _WORK_ROOT.value, f"procs{n}-{size}-{stamp}"))
            for n in (1, 2)))}
    save()

  if _DP_SECONDS.value > 0 and "dp" in sections:
    size = max(paths_by_size)
    results["dp"] = _dp_run(paths_by_size[size],
                            os.path.join(_WORK_ROOT.value,
                                         f"dp-{size}-{stamp}"),
                            _DP_SECONDS.value)
    results["dp"]["num_clients"] = size
    save()
  print(_markdown(_redact(results)))


if __name__ == "__main__":
  app.run(main)
