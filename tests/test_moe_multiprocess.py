"""jaxinfra.moe's done-when checks in 2 processes x 4 CPU devices (gloo collectives).

The same check functions as the 8-device tests (tests/_moe_checks.py) run in
every process on one 8-device mesh spanning both processes; each process
returns the metrics, and both must pass the same thresholds.
"""

import os
import sys

import pytest

from jaxinfra.testing import run_multiprocess


def moe_checks_in_process(group):
  """Runs in each worker process."""
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import _moe_checks as checks  # pylint: disable=g-import-not-at-top
  from jaxinfra import moe  # pylint: disable=g-import-not-at-top

  assert jax.process_count() == 2 and len(jax.devices()) == 8
  mesh = checks.mesh_1d()
  if group == "dispatch":
    _, idx, _ = checks.routed_inputs(2, 96, seed=8)
    layout = [np.asarray(a) for a in jax.jit(lambda i: moe.dispatch_layout(i, checks.E, 8))(idx)]
    want = checks.ref_layout(idx, checks.E, 8)
    return {"layout_equal": all(bool(np.array_equal(a, b)) for a, b in zip(layout, want)),
            "bf16": checks.check_dispatch(mesh, "ep"),
            "fp8": checks.check_dispatch(mesh, "ep", fp8=True),
            "capacity": checks.check_dispatch(mesh, "ep", capacity=5),
            "invalid": checks.check_invalid_ids(mesh),
            "vjp": checks.check_vjp_duality(mesh)}
  if group == "two_level_low_latency":
    mesh2 = checks.mesh_2d()
    return {"two_level": checks.check_two_level(mesh2, mesh),
            "rows": checks.inter_node_rows(mesh2),
            "ll_fp8": checks.check_low_latency(mesh, fp8=True),
            "ll_bf16": checks.check_low_latency(mesh, fp8=False)}
  if group == "layer":
    return {"layer": checks.check_layer(mesh, "ep")}
  raise ValueError(group)


def _run(group):
  results = run_multiprocess(moe_checks_in_process, num_processes=2, devices_per_process=4,
                             args=(group,), timeout=900)
  assert len(results) == 2
  assert results[0] == results[1]  # both processes saw the same global results
  return results[0]


def _assert_deepep(r, fp8):
  assert r["tags_ok"] and r["ids_weights_ok"] and r["per_source_ok"], r
  assert r["dropped"] == r["want_dropped"] and r["invalid"] == 0
  assert r["combine_diff"] < (1e-3 if fp8 else 5e-6), r
  assert r["combine_zero_elsewhere"] and r["deterministic"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_dispatch_checks_two_processes():
  r = _run("dispatch")
  assert r["layout_equal"]
  _assert_deepep(r["bf16"], False)
  _assert_deepep(r["fp8"], True)
  _assert_deepep(r["capacity"], False)
  assert r["capacity"]["dropped"] > 0
  for key in ("bf16", "fp8"):
    assert r[key]["recv_equals_global_count"] and r[key]["per_expert_equals_global"]
  assert r["invalid"] == {"invalid": 3, "equal_to_minus_one": True}
  assert all(r["vjp"].values()), r["vjp"]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_level_and_low_latency_two_processes():
  r = _run("two_level_low_latency")
  two = r["two_level"]
  assert all(v for k, v in two.items() if k.endswith("_equal")), two
  assert two["flat_equals_single"] and two["combine_diff"] < 5e-6
  assert 0 < r["rows"]["two_level"] < r["rows"]["single"]
  for key, fp8 in (("ll_fp8", True), ("ll_bf16", False)):
    assert r[key]["layout_ok"] and r[key]["deterministic"]
    assert r[key]["combine_diff"] < (9e-4 if fp8 else 1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_layer_two_processes():
  layer = _run("layer")["layer"]
  assert layer["forward_close"] and layer["grads_close"], layer
  assert layer["tokens_per_expert_equal"] and layer["dropped"] == 0
