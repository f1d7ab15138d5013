"""`jaxinfra bench mla`: runs on CPU at small sizes, times both implementations
and reports FlashMLA's FLOP and byte counts."""

import json

from jaxinfra import cli
from jaxinfra.bench import mla as mla_bench


def test_flashmla_formulas():
  # FlashMLA: FLOPs = b*h_q*s_q*len*2*(576+512); bytes = b*(s_q*h_q*576*2 + len*h_kv*576*2
  # + s_q*h_q*512*2). b=128, s_q=2, h_q=128, h_kv=1, len=4096:
  flops, moved = mla_bench.flops_and_bytes(128, 2, 128, 1, 128 * 4096)
  assert flops == 128 * 128 * 2 * 4096 * 2 * 1088
  assert moved == 128 * (2 * 128 * 576 * 2 + 4096 * 576 * 2 + 2 * 128 * 512 * 2)


def test_bench_mla_reports_both_impls(tmp_path, capsys):
  path = tmp_path / "mla.json"
  assert cli.main(["bench", "mla", "--iters", "1", "--json", str(path)]) == 0
  result = json.loads(path.read_text())
  assert result["benchmark"] == "mla" and result["size"] == "small"
  ceilings = [row for row in result["rows"] if row["impl"].startswith("ceiling")]
  assert [row["impl"] for row in ceilings] == ["ceiling: copy (x -> -x)", "ceiling: bf16 matmul"]
  assert ceilings[0]["gb_per_s"] > 0 and ceilings[1]["tflops"] > 0
  rows = [row for row in result["rows"] if not row["impl"].startswith("ceiling")]
  assert {row["impl"] for row in rows} == {"xla", "ffi"}
  assert len(rows) == 2 * len(mla_bench._SMALL)  # pylint: disable=protected-access
  for row in rows:
    flops, moved = mla_bench.flops_and_bytes(row["b"], row["s_q"], row["h_q"], 1,
                                             round(row["mean_len"] * row["b"]))
    seconds = row["ms"] / 1e3
    assert seconds > 0
    assert abs(row["tflops"] * 1e12 * seconds / flops - 1) < 1e-9
    assert abs(row["gb_per_s"] * 1e9 * seconds / moved - 1) < 1e-9
    assert abs(row["of_copy"] * ceilings[0]["gb_per_s"] / row["gb_per_s"] - 1) < 1e-9
    assert abs(row["of_matmul"] * ceilings[1]["tflops"] / row["tflops"] - 1) < 1e-9
  assert "jaxinfra bench mla (small)" in capsys.readouterr().out
