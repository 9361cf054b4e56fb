"""experiments.sweep's command line: ranked tables, resume, failures.

(Spec parsing: lib/test_sweep_spec.py; ranking: lib/test_sweep_summary.py.)
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
CONFIG = "configs/synthetic_logreg_fedavg.py:tiny"
GRID = "client.learning_rate=0.01,0.3 client.optimizer=sgd"
BAD_OPTIMIZER = "no_such_optimizer"
SLUGS = ["client.learning_rate=0.01,client.optimizer=sgd",
         "client.learning_rate=0.3,client.optimizer=sgd"]


def _sweep(workdir, *flags, spec: str | None = GRID,
           config: str | None = CONFIG):
  """Runs the sweep command line; returns the finished process."""
  args = [sys.executable, "-m", "experiments.sweep", f"--workdir={workdir}",
          "--quiet", *flags]
  if config is not None:
    args.append(f"--config={config}")
  if spec is not None:
    args.append(f"--sweep={spec}")
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True,
                        timeout=300)


def _summary(workdir, slug):
  with open(os.path.join(workdir, slug, "summary.json")) as f:
    return json.load(f)


def _table(workdir):
  with open(os.path.join(workdir, "sweep_summary.csv")) as f:
    return list(csv.DictReader(f))


def test_unknown_key_exits_2_before_anything_runs(tmp_path):
  result = _sweep(tmp_path / "w", spec="client.learning_rat=0.1,0.3")
  assert result.returncode == 2
  assert ("error: unknown config key 'client.learning_rat' in --sweep; did "
          "you mean client.learning_rate, ") in result.stderr
  assert "Traceback" not in result.stderr
  assert not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
  """A sequential 2x1 sweep of the tiny config, run once for this module."""
  workdir = tmp_path_factory.mktemp("sweep") / "w"
  result = _sweep(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, json.loads(result.stdout.strip().splitlines()[-1])


def test_sweep_runs_each_member_and_ranks_them(finished_sweep, tmp_path):
  workdir, report = finished_sweep
  record = json.loads((workdir / "sweep.json").read_text())
  assert [m["slug"] for m in record["members"]] == SLUGS
  assert record["spec"] == GRID and record["config"] == CONFIG
  accuracy = {s: _summary(workdir, s)["final_eval_accuracy"] for s in SLUGS}
  rows = _table(workdir)
  assert [r["member"] for r in rows] == sorted(SLUGS, key=accuracy.get,
                                               reverse=True)
  assert [r["rank"] for r in rows] == ["1", "2"]
  for row in rows:
    summary = _summary(workdir, row["member"])
    assert row["status"] == "done"
    assert int(row["rounds"]) == summary["rounds"] == 2
    assert float(row["final_eval_accuracy"]) == summary["final_eval_accuracy"]
    assert float(row["eval_accuracy"]) == summary["final_eval_accuracy"]
    assert float(row["best_eval_accuracy"]) >= summary["final_eval_accuracy"]
    assert row["client.learning_rate"] in ("0.01", "0.3")
  assert report["done"] == 2 and report["best"] == rows[0]["member"]
  markdown = (workdir / "sweep_summary.md").read_text()
  assert markdown.index(rows[0]["member"]) < markdown.index(rows[1]["member"])
  assert "epsilon" not in markdown  # no DP member
  # Re-ranking by another key and mode reads the members back, runs nothing.
  workdir = tmp_path / "w"
  shutil.copytree(finished_sweep[0], workdir)
  result = _sweep(workdir, "--summarize_only", "--rank_by=final_eval_loss",
                  "--rank_mode=min", spec=None, config=None)
  assert result.returncode == 0, result.stderr
  losses = {r["member"]: float(r["final_eval_loss"]) for r in _table(workdir)}
  assert list(losses.values()) == sorted(losses.values())
  assert losses == {s: _summary(workdir, s)["final_eval_loss"] for s in SLUGS}


def test_resume_reruns_only_the_interrupted_member(finished_sweep, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(finished_sweep[0], workdir)  # keeps the files' mtimes
  kept, redone = (workdir / s / "summary.json" for s in SLUGS)
  kept_mtime = os.path.getmtime(kept)
  os.remove(redone)  # as if killed before its first checkpoint
  shutil.rmtree(redone.parent / "checkpoints")
  result = _sweep(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.getmtime(kept) == kept_mtime
  assert redone.exists()
  aside = workdir / f"{SLUGS[1]}.interrupted-1"
  assert (aside / "metrics.jsonl").exists()
  assert not (aside / "summary.json").exists()
  assert (json.loads(redone.read_text())["final_eval_accuracy"] ==
          _summary(finished_sweep[0], SLUGS[1])["final_eval_accuracy"])
  assert {r["status"] for r in _table(workdir)} == {"done"}


def test_resume_continues_a_checkpointed_member_in_place(finished_sweep,
                                                        tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(finished_sweep[0], workdir)
  redone = workdir / SLUGS[1] / "summary.json"
  os.remove(redone)  # killed after its last checkpoint, before the summary
  result = _sweep(workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not list(workdir.glob("*.interrupted-*"))
  summary = json.loads(redone.read_text())
  assert summary["resumed_from_round"] == summary["rounds"]
  assert (summary["final_eval_accuracy"] ==
          _summary(finished_sweep[0], SLUGS[1])["final_eval_accuracy"])


def test_a_different_spec_is_refused_unless_forced(finished_sweep, tmp_path):
  workdir = tmp_path / "w"
  shutil.copytree(finished_sweep[0], workdir)
  result = _sweep(workdir, spec="client.learning_rate=0.01,1.0 "
                  "client.optimizer=sgd")
  assert result.returncode == 2
  assert "holds a different sweep (1 new and 1 dropped members" in result.stderr
  assert "--force_new_spec" in result.stderr
  # A subset of the finished members: replaces the record, runs nothing.
  mtime = os.path.getmtime(workdir / SLUGS[1] / "summary.json")
  result = _sweep(workdir, "--force_new_spec",
                  spec="client.learning_rate=0.3 client.optimizer=sgd")
  assert result.returncode == 0, result.stderr[-3000:]
  assert (workdir / "sweep.json.replaced-1").exists()
  assert [r["member"] for r in _table(workdir)] == [SLUGS[1]]
  assert os.path.getmtime(workdir / SLUGS[1] / "summary.json") == mtime
  # With only --workdir the recorded sweep is continued (nothing left).
  result = _sweep(workdir, spec=None, config=None)
  assert result.returncode == 0 and '"done": 1' in result.stdout


def _three_member_spec(folder):
  """A member list: the grid's two members, and one whose config cannot be
  built (an unknown optimizer)."""
  spec_file = folder / "members.txt"
  spec_file.write_text(
      "# the grid's two members, and one whose config cannot be built\n"
      "client.learning_rate=0.01 client.optimizer=sgd\n"
      f"client.learning_rate=0.3 client.optimizer={BAD_OPTIMIZER}\n"
      "client.learning_rate=0.3 client.optimizer=sgd\n")
  return spec_file


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory):
  """The same two members plus a failing one, as a list, two at a time."""
  folder = tmp_path_factory.mktemp("parallel")
  spec_file = _three_member_spec(folder)
  result = _sweep(folder / "w", "--parallel=2", spec=f"@{spec_file}")
  return folder / "w", result


def test_parallel_matches_sequential(finished_sweep, parallel_sweep):
  workdir, result = parallel_sweep
  assert result.returncode == 1, result.stderr[-3000:]  # the failing member
  for slug in SLUGS:
    parallel, sequential = (_summary(w, slug)
                            for w in (workdir, finished_sweep[0]))
    for key in ("final_eval_accuracy", "final_eval_loss", "rounds"):
      assert parallel[key] == pytest.approx(sequential[key], rel=1e-6), key
  accuracy = {s: _summary(finished_sweep[0], s)["final_eval_accuracy"]
              for s in SLUGS}
  assert [r["member"] for r in _table(workdir)][:2] == sorted(
      SLUGS, key=accuracy.get, reverse=True)


def test_a_failing_member_is_reported_and_the_others_finish(parallel_sweep):
  workdir, result = parallel_sweep
  bad = f"client.learning_rate=0.3,client.optimizer={BAD_OPTIMIZER}"
  assert result.returncode == 1
  assert f"{bad} FAILED (exit 2)" in result.stderr
  assert f"unknown optimizer '{BAD_OPTIMIZER}'" in result.stderr  # log tail
  assert f"1 member(s) failed: {bad}" in result.stderr
  rows = _table(workdir)
  assert [(r["rank"], r["status"]) for r in rows] == [
      ("1", "done"), ("2", "done"), ("", "failed")]
  assert rows[2]["member"] == bad and rows[2]["client.optimizer"] == (
      BAD_OPTIMIZER)
  assert BAD_OPTIMIZER in (workdir / bad / "log.txt").read_text()
  assert json.loads(result.stdout.strip().splitlines()[-1])["failed"] == 1


@pytest.fixture(scope="module")
def vectorized_sweep(tmp_path_factory):
  """The parallel sweep's three members with --vectorize (the two good ones
  are one program; the bad one is a group of its own that cannot build)."""
  folder = tmp_path_factory.mktemp("vectorized")
  spec_file = _three_member_spec(folder)
  result = _sweep(folder / "w", "--vectorize", spec=f"@{spec_file}")
  return folder / "w", result, spec_file


def test_vectorized_members_match_sequential_ones(finished_sweep,
                                                  vectorized_sweep):
  workdir, result, _ = vectorized_sweep
  assert result.returncode == 1, result.stderr[-3000:]  # the failing member
  for slug in SLUGS:
    together, sequential = (_summary(w, slug)
                            for w in (workdir, finished_sweep[0]))
    for key in ("final_eval_accuracy", "final_eval_loss", "rounds"):
      assert together[key] == pytest.approx(sequential[key], rel=1e-6), key
    info = json.loads((workdir / slug / "member.json").read_text())
    assert info["vectorized_group"] == SLUGS and info["exit_code"] == 0
    assert (workdir / slug / "checkpoints").is_dir()
  bad = f"client.learning_rate=0.3,client.optimizer={BAD_OPTIMIZER}"
  assert f"unknown optimizer '{BAD_OPTIMIZER}'" in (
      workdir / bad / "log.txt").read_text()
  assert [(r["status"]) for r in _table(workdir)] == [
      "done", "done", "failed"]


def test_a_rerun_vectorized_sweep_runs_only_what_is_left(vectorized_sweep):
  workdir, _, spec_file = vectorized_sweep
  shutil.rmtree(workdir / SLUGS[0])
  result = _sweep(workdir, "--vectorize", spec=f"@{spec_file}")
  assert result.returncode == 1  # the bad member fails again
  assert (workdir / SLUGS[0] / "summary.json").exists()
  info = json.loads((workdir / SLUGS[0] / "member.json").read_text())
  assert info["vectorized_group"] == [SLUGS[0]]  # trained alone this time


def test_vectorize_and_parallel_are_exclusive(tmp_path):
  result = _sweep(tmp_path / "w", "--vectorize", "--parallel=2")
  assert result.returncode == 2
  assert "leave out --parallel" in result.stderr
