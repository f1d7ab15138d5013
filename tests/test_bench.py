"""`jaxinfra bench`: the harness runs a benchmark, prints it and writes its JSON."""

import json
import os

import numpy as np
import pytest

from jaxinfra import bench, cli
from jaxinfra.testing.numerics import calc_diff


def test_bench_quant_writes_rows_for_every_impl(tmp_path, capsys):
  path = tmp_path / "quant.json"
  assert cli.main(["bench", "quant", "--iters", "1", "--json", str(path)]) == 0
  result = json.loads(path.read_text())
  assert result["benchmark"] == "quant" and result["size"] == "small"
  assert result["environment"]["jax"] and result["environment"]["platform"] == "cpu"
  impls = {row["impl"] for row in result["rows"]}
  assert impls == {"xla", "ffi"}
  assert all(row["ms"] > 0 and row["gb_per_s"] > 0 for row in result["rows"])
  assert "quantize_per_token" in capsys.readouterr().out


def test_bench_list_and_unknown_name(capsys):
  assert cli.main(["bench", "list"]) == 0
  assert "quant" in capsys.readouterr().out
  assert "quant" in bench.registered()
  with pytest.raises(ValueError, match="unknown benchmark 'nope'"):
    bench.main("nope")


def test_calc_diff():
  x = np.random.default_rng(0).standard_normal((64, 64))
  assert calc_diff(x, x) == 0.0
  assert calc_diff(np.zeros(3), np.zeros(3)) == 0.0
  assert calc_diff(x, -x) == pytest.approx(2.0)
  # A 1% relative perturbation gives about 0.5e-4.
  assert calc_diff(x, x * 1.01) == pytest.approx(1 - 2 * 1.01 / (1 + 1.01**2), rel=1e-9)
  with pytest.raises(ValueError, match="shapes differ"):
    calc_diff(np.zeros(3), np.zeros(4))


def test_bench_ckpt_small_reports_ratios(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("JAXINFRA_BENCH_DIR", str(tmp_path))
  path = tmp_path / "ckpt.json"
  assert cli.main(["bench", "ckpt", "--iters", "1", "--json", str(path)]) == 0
  rows = {row["op"]: row for row in json.loads(path.read_text())["rows"]}
  assert set(rows) == {"jaxinfra save", "orbax save", "jaxinfra restore", "orbax restore",
                       "disk sequential write", "disk sequential read"}
  assert all(row["gb_per_s"] > 0 and row["s"] > 0 for row in rows.values())
  assert rows["jaxinfra save"]["vs_orbax"] == pytest.approx(
      rows["jaxinfra save"]["gb_per_s"] / rows["orbax save"]["gb_per_s"])
  assert "jaxinfra vs Orbax" in capsys.readouterr().out
  assert os.listdir(tmp_path) == ["ckpt.json"]  # the benchmark's checkpoints are removed
