"""``jaxinfra eplb`` and ``jaxinfra bench eplb``."""

import json

import numpy as np
import pytest

from jaxinfra import cli, eplb


def test_cli_npy_json_png_and_migration(tmp_path, capsys):
  loads = eplb.zipf_loads(4, 32, seed=2)
  np.save(tmp_path / "loads.npy", loads)
  out, png = tmp_path / "placement.json", tmp_path / "loads.png"
  assert cli.main(["eplb", str(tmp_path / "loads.npy"), "--replicas", "48", "--groups", "4",
                   "--nodes", "2", "--gpus", "8", "--out", str(out), "--png", str(png)]) == 0
  text = capsys.readouterr().out
  assert "no EPLB" in text and "deepseek" in text and "auto" in text
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  saved = json.loads(out.read_text())
  want = eplb.rebalance_experts(loads, 48, 4, 2, 8)
  assert saved["phy2log"] == want.phy2log.tolist() and saved["logcnt"] == want.logcnt.tolist()
  # JSON loads (object form), migration-aware from the saved placement.
  drifted = eplb.drift(loads, 0.1)
  (tmp_path / "drifted.json").write_text(json.dumps({"loads": drifted.tolist()}))
  assert cli.main(["eplb", str(tmp_path / "drifted.json"), "--replicas", "48", "--groups", "4",
                   "--nodes", "2", "--gpus", "8", "--previous", str(out), "--expert-bytes",
                   "100", "--png", ""]) == 0
  *_, report = eplb.rebalance_experts(drifted, 48, 4, 2, 8, previous=want.phy2log,
                                      expert_bytes=100)
  text = capsys.readouterr().out
  assert f"migration: {report.total_replicas_moved} replicas moved" in text


def test_cli_bad_input(tmp_path):
  (tmp_path / "bad.json").write_text(json.dumps([[1.0, -2.0, 3.0, 4.0]]))
  with pytest.raises(ValueError, match="loads .* negative"):
    cli.main(["eplb", str(tmp_path / "bad.json"), "--replicas", "4", "--gpus", "2", "--png", ""])
  with pytest.raises(ValueError, match="give a loads file or --zipf"):
    cli.main(["eplb", "--replicas", "4", "--gpus", "2", "--png", ""])


def test_bench_eplb(tmp_path):
  path = tmp_path / "eplb.json"
  assert cli.main(["bench", "eplb", "--iters", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())["rows"]
  auto = [r for r in rows if r["policy"].startswith("auto")]
  assert len(auto) == 4
  assert all(r["forbidden_same_gpu"] == 0 and r["layers_worse_than_deepseek"] == 0 for r in auto)
  assert all(r["ms_61_layers"] > 0 for r in auto)
  ds = [r for r in rows if r["policy"].startswith("deepseek")]
  assert all(a["median_max_mean"] < d["median_max_mean"] for a, d in zip(auto, ds))
  migration = [r for r in rows if r["policy"].startswith("migration")]
  assert all(r["moved_fraction"] <= 0.5 and r["worst_peak_vs_fresh"] <= 1.02 + 1e-9
             for r in migration)
