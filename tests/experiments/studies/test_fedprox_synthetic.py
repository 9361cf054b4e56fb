"""The FedProx Synthetic grid driver: a tiny grid end to end, its reports,
and reading finished members back instead of rerunning them."""

from __future__ import annotations

import json
import math
import os

from absl import flags

from experiments.studies import fedprox_synthetic
from fedjax_lab.training import loop


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
