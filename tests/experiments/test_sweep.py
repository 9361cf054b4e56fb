"""experiments.sweep: spec parsing, ranked tables, resume, failures."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import synthetic_logreg_fedavg
from experiments import sweep_spec
from experiments import sweep_summary

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


def _resolve(spec: str, read_text=None, fixed=()):
  config = synthetic_logreg_fedavg.get_config("tiny")
  return sweep_spec.resolve_members(
      sweep_spec.parse_spec(spec, read_text), config, fixed)


def _summary(workdir, slug):
  with open(os.path.join(workdir, slug, "summary.json")) as f:
    return json.load(f)


def _table(workdir):
  with open(os.path.join(workdir, "sweep_summary.csv")) as f:
    return list(csv.DictReader(f))


# --- parsing and validation (in process) -----------------------------------


def test_grid_is_the_cartesian_product_typed_by_the_config():
  members = _resolve("client.learning_rate=1,0.3 data.iid=true,False "
                     "model.name=1e3 num_rounds=5")
  assert [m.overrides for m in members] == [
      {"client.learning_rate": lr, "data.iid": iid, "model.name": "1e3",
       "num_rounds": 5}
      for lr in (1.0, 0.3) for iid in (True, False)]
  first = members[0].overrides
  assert type(first["client.learning_rate"]) is float
  assert type(first["num_rounds"]) is int and type(first["data.iid"]) is bool
  assert members[0].slug == ("client.learning_rate=1,data.iid=true,"
                             "model.name=1e3,num_rounds=5")
  assert len({m.slug for m in members}) == 4


def test_quotes_keep_commas_and_spaces_in_one_string():
  members = _resolve("model.name='a, b',\"c d\",e seed=0")
  assert [m.overrides["model.name"] for m in members] == ["a, b", "c d", "e"]
  assert members[0].slug == "model.name=a__b,seed=0"  # sanitised
  assert sweep_spec.parse_value(sweep_spec.RawValue("1", quoted=True)) == "1"
  assert sweep_spec.parse_value(sweep_spec.RawValue("1")) == 1
  assert sweep_spec.parse_value(sweep_spec.RawValue("2.5e-3")) == 0.0025
  assert sweep_spec.parse_value(sweep_spec.RawValue("TRUE")) is True
  assert sweep_spec.parse_value(sweep_spec.RawValue("sgd")) == "sgd"


def test_at_file_grid_and_explicit_list():
  files = {
      "grid.txt": "# a grid over two lines\nclient.learning_rate=0.1,0.2\n\n"
                  "seed=0,1,2\n",
      "list.txt": "# one member per line\nclient.learning_rate=0.1 seed=3\n"
                  "client.optimizer=adam\n  seed=4  \n",
  }

  def read_text(path):
    if path not in files:
      raise FileNotFoundError(path)
    return files[path]

  grid = _resolve("@grid.txt", read_text)
  assert [tuple(m.overrides.values()) for m in grid] == [
      (lr, seed) for lr in (0.1, 0.2) for seed in (0, 1, 2)]
  parsed = sweep_spec.parse_spec("@list.txt", read_text)
  assert parsed.kind == "list" and parsed.source == "list.txt"
  listed = _resolve("@list.txt", read_text)
  assert [m.overrides for m in listed] == [
      {"client.learning_rate": 0.1, "seed": 3},
      {"client.optimizer": "adam"}, {"seed": 4}]
  with pytest.raises(sweep_spec.SpecError, match="cannot read"):
    _resolve("@missing.txt", read_text)


def test_unknown_key_names_the_closest_valid_keys():
  with pytest.raises(sweep_spec.SpecError) as error:
    _resolve("client.learning_rat=0.1")
  # The closest key comes first; other near matches may follow.
  assert str(error.value).startswith(
      "unknown config key 'client.learning_rat' in --sweep; did you mean "
      "client.learning_rate, ")
  # Nothing close: the keys of the same section, else where to list them.
  with pytest.raises(sweep_spec.SpecError,
                     match=r"'client\.qqqqqqqqqqqq'.*mean client\.batch_size"):
    _resolve("client.qqqqqqqqqqqq=1")
  with pytest.raises(sweep_spec.SpecError, match="'qqqq'.*--helpfull"):
    _resolve("qqqq=1")


@pytest.mark.parametrize("spec, message", [
    ("privacy=1", "is a config section"),
    ("num_rounds=2.5", "num_rounds is a int"),
    ("data.iid=maybe", "data.iid is a bool"),
    ("seed=1,1", "appears more than once"),
    ("seed=1 seed=2", "more than once in the grid"),
    ("seed=1, 2", "empty value"),
    ("model.name='abc", "unterminated"),
    ("", "empty"),
])
def test_bad_specs_are_refused(spec, message):
  with pytest.raises(sweep_spec.SpecError, match=message):
    _resolve(spec)


def test_a_key_fixed_on_the_command_line_cannot_be_swept():
  with pytest.raises(sweep_spec.SpecError, match="both swept and set"):
    _resolve("seed=0,1", fixed=["seed"])


def test_long_slugs_are_cut_and_stay_distinct():
  names = [f"{'x' * 200}{i}" for i in range(2)]
  members = _resolve("model.name=" + ",".join(names))
  slugs = [m.slug for m in members]
  assert all(len(s) == sweep_spec.MAX_SLUG_CHARS for s in slugs)
  assert slugs[0] != slugs[1]


def test_rank_rows_orders_and_leaves_missing_values_last():
  rows = [{"member": "a", "acc": 0.5}, {"member": "b", "acc": None},
          {"member": "c", "acc": 0.9}, {"member": "d", "acc": 0.5},
          {"member": "e", "acc": float("nan")}]
  best_first = sweep_summary.rank_rows(rows, "acc", "max")
  assert [(r["rank"], r["member"]) for r in best_first] == [
      (1, "c"), (2, "a"), (3, "d"), (None, "b"), (None, "e")]
  worst_first = sweep_summary.rank_rows(rows, "acc", "min")
  assert [r["member"] for r in worst_first][:3] == ["a", "d", "c"]


# --- the command line ---------------------------------------------------


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


@pytest.fixture(scope="module")
def parallel_sweep(tmp_path_factory):
  """The same two members plus a failing one, as a list, two at a time."""
  folder = tmp_path_factory.mktemp("parallel")
  spec_file = folder / "members.txt"
  spec_file.write_text(
      "# the grid's two members, and one whose config cannot be built\n"
      "client.learning_rate=0.01 client.optimizer=sgd\n"
      f"client.learning_rate=0.3 client.optimizer={BAD_OPTIMIZER}\n"
      "client.learning_rate=0.3 client.optimizer=sgd\n")
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
