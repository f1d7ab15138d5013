"""`jaxinfra bench moe`: its traffic model equals the implementation's plans, and it runs."""

import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import _moe_checks as checks
from jaxinfra import cli
from jaxinfra import moe
from jaxinfra.bench import moe as bench_moe


def _sent_rows(mesh, axis, idx, hierarchical, capacity=None):
  spec = P(axis)

  def body(x, i, w):
    d = moe.dispatch(x, i, w, axis_name=axis, num_experts=checks.E, capacity=capacity,
                     hierarchical=hierarchical)
    return tuple(s[None] for s in d.handle.send_sizes)

  hops = 2 if hierarchical else 1
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * hops))
  n = idx.shape[0]
  out = f(checks.put(np.zeros((n, 128), np.float32), mesh, spec), checks.put(idx, mesh, spec),
          checks.put(np.ones(idx.shape, np.float32), mesh, spec))
  return [checks.fetch(o).reshape(8, -1) for o in out]


def test_traffic_model_equals_dispatch_plans():
  tokens = 32
  idx = bench_moe.routing(8, tokens, checks.E, checks.K, checks.N_GROUPS, checks.TOPK_GROUPS)
  model = bench_moe.traffic(idx, nodes=2, local=4, tokens=tokens, experts=checks.E, capacity=9)
  single, = _sent_rows(checks.mesh_1d(), "ep", idx, False, capacity=9)
  np.testing.assert_array_equal(single, model["single"])
  model = bench_moe.traffic(idx, nodes=2, local=4, tokens=tokens, experts=checks.E)
  node, fanout = _sent_rows(checks.mesh_2d(), ("node", "local"), idx, True)
  np.testing.assert_array_equal(node, model["node"])
  # Hop 2 sizes are per (destination local rank, source node) group.
  np.testing.assert_array_equal(fanout.reshape(8, 4, 2).sum(2), model["fanout"])


def test_bytes_rows_cover_every_mode_and_dtype():
  cfg = dict(tokens=16, hidden=256, experts=64, top_k=8, groups=8, topk_groups=4, ll_tokens=8)
  rows = bench_moe._bytes_rows(cfg, 2, 4)
  nbytes = {(r["mode"], r["dispatch"]): r for r in rows}
  assert len(rows) == len(nbytes) == 6
  for mode in ("single-level", "two-level", "low-latency"):
    bf16, fp8 = nbytes[(mode, "bf16")], nbytes[(mode, "fp8")]
    # fp8 rows: 256 + 8 bytes vs 512 bytes in bf16.
    np.testing.assert_allclose(fp8["inter_MB"], bf16["inter_MB"] * 264 / 512)
    np.testing.assert_allclose(fp8["pad_intra_MB"], bf16["pad_intra_MB"] * 264 / 512)
    assert bf16["combine_MB"] == fp8["combine_MB"] > 0
  assert nbytes[("two-level", "bf16")]["inter_MB"] < nbytes[("single-level", "bf16")]["inter_MB"]


@pytest.mark.slow
def test_bench_moe_reports_bytes_and_times(tmp_path, monkeypatch):
  monkeypatch.setattr(bench_moe, "_SMALL", dict(
      tokens=16, hidden=256, experts=64, top_k=8, groups=8, topk_groups=4, ll_tokens=8,
      worlds=((2, 4),)))
  monkeypatch.setitem(bench_moe._LAYER_TOKENS, "small", 8)
  path = tmp_path / "moe.json"
  assert cli.main(["bench", "moe", "--iters", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())["rows"]
  nbytes = {(r["mode"], r["dispatch"]): r for r in rows if r["kind"] == "bytes"}
  assert set(nbytes) == {(m, d) for m in ("single-level", "two-level", "low-latency")
                         for d in ("bf16", "fp8")}
  for mode in ("single-level", "two-level", "low-latency"):
    bf16, fp8 = nbytes[(mode, "bf16")], nbytes[(mode, "fp8")]
    # fp8 rows: 256 + 8 bytes vs 512 bytes in bf16.
    np.testing.assert_allclose(fp8["inter_MB"], bf16["inter_MB"] * 264 / 512)
    assert bf16["combine_MB"] == fp8["combine_MB"] > 0
  assert (nbytes[("two-level", "bf16")]["inter_MB"]
          < nbytes[("single-level", "bf16")]["inter_MB"])
  times = [r for r in rows if r["kind"] == "time"]
  assert {r["impl"] for r in times} == {"xla", "ffi"}
  assert all(r["ms"] > 0 for r in times)
