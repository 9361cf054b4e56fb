"""Results of a sweep (experiments/sweep.py): member status, ranked tables.

Reads each member's ``summary.json``, ``metrics.jsonl`` and ``member.json``
(what the sweep records about its process) and writes
``sweep_summary.csv`` / ``sweep_summary.md``: one row per member, best first.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import sys
from typing import Any, Sequence

MEMBER_FILE = "member.json"
DIVERGED_EXIT_CODE = 3  # experiments.run's code for a diverged run
COLUMNS = ("status", "rounds", "final_eval_accuracy", "final_eval_loss",
           "best_eval_accuracy", "best_eval_round", "epsilon", "seconds",
           "wall_seconds")


def read_json(path: str) -> Any:
  """The JSON in ``path``, or None if it does not exist."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` to ``path`` atomically (temp file, then rename)."""
  with open(f"{path}.tmp", "w") as f:
    json.dump(obj, f, indent=2)
    f.write("\n")
  os.replace(f"{path}.tmp", path)


def is_number(value: Any) -> bool:
  """Whether ``value`` is a finite int or float (bools and NaN are not)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool) and
          math.isfinite(value))


def read_metrics(member_dir: str) -> list[dict[str, Any]]:
  """``metrics.jsonl``'s records; a torn last line (a killed run) is dropped."""
  path = os.path.join(member_dir, "metrics.jsonl")
  records = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          pass
  return records


def member_status(member_dir: str, sweep_active: bool = False) -> str:
  """done | failed | diverged | running | interrupted | pending."""
  if os.path.exists(os.path.join(member_dir, "summary.json")):
    return "done"
  info = read_json(os.path.join(member_dir, MEMBER_FILE)) or {}
  code = info.get("exit_code")
  if code is not None:
    return "diverged" if code == DIVERGED_EXIT_CODE else "failed"
  if info or os.path.exists(os.path.join(member_dir, "metrics.jsonl")):
    return "running" if sweep_active else "interrupted"
  return "pending"


def member_row(workdir: str, member: dict[str, Any], rank_by: str,
               sweep_active: bool = False) -> dict[str, Any]:
  """One table row: the member's overrides, status and results.

  ``best_eval_accuracy`` / ``best_eval_round`` come from ``metrics.jsonl``
  (the first round reaching the maximum); the column ``rank_by`` is added if
  it is none of the others: ``summary.json``'s value, else the last value the
  member's ``metrics.jsonl`` records for it.
  """
  member_dir = os.path.join(workdir, member["slug"])
  summary = read_json(os.path.join(member_dir, "summary.json")) or {}
  info = read_json(os.path.join(member_dir, MEMBER_FILE)) or {}
  records = read_metrics(member_dir)
  evals = [(r["eval_accuracy"], r["round"]) for r in records
           if is_number(r.get("eval_accuracy"))]
  best = max(evals, key=lambda pair: pair[0]) if evals else (None, None)
  epsilons = [r["epsilon"] for r in records if is_number(r.get("epsilon"))]
  row = {"member": member["slug"], **member["overrides"],
         "status": member_status(member_dir, sweep_active),
         "rounds": summary.get("rounds",
                               records[-1].get("round") if records else None),
         "final_eval_accuracy": summary.get("final_eval_accuracy"),
         "final_eval_loss": summary.get("final_eval_loss"),
         "best_eval_accuracy": best[0], "best_eval_round": best[1],
         "epsilon": summary.get("epsilon", epsilons[-1] if epsilons else None),
         "seconds": summary.get("seconds"),
         "wall_seconds": info.get("wall_seconds")}
  if rank_by not in row:
    values = [r[rank_by] for r in records if rank_by in r]
    row[rank_by] = summary.get(rank_by, values[-1] if values else None)
  return row


def rank_rows(rows: Sequence[dict[str, Any]], rank_by: str,
              rank_mode: str) -> list[dict[str, Any]]:
  """Rows best first by ``rank_by`` (``max``/``min``), with a ``rank`` (1..).

  Rows without a finite number there come last, unranked; ties keep the
  members' order.
  """
  scored = [row for row in rows if is_number(row.get(rank_by))]
  scored.sort(key=lambda row: row[rank_by], reverse=rank_mode == "max")
  rest = [row for row in rows if not is_number(row.get(rank_by))]
  return ([{"rank": i, **row} for i, row in enumerate(scored, 1)] +
          [{"rank": None, **row} for row in rest])


def _text(value: Any) -> str:
  """A markdown table cell: 4 significant digits for floats, '' for None."""
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}"
  return str(value).replace("|", "\\|")


def write_summary(workdir: str, record: dict[str, Any], rank_by: str,
                  rank_mode: str, sweep_active: bool = False) -> list[dict]:
  """Writes ``sweep_summary.csv`` and ``.md`` in ``workdir``; returns the rows.

  One row per member of ``record`` (best first, see :func:`rank_rows`): its
  swept values, status, rounds, final and best eval accuracy, epsilon (DP),
  seconds of training and of the whole process.
  """
  rows = rank_rows([member_row(workdir, m, rank_by, sweep_active)
                    for m in record["members"]], rank_by, rank_mode)
  keys = list(dict.fromkeys(key for member in record["members"]
                            for key in member["overrides"]))
  columns = ["rank", "member", *keys, *COLUMNS]
  if rank_by not in columns:
    columns.append(rank_by)
  if (any(row["status"] == "done" for row in rows) and
      not any(is_number(row.get(rank_by)) for row in rows)):
    done_dir = os.path.join(workdir, next(
        row["member"] for row in rows if row["status"] == "done"))
    known = (set(columns) | set(read_json(
        os.path.join(done_dir, "summary.json"))) | set(
            (read_metrics(done_dir) or [{}])[-1])) - {rank_by}
    close = difflib.get_close_matches(rank_by, sorted(known), n=3)
    print(f"sweep: warning: no member has a number for --rank_by={rank_by}"
          + (f" (did you mean {', '.join(close)}?)" if close else ""),
          file=sys.stderr)
  with open(os.path.join(workdir, "sweep_summary.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({k: ("" if row.get(k) is None else row[k])
                      for k in columns} for row in rows)
  shown = [c for c in columns if c != "epsilon" or
           any(row.get("epsilon") is not None for row in rows)]
  counts = {}
  for row in rows:
    counts[row["status"]] = counts.get(row["status"], 0) + 1
  lines = [f"# Sweep: {record['config']}", "",
           f"Command: `{record['command']}`", "",
           f"Ranked by `{rank_by}` ({rank_mode}; members without it last). "
           f"{len(rows)} members: "
           + ", ".join(f"{n} {status}" for status, n in counts.items()) + ".",
           "", "| " + " | ".join(shown) + " |",
           "|" + "---|" * len(shown)]
  lines += ["| " + " | ".join(_text(row.get(c)) for c in shown) + " |"
            for row in rows]
  with open(os.path.join(workdir, "sweep_summary.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return rows


def report(workdir: str, rows: Sequence[dict[str, Any]], rank_by: str) -> None:
  """Prints the one-line JSON result: counts, the best member, the tables."""
  counts = {status: sum(row["status"] == status for row in rows)
            for status in dict.fromkeys(row["status"] for row in rows)}
  best = rows[0] if rows and rows[0]["rank"] == 1 else None
  print(json.dumps({"workdir": workdir, "members": len(rows), **counts,
                    "best": best and best["member"],
                    rank_by: best and best.get(rank_by),
                    "table": os.path.join(workdir, "sweep_summary.md")}))
