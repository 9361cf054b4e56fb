"""experiments.bench.language_models at toy sizes: the files it writes, the
strategy a run would pick, tokens per second and the ratio to the ideal."""

import json
import os
import subprocess
import sys

import numpy as np

from experiments.bench import language_models
from fedjax_lab.engine.strategy import parse_strategy
from fedjax_lab.training.setup import MODEL_FAMILIES

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))


def test_toy_bench_writes_a_complete_report(tmp_path):
  out = tmp_path / "lm"
  command = [sys.executable, "-m", "experiments.bench.language_models",
             "--quick", "--vocab_size=24", "--seq_len=5", "--num_clients=6",
             "--cohort_size=3", "--batch_size=2", "--local_steps=2",
             "--rounds=2", "--strategies=auto", f"--out={out}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]

  report = json.loads((tmp_path / "lm.json").read_text())
  assert report["quick"] is True
  assert report["machine"]["backend"] == "cpu"
  assert set(report["workloads"]) == {"transformer_lm", "word_lstm"}
  for name, entry in report["workloads"].items():
    auto = parse_strategy("auto", MODEL_FAMILIES[name])
    assert entry["auto_strategy"] == auto.label
    assert entry["settings"]["vocab_size"] == 24
    # 3 clients x 2 steps x batch 2 x 5 targets, none of them padding.
    assert [c["target_tokens"] for c in entry["cohorts"]] == [60, 60]
    assert [c["padded_shape"] for c in entry["cohorts"]] == [[3, 2, 2]] * 2
    (row,) = entry["results"]
    assert row["strategy"] == f"auto = {auto.label}"
    assert row["compiles_in_timed_pass"] == 0
    assert len(row["round_s"]) == 2
    assert row["tokens_per_s"] == 60 / row["median_round_s"]
    assert row["ratio_to_ideal"] == (row["median_round_s"] /
                                     entry["ideal"]["ideal_s_per_round"])
    assert entry["ideal"]["tokens_per_s"] > 0
    assert entry["num_params"] > 0
  markdown = (tmp_path / "lm.md").read_text()
  assert "| strategy | compile s | median s/round |" in markdown
  assert "tokens/s" in markdown and "## Reading" in markdown
  assert "Quick mode" in markdown


def test_plan_names_auto_and_drops_duplicates():
  auto = parse_strategy("auto", "recurrent")
  planned = language_models.plan(
      ["auto", auto.label, "vmap+scan", "chunked5+scan"], "recurrent")
  labels = [label for label, _ in planned]
  assert labels[0] == f"auto = {auto.label}"
  assert auto.label not in labels[1:]  # the same strategy, timed once
  assert len(labels) == len(set(s for _, s in planned))


def test_synthetic_store_and_token_count():
  settings = language_models.Settings(vocab_size=12, seq_len=4, num_clients=5,
                                      cohort_size=2, batch_size=3,
                                      local_steps=2)
  store = language_models.synthetic_store(settings)
  assert store.num_clients == 5
  assert store.features["x"].shape == (5 * 6, 4)
  np.testing.assert_array_equal(store.features["x"][:, 1:],
                                store.features["y"][:, :-1])
  assert store.features["x"].min() >= 1 and store.features["y"].max() < 12
  workload = language_models.build_workload("word_lstm", settings, quick=True)
  cohort = workload.cohort(0)
  assert language_models.target_tokens(cohort) == 2 * 2 * 3 * 4
