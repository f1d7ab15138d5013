"""`jaxinfra bench pipeline` measures op times and every schedule's step, and predicts them."""

import json

import pytest

from jaxinfra import cli
from jaxinfra.bench import pipeline as bench_pipeline


@pytest.mark.multiprocess  # on CPU: one pinned process per stage
def test_bench_pipeline_rows(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(bench_pipeline, "_SMALL", (16, 8, 4))
  monkeypatch.setattr(bench_pipeline, "_SCHEDULES", ("1f1b", "dualpipev"))
  path = tmp_path / "pipeline.json"
  assert cli.main(["bench", "pipeline", "--iters", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())["rows"]
  ops = {row["schedule"]: row["ms"] for row in rows if row["schedule"].startswith("op ")}
  assert set(ops) == {"op F", "op B", "op I", "op W", "op FB"}
  assert all(ms > 0 for ms in ops.values())
  steps = {row["schedule"]: row for row in rows if not row["schedule"].startswith("op ")}
  assert set(steps) == {"1f1b", "dualpipev"}
  stages = steps["1f1b"]["stages"]
  assert steps["1f1b"]["ranks"] == stages and steps["dualpipev"]["ranks"] == stages // 2
  for row in steps.values():
    assert row["ms"] > 0 and row["simulated_ms"] > 0 and row["lockstep_ms"] > 0
    assert {row["rank_measured"], row["rank_simulated"]} <= {1, 2}
  # 1F1B's simulated makespan from the measured op times: (M + P - 1)(F + B).
  m, p = steps["1f1b"]["chunks"], stages
  assert steps["1f1b"]["simulated_ms"] == pytest.approx((m + p - 1) * (ops["op F"] + ops["op B"]))
  out = capsys.readouterr().out
  assert "ranking by simulation" in out and "ranking by lockstep model" in out


def test_rankings_agree_up_to_ties():
  names = ["a", "b", "c"]
  predicted = [100.0, 102.0, 150.0]  # a and b within 5%: tied
  assert bench_pipeline.disagreements(names, [210.0, 200.0, 300.0], predicted) == []
  assert bench_pipeline.disagreements(names, [200.0, 310.0, 300.0], predicted) == [("b", "c")]
  assert bench_pipeline.disagreements(names, [200.0, 210.0, 300.0], predicted,
                                      tolerance=0.0) == []
  assert bench_pipeline.disagreements(names, [210.0, 200.0, 300.0], predicted,
                                      tolerance=0.0) == [("a", "b")]
