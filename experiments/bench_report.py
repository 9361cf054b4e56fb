"""Rendering and writing benchmark reports (experiments/bench.py)."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import jax
import optax


def machine_info() -> dict[str, Any]:
  """CPU, devices and library versions."""
  import flax, jaxlib  # pylint: disable=g-import-not-at-top,multiple-imports
  with open("/proc/cpuinfo") as f:
    cpu = next((line.split(":", 1)[1].strip() for line in f
                if line.startswith("model name")), "unknown")
  return {"cpu_model": cpu, "cpu_cores": os.cpu_count(),
          "backend": jax.default_backend(),
          "device_kind": jax.devices()[0].device_kind,
          "device_count": jax.device_count(), "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "python": sys.version.split()[0]}


def _f(x: float, digits: int = 3) -> str:
  return f"{x:.{digits}g}" if x < 1e-2 else f"{x:.{digits}f}"


def _reading(report) -> str:
  """One paragraph on the results, quoting ratios only."""
  parts = []
  for name, e in report["workloads"].items():
    rows = {r["strategy"]: r for r in e["results"] if not r["skipped"]}
    if "fastest" not in e:
      continue
    secs = lambda label: rows[label]["median_round_s"]  # noqa: E731
    text = (f"{name.upper()}: fastest is {e['fastest']} at "
            f"{e['fastest_ratio_to_ideal']:.2f}x the {e['ideal']['kind']} "
            f"ideal; padded cohorts hold {e['padding_factor']:.2f}x the real "
            "client-steps (a step no client of a group needs is skipped)")
    if "vmap+scan" in rows and "map+scan" in rows:
      text += (f"; map+scan takes {secs('map+scan') / secs('vmap+scan'):.2f}x"
               " the time of vmap+scan")
    alt = [label for label in rows if "[conv=" in label]
    if alt and "vmap+unroll" in rows:
      text += (f"; under vmap+unroll the default conv is "
               f"{secs(alt[0]) / secs('vmap+unroll'):.1f}x faster than "
               f"{alt[0].split('=')[1][:-1]}")
    share = 1 - rows[e["fastest"]]["median_round_fn_s"] / secs(e["fastest"])
    parts.append(text + f"; host-side work is {100 * share:.0f}% of the "
                 "fastest round.")
  m = report["machine"]
  return " ".join(parts) + (
      f" Machine: {m['cpu_cores']} cores ({m['cpu_model']}), backend "
      f"{m['backend']}; load averages before/after each workload are in the "
      "JSON (other processes inflate absolute times, not compile counts).")


def render_markdown(report) -> str:
  """The report as one markdown table per workload plus a reading."""
  m = report["machine"]
  lines = [f"# Round benchmark ({m['backend']}, {m['device_kind']})", "",
           f"`{report['command']}` ({report['date']}); {m['cpu_model']}, "
           f"{m['cpu_cores']} cores; jax {m['jax']}, flax {m['flax']}, optax "
           f"{m['optax']}." + (" **Quick mode.**" if report["quick"] else ""),
           ""]
  for e in report["workloads"].values():
    s, i = e["settings"], e["ideal"]
    lines += [
        f"## {e['title']}", "",
        f"Data: {e['data']}. Cohort {s['cohort_size']}, batch "
        f"{s['batch_size']}, {s['num_epochs']} epoch(s), client lr "
        f"{s['client_lr']}; timed rounds {s['timed_rounds']}, warm-up rounds "
        f"{s['warmup_rounds']}; padded [C, S, B] "
        f"{sorted({tuple(c['padded_shape']) for c in e['cohorts']})}; real "
        f"client-steps per round {[c['real_steps'] for c in e['cohorts']]} "
        f"(padding factor {e['padding_factor']:.2f}).", "",
        "| strategy | compile s | median s/round | round_fn-only s | ratio to "
        "ideal | round_fn ratio | max abs diff vs ref | notes |",
        "|---|---|---|---|---|---|---|---|"]
    for r in e["results"]:
      if r["skipped"]:
        lines.append(f"| {r['strategy']} | | | | | | | skipped: "
                     f"{r['skipped']} |")
        continue
      notes = ["reference"] if r.get("reference") else []
      if r["compiles_in_timed_pass"]:
        notes.append(f"{r['compiles_in_timed_pass']} compiles while timed")
      lines.append(
          f"| {r['strategy']} | {r['compile_s']:.1f} | "
          f"{_f(r['median_round_s'])} | {_f(r['median_round_fn_s'])} | "
          f"{r['ratio_to_ideal']:.2f} | {r['round_fn_ratio_to_ideal']:.2f} | "
          f"{r['max_abs_param_diff_vs_reference']:.1e} | {'; '.join(notes)} |")
    lines += ["", f"Ideal: serial {_f(i['serial_step_s'], 4)} s/step x real "
              f"steps = {_f(i['serial_s_per_round'])} s/round; packed (vmap "
              f"over {s['cohort_size']}) {_f(i['packed_step_s'], 4)} s/step = "
              f"{_f(i['packed_s_per_round'])} s/round; **ideal "
              f"{_f(i['ideal_s_per_round'])} s/round ({i['kind']})**. "
              f"Fastest: **{e.get('fastest', 'none')}**.", ""]
  return "\n".join(lines + ["## Reading", "", _reading(report), ""])


def write_outputs(report, out: str) -> tuple[str, str]:
  """Writes ``<out>.json`` and ``<out>.md``; returns their paths."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(report, f, indent=1)
  with open(out + ".md", "w") as f:
    f.write(render_markdown(report))
  return out + ".json", out + ".md"
