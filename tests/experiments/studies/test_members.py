"""experiments.studies.members: run a member once, then read it back."""

import json
import os

import pytest

from configs import synthetic_logreg_fedavg
from experiments.studies import members
from fedjax_lab.training import loop


def _config():
  return synthetic_logreg_fedavg.get_config("tiny")


def test_runs_once_then_reads_back(tmp_path, monkeypatch):
  workdir = str(tmp_path / "m")
  first = members.run_or_read_back(_config(), workdir, keep_final_state=False,
                                   keep_checkpoints=False)
  assert first.ran and not first.diverged and first.summary["rounds"] == 2
  assert not os.path.exists(os.path.join(workdir, loop.FINAL_STATE_FILE))
  assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  monkeypatch.setattr(loop, "run_experiment", lambda *a, **k: 1 / 0)
  again = members.run_or_read_back(_config(), workdir)
  assert not again.ran
  assert again.summary["final_eval_accuracy"] == (
      first.summary["final_eval_accuracy"])


def test_an_interrupted_member_starts_again(tmp_path):
  workdir = tmp_path / "m"
  (workdir / "checkpoints" / "junk").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text('{"round": 1}\n')
  run = members.run_or_read_back(_config(), str(workdir))
  assert run.ran and run.summary["rounds"] == 2
  assert not (workdir / "checkpoints" / "junk").exists()


def _diverge(*args, **kwargs):
  raise loop.DivergedError("loss is nan at round 1")


@pytest.mark.parametrize("diverged_file, record, expected", [
    ("summary.json", None, {"diverged": True,
                            "error": "loss is nan at round 1"}),
    ("diverged.json", lambda m: {"message": m},
     {"message": "loss is nan at round 1"}),
])
def test_a_diverged_member_is_recorded_and_counts_as_finished(
    tmp_path, monkeypatch, diverged_file, record, expected):
  monkeypatch.setattr(loop, "run_experiment", _diverge)
  workdir = tmp_path / "m"
  options = {"diverged_record": record} if record else {}
  run = members.run_or_read_back(_config(), str(workdir),
                                 diverged_file=diverged_file, **options)
  assert run.ran and run.diverged and run.summary == expected
  assert json.loads((workdir / diverged_file).read_text()) == expected
  again = members.run_or_read_back(_config(), str(workdir),
                                   diverged_file=diverged_file, **options)
  assert not again.ran and again.diverged and again.summary == expected


def test_without_a_diverged_file_divergence_raises(tmp_path, monkeypatch):
  monkeypatch.setattr(loop, "run_experiment", _diverge)
  with pytest.raises(loop.DivergedError):
    members.run_or_read_back(_config(), str(tmp_path / "m"))
