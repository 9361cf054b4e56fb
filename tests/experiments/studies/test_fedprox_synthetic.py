"""The FedProx Synthetic grid driver: members, resume, report, bookkeeping."""

from __future__ import annotations

import json
import math
import os

from absl import flags

from experiments.studies import fedprox_synthetic
from fedjax_lab.training import loop


def _write_member(workdir, losses, accuracies, total_weights, summary):
  """A member folder by hand: evaluations every 5 rounds."""
  os.makedirs(workdir)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for i, weight in enumerate(total_weights):
      record = {"round": i + 1, "total_weight": weight, "straggler": 0.5}
      if (i + 1) % 5 == 0:
        record.update(train_eval_loss=losses[(i + 1) // 5 - 1],
                      eval_accuracy=accuracies[(i + 1) // 5 - 1])
      f.write(json.dumps(record) + "\n")
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f)


def test_member_record_and_summary_hand_computed(tmp_path):
  weights = [3.0, 0.0, 2.0, 0.0, 1.0, 4.0, 4.0, 4.0, 4.0, 0.0, 5.0, 5.0, 5.0,
             5.0, 5.0]
  _write_member(tmp_path / "a", [1.0, 1.3, 0.8], [0.5, 0.4, 0.7], weights,
                {"seconds": 2.0})
  _write_member(tmp_path / "b", [1.0, 0.9, 0.6], [0.5, 0.6, 0.9], weights,
                {"seconds": 2.0})
  a = fedprox_synthetic.member_record(str(tmp_path / "a"), {"seconds": 2.0})
  b = fedprox_synthetic.member_record(str(tmp_path / "b"), {"seconds": 2.0})
  assert a["curve"]["round"] == [5, 10, 15]
  assert a["final_train_loss"] == 0.8 and a["final_test_accuracy"] == 0.7
  assert math.isclose(a["max_loss_increase"], 0.3)
  assert a["loss_increases"] == 1 and a["rounds_without_update"] == 3
  assert b["max_loss_increase"] == 0.0 and b["loss_increases"] == 0
  assert not a["diverged"]
  members = [{"setting": "1_1", "stragglers": 0.5, "method": "fedavg",
              "seed": seed, **record} for seed, record in enumerate((a, b))]
  (row,) = fedprox_synthetic.summarize(members)
  assert math.isclose(row["train_loss_mean"], 0.7)
  assert math.isclose(row["train_loss_std"], math.sqrt(0.02))  # stdev, n-1
  assert math.isclose(row["test_accuracy_mean"], 0.8)
  assert math.isclose(row["max_loss_increase"], 0.3)
  # A diverged member counts as finished, with an infinite final loss.
  diverged = fedprox_synthetic.member_record(str(tmp_path / "a"),
                                             {"diverged": True})
  assert diverged["diverged"] and diverged["final_train_loss"] == math.inf


def test_tiny_grid_outputs_and_resume(tmp_path, monkeypatch, capsys):
  trained = []
  real_run = loop.run_experiment

  def counting_run(exp, workdir, **kwargs):
    trained.append(os.path.basename(workdir))
    return real_run(exp, workdir, **kwargs)

  monkeypatch.setattr(loop, "run_experiment", counting_run)
  out_dir = tmp_path / "out"
  argv = ["fedprox_synthetic", f"--out_dir={out_dir}", "--seeds=0",
          "--rounds=2", "--settings=1_1", "--stragglers=0,0.9",
          "--methods=fedavg,fedprox_mu0", "--eval_every=1"]

  def run_main():
    flag_values = flags.FlagValues()  # its own: other modules share names
    fedprox_synthetic.define_flags(flag_values)
    flag_values(argv)
    fedprox_synthetic.main(argv[:1])
    return json.loads(capsys.readouterr().out)

  first = run_main()
  assert first["members_run"] == 4 and len(trained) == 4
  base = out_dir / "fedprox_synthetic"
  report = json.loads((base.with_suffix(".json")).read_text())
  assert len(report["members"]) == 4
  assert {(r["stragglers"], r["method"]) for r in report["rows"]} == {
      (f, m) for f in (0.0, 0.9) for m in ("fedavg", "fedprox_mu0")}
  for member in report["members"]:
    workdir = out_dir / member["workdir"]
    assert (workdir / "metrics.jsonl").exists()
    assert (workdir / "summary.json").exists()
    assert not (workdir / loop.FINAL_STATE_FILE).exists()
    assert member["curve"]["round"] == [1, 2]
    assert all(math.isfinite(v) for v in member["curve"]["train_loss"])
    assert (member["mean_stragglers"] > 0) == (member["stragglers"] > 0)
  # Without stragglers FedAvg and FedProx mu=0 are one algorithm; with 90%
  # stragglers dropping or keeping their partial work changes the model.
  (same,) = [f for f in report["findings"]
             if f["claim"].startswith("Without stragglers")]
  assert same["holds"] is True
  assert same["detail"] == "(1,1) 0.000 vs 0.000: yes"
  curves = {(m["stragglers"], m["method"]): m["curve"]["train_loss"]
            for m in report["members"]}
  assert curves[(0.9, "fedavg")] != curves[(0.9, "fedprox_mu0")]
  table = base.with_suffix(".md").read_text()
  rows = [line for line in table.splitlines()
          if line.startswith("| Synthetic(1,1) |")]
  assert [row.split("|")[2].strip() for row in rows] == ["0%", "90%"] * 2
  assert "FedProx mu=0 loss" in table and "FedProx mu=1" not in table.split(
      "## Stability")[0]
  assert base.with_suffix(".png").stat().st_size > 0
  # A second call reads every finished member back instead of training it.
  mtime = os.path.getmtime(out_dir / report["members"][0]["workdir"] /
                           "summary.json")
  again = run_main()
  assert again["members_run"] == 0 and len(trained) == 4
  assert os.path.getmtime(out_dir / report["members"][0]["workdir"] /
                          "summary.json") == mtime
  assert json.loads(base.with_suffix(".json").read_text())["rows"] == (
      report["rows"])
