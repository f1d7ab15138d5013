"""`jaxinfra bench gemm`: the case list and one small run of every kind of case."""

import json

from jaxinfra import cli
from jaxinfra.bench import gemm as gemm_bench


def test_cases_are_deepseek_v3_shapes_scaled_down_on_cpu():
  full = gemm_bench.cases(full=True)
  assert ("dense", (4096, 7168, 16384)) in full and ("dense", (64, 2112, 7168)) in full
  assert len([c for c in full if c[0] == "dense"]) == 18
  assert ("contiguous", (8, 4096, 7168, 2048)) in full
  assert ("masked", (4, 256, 4096, 7168)) in full
  small = gemm_bench.cases(full=False)
  assert len(small) == len(full)
  assert ("dense", (256, 132, 896)) in small and ("masked", (1, 64, 448, 256)) in small


def test_bench_gemm_times_every_impl(tmp_path, monkeypatch, capsys):
  monkeypatch.setattr(gemm_bench, "cases", lambda full: [
      ("dense", (16, 40, 200)), ("contiguous", (2, 16, 40, 256)), ("masked", (2, 8, 40, 256))])
  path = tmp_path / "gemm.json"
  assert cli.main(["bench", "gemm", "--iters", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())["rows"]
  impls = {(row["op"], row["impl"]) for row in rows}
  common = {"xla", "ffi", "jnp.dot bf16", "xla fp8 per-tensor"}
  assert impls == ({("dense", i) for i in common} | {("masked", i) for i in common}
                   | {("contiguous", i) for i in common | {"ragged_dot bf16"}})
  for row in rows:
    assert row["ms"] > 0 and row["tflops"] > 0, row
    # FP8 (fine-grained or per-tensor) vs the fp32 product; bf16 is far closer.
    assert row["diff"] < (1e-4 if "bf16" in row["impl"] else 2e-3), row
  assert {row["note"] for row in rows if row["impl"] == "xla fp8 per-tensor"} == {
      "f32 upcast, no fp8 math"}
  assert "jaxinfra bench gemm (small)" in capsys.readouterr().out
