"""jaxinfra.profile: capture a real trace of a shard_map program with collectives
over 8 CPU devices, and report per-device compute, communication and overlap."""

import glob
import gzip
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfra import cli
from jaxinfra import profile


def _collective_step(a):
  """Per device: matmuls plus one of each collective kind."""
  b = jnp.tanh(a @ a.T) @ a
  total = jax.lax.psum(b, "x")
  gathered = jax.lax.all_gather(total[:8], "x", tiled=True)
  swapped = jax.lax.all_to_all(b, "x", 0, 0, tiled=True)
  shifted = jax.lax.ppermute(swapped, "x", [(i, (i + 1) % 8) for i in range(8)])
  return jnp.sin(gathered) + shifted


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  step = jax.jit(jax.shard_map(_collective_step, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  x = jax.device_put(jnp.ones((8 * 64, 128)), jax.NamedSharding(mesh, P("x")))
  compiled = step.lower(x).compile()
  log_dir = tmp_path_factory.mktemp("trace")
  result = profile.capture_steps(lambda i: step(x), log_dir, steps=2, hlo=[compiled])
  return log_dir, result


def test_capture_writes_trace_and_opcodes(captured):
  log_dir, result = captured
  assert result.trace_files and all(os.path.isfile(f) for f in result.trace_files)
  with open(result.hlo_ops_file) as f:
    modules = json.load(f)["modules"]
  opcodes = {op for ops in modules.values() for op in ops.values()}
  assert {"all-reduce", "all-gather", "all-to-all", "collective-permute"} <= opcodes
  assert profile.find_trace_files(log_dir) == result.trace_files


def test_report_on_real_trace(captured, tmp_path):
  log_dir, _ = captured
  png = tmp_path / "timeline.png"
  rep = profile.report(log_dir, png=png)
  assert [d.device for d in rep.devices] == [f"device:{i}" for i in range(8)]
  for d in rep.devices:
    assert d.steps == 2  # two traced executions (run ids) per device
    assert d.compute > 0 and d.comm > 0
    assert 0 <= d.overlap <= min(d.compute, d.comm) + 1e-6
    assert d.busy <= d.span + 1e-6
    assert {"all-reduce", "all-gather", "all-to-all", "collective-permute"} <= set(d.comm_by_kind)
    assert max(d.comm_by_kind.values()) <= d.comm + 1e-6
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_xplane_matches_json(captured):
  """The .xplane.pb (read with jax.profiler.ProfileData) gives the same numbers."""
  log_dir, result = captured
  xplanes = glob.glob(os.path.join(os.path.dirname(result.trace_files[0]), "*.xplane.pb"))
  assert xplanes
  from_json = profile.summarize(profile.load_events(result.trace_files[0], hlo_ops=os.path.join(
      log_dir, profile.HLO_OPS_FILE)))
  from_xplane = profile.summarize(profile.load_events(xplanes[0], hlo_ops=os.path.join(
      log_dir, profile.HLO_OPS_FILE)))
  assert [d.device for d in from_json] == [d.device for d in from_xplane]
  for a, b in zip(from_json, from_xplane):
    np.testing.assert_allclose([a.compute, a.comm, a.overlap], [b.compute, b.comm, b.overlap],
                               rtol=1e-6, atol=1e-3)


def test_cli(captured, tmp_path, capsys):
  log_dir, _ = captured
  out = tmp_path / "report.json"
  png = tmp_path / "t.png"
  assert cli.main(["profile-report", str(log_dir), "--png", str(png), "--json", str(out)]) == 0
  printed = capsys.readouterr().out
  assert "per device" in printed and "all-to-all" in printed
  with open(out) as f:
    numbers = json.load(f)
  assert len(numbers["devices"]) == 8 and png.exists()
  assert cli.main(["profile-report", str(tmp_path / "missing")]) == 2
  assert "does not exist" in capsys.readouterr().out


def _write_trace(path, events):
  """A minimal CPU-style JSON trace: thunk events with hlo_op and device_ordinal."""
  trace_events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}]
  for device, tid, name, start, dur in events:
    trace_events.append({"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": start, "dur": dur,
                         "args": {"hlo_op": name, "hlo_module": "jit_f", "run_id": "1",
                                  "device_ordinal": str(device)}})
  with gzip.open(path, "wt") as f:
    json.dump({"traceEvents": trace_events}, f)


def _brute_force(events, device):
  """float64 NumPy on a 0.5 us grid: compute, comm and overlap lengths."""
  grid = np.arange(0, 200, 0.5) + 0.25
  masks = {"compute": np.zeros_like(grid, bool), "comm": np.zeros_like(grid, bool)}
  for d, _, name, start, dur in events:
    if d == device:
      kind = "compute" if profile.op_kind(name) == "compute" else "comm"
      masks[kind] |= (grid >= start) & (grid < start + dur)
  return (masks["compute"].sum() * 0.5, masks["comm"].sum() * 0.5,
          (masks["compute"] & masks["comm"]).sum() * 0.5)


def test_synthetic_trace_against_brute_force(tmp_path):
  events = [
      (0, 1, "fusion.1", 0, 10), (0, 1, "fusion.2", 12, 8), (0, 2, "all-reduce.3", 5, 10),
      (0, 2, "all-gather-start", 30, 4), (0, 1, "dot.4", 31, 2),
      (1, 3, "fusion.1", 0, 20), (1, 4, "all-to-all.1", 20, 5), (1, 4, "ppermute.2", 24, 6),
      # A while loop enclosing its body's ops: only the body counts.
      (1, 3, "while.7", 40, 50), (1, 3, "fusion.9", 41, 10), (1, 3, "psum.2", 60, 20),
  ]
  path = tmp_path / "host.trace.json.gz"
  _write_trace(path, events)
  rep = profile.report(path, png=tmp_path / "t.png")
  assert [d.device for d in rep.devices] == ["device:0", "device:1"]
  for d, device in zip(rep.devices, (0, 1)):
    np.testing.assert_allclose([d.compute, d.comm, d.overlap], _brute_force(
        [e for e in events if not e[2].startswith("while")], device))
  assert rep.devices[1].comm_by_kind == {"all-reduce": 20.0, "all-to-all": 5.0,
                                         "collective-permute": 6.0}
  assert rep.devices[0].overlap == 5 + 3 + 2  # [5,10), [12,15), [31,33)


@pytest.mark.parametrize("name,opcode,kind", [
    ("psum_invariant.7", None, "all-reduce"), ("all-gather-start.1", None, "all-gather"),
    ("reduce-scatter.2", None, "reduce-scatter"), ("ppermute.3", None, "collective-permute"),
    ("ncclDevKernel_SendRecv", None, "send/recv"), ("while.1", None, "container"),
    ("fusion.3", None, "compute"), ("my_op", "all-to-all", "all-to-all"),
    ("psum_like_name", "add", "compute"), ("body", "while", "container"),
])
def test_op_kind(name, opcode, kind):
  assert profile.op_kind(name, opcode) == kind


def test_bad_input(tmp_path):
  with pytest.raises(FileNotFoundError, match="no jax.profiler trace"):
    profile.find_trace_files(tmp_path)
  bad = tmp_path / "x.trace.json.gz"
  with gzip.open(bad, "wt") as f:
    json.dump({"nothing": []}, f)
  with pytest.raises(ValueError, match="no traceEvents"):
    profile.load_events(bad)
  with pytest.raises(ValueError, match="steps must be"):
    profile.capture_steps(lambda i: None, tmp_path, steps=0)
  with pytest.raises(ValueError, match="compiled HLO"):
    with profile.capture(tmp_path, hlo=["module @jit_f { }"]):
      pass
