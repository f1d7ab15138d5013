"""jaxinfra.checkpoint: round trips, resharding, Orbax, async saves, bad input."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra import checkpoint as ck
from jaxinfra.checkpoint import _crc, _engine, _format, _restore
from jaxinfra.testing import run_multiprocess

EXPLICIT = jax.sharding.AxisType.Explicit
SMALL = dict(block_bytes=4096, chunk_bytes=8192, files_per_process=3)


def _mesh(shape, names, devices=None):
  return jax.make_mesh(shape, names, axis_types=(EXPLICIT,) * len(shape),
                       devices=devices if devices is not None else jax.devices()[:np.prod(shape)])


def _crc32c_reference(data: bytes) -> int:
  """Bitwise CRC-32C (Castagnoli, reflected), straight from the definition."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc ^= byte
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
  return crc ^ 0xFFFFFFFF


def _bits(x):
  x = np.asarray(x)
  return x.view(np.uint8) if x.dtype.itemsize == 1 else x.view(f"u{x.dtype.itemsize}")


def _assert_bit_equal(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape
  np.testing.assert_array_equal(_bits(a), _bits(b))


def _state(mesh):
  rng = np.random.default_rng(0)
  row = NamedSharding(mesh, P("x"))
  floats = rng.standard_normal((64, 96)).astype(np.float32)
  return {
      "w_bf16": jax.device_put(floats.astype(ml_dtypes.bfloat16), row),
      "w_e4m3": jax.device_put(floats.astype(ml_dtypes.float8_e4m3fn), NamedSharding(mesh, P(None, "x"))),
      "w_e5m2": jax.device_put(floats[:8].astype(ml_dtypes.float8_e5m2), row),
      "w_f32": jax.device_put(floats, row),
      "nan_inf": jax.device_put(np.array([np.nan, -np.inf, np.inf, -0.0] * 2, np.float32), row),
      "ids": jax.device_put(rng.integers(-2**31, 2**31 - 1, (40, 8), dtype=np.int32),
                            NamedSharding(mesh, P(None, None))),
      "counts": jax.device_put(rng.integers(0, 255, (16,), dtype=np.uint8), row),
      "scalar": jnp.float32(3.25),
      "step": jnp.int32(7),
      "host": np.arange(10, dtype=np.int64).reshape(2, 5),
      "empty": jnp.zeros((0, 4), jnp.float32),
      "meta": {"lr": 1e-3, "name": "run-7", "epoch": 3, "done": False},
      "layers": [jax.device_put(floats[:8, :8], row), jnp.arange(3, dtype=jnp.int8)],
  }


def test_crc32c_against_the_definition_and_combine():
  assert _crc.crc32c(b"123456789") == 0xE3069283  # the published check value
  rng = np.random.default_rng(1)
  for n in (0, 1, 7, 100, 4097):
    data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    assert _crc.crc32c(data) == _crc32c_reference(data)
  a, b = rng.integers(0, 256, 999, np.uint8).tobytes(), rng.integers(0, 256, 3001, np.uint8).tobytes()
  assert _crc.combine(_crc.crc32c(a), _crc.crc32c(b), len(b)) == _crc32c_reference(a + b)
  blocks = [_crc.crc32c((a + b)[i:i + 1024]) for i in range(0, 4000, 1024)]
  assert _crc.combine_blocks(blocks, 4000, 1024) == _crc32c_reference(a + b)


@pytest.mark.parametrize("shape,lo,hi", [((8, 6), (2, 0), (5, 6)), ((8, 6), (2, 1), (5, 4)),
                                          ((4, 5, 6), (1, 2, 0), (3, 4, 6)), ((7,), (3,), (6,)),
                                          ((3, 4, 5), (0, 0, 0), (3, 4, 5)), ((), (), ())])
def test_runs_concatenate_to_the_sub_box(shape, lo, hi):
  a = np.arange(int(np.prod(shape))).reshape(shape)
  starts, length = _format.runs(shape, lo, hi)
  got = np.concatenate([a.reshape(-1)[s:s + length] for s in starts])
  np.testing.assert_array_equal(got, a[tuple(slice(x, y) for x, y in zip(lo, hi))].reshape(-1))


def test_round_trip_is_bit_exact(tmp_path):
  mesh = _mesh((8,), ("x",))
  state = _state(mesh)
  ck.save(tmp_path / "c", state, ck.CheckpointOptions(io="posix", **SMALL))
  assert ck.is_committed(tmp_path / "c")
  restored = ck.restore(tmp_path / "c", state)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  for path, (want, got) in zip(jax.tree_util.tree_flatten_with_path(state)[0],
                               zip(jax.tree.leaves(state), jax.tree.leaves(restored))):
    if isinstance(want, jax.Array):
      assert isinstance(got, jax.Array) and got.sharding == want.sharding, path
      _assert_bit_equal(got, want)
    elif isinstance(want, np.ndarray):
      assert isinstance(got, np.ndarray)
      _assert_bit_equal(got, want)
    else:
      assert type(got) is type(want) and got == want, path
  # Without a target: nested containers, arrays on the saved mesh.
  plain = ck.restore(tmp_path / "c")
  assert plain["meta"] == state["meta"] and isinstance(plain["layers"], list)
  assert plain["w_bf16"].sharding.spec == P("x")
  _assert_bit_equal(plain["w_e4m3"], state["w_e4m3"])
  _assert_bit_equal(plain["host"], state["host"])


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("target", ["4_devices", "2d", "replicated", "transposed_2d"])
def test_restore_to_a_different_mesh(tmp_path, verify, target):
  mesh = _mesh((8,), ("x",))
  x = np.random.default_rng(2).standard_normal((64, 40)).astype(np.float32)
  ck.save(tmp_path / "c", {"x": jax.device_put(x, NamedSharding(mesh, P("x")))},
          ck.CheckpointOptions(**SMALL))
  shardings = {
      "4_devices": NamedSharding(_mesh((4,), ("y",), jax.devices()[4:]), P("y")),
      "2d": NamedSharding(_mesh((2, 4), ("a", "b")), P("a", "b")),
      "replicated": NamedSharding(_mesh((2, 2), ("a", "b")), P(None, "b")),
      "transposed_2d": NamedSharding(_mesh((4, 2), ("a", "b")), P("b", "a")),
  }
  sharding = shardings[target]
  ckpt = ck.Checkpointer(ck.CheckpointOptions(verify=verify, **SMALL))
  got = ckpt.restore(tmp_path / "c", {"x": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                sharding=sharding)})["x"]
  assert got.sharding == sharding
  np.testing.assert_array_equal(np.asarray(got), x)
  for shard in got.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
  if not verify:  # every distinct box is read once, exactly
    assert ckpt.last_restore_stats["bytes_read"] == x.nbytes


def test_partial_reads_are_exact_or_block_rounded(tmp_path):
  mesh = _mesh((2,), ("x",))
  x = np.arange(64 * 1024, dtype=np.float32).reshape(64, 1024)  # 4 KiB rows, 2 shards of 128 KiB
  options = ck.CheckpointOptions(block_bytes=16384, chunk_bytes=16384)
  ck.save(tmp_path / "c", {"x": jax.device_put(x, NamedSharding(mesh, P("x")))}, options)
  index = _format.read_index(tmp_path / "c")
  box = ((3, 9), (100, 300))  # rows 3..8 of shard 0, 200 of 1024 columns
  for verify, expected in ((False, 6 * 200 * 4), (True, 16384 * 3)):
    opts = ck.CheckpointOptions(verify=verify, block_bytes=16384, chunk_bytes=16384)
    engine = _engine.PosixEngine(budget=1 << 20)
    reader = _restore._Reader(str(tmp_path / "c"), index, opts, engine)  # pylint: disable=protected-access
    out = reader.box(0, box)
    reader.run()
    reader.close()
    engine.close()
    np.testing.assert_array_equal(out, x[3:9, 100:300])
    # Exact: 6 runs of 800 bytes. Verified: the 16 KiB blocks holding rows 3..8.
    assert engine.bytes_read == expected, verify


def test_checkpoint_manager_max_to_keep_and_async(tmp_path):
  mesh = _mesh((8,), ("x",))
  x = jax.device_put(jnp.arange(32 * 16, dtype=jnp.float32).reshape(32, 16),
                     NamedSharding(mesh, P("x")))
  options = ocp.CheckpointManagerOptions(max_to_keep=2, enable_async_checkpointing=True)
  with ocp.CheckpointManager(tmp_path, options=options,
                             item_handlers=ck.Hf3fsCheckpointHandler(ck.CheckpointOptions(**SMALL))
                             ) as manager:
    for step in range(4):
      manager.save(step, args=ck.Hf3fsSave({"x": x + step, "step": step}))
    manager.wait_until_finished()
    assert manager.all_steps() == [2, 3]
    assert sorted(os.listdir(tmp_path)) == ["2", "3"]
    target = {"x": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        _mesh((2, 2), ("a", "b")), P("b", "a"))), "step": 0}
    restored = manager.restore(3, args=ck.Hf3fsRestore(target))
    np.testing.assert_array_equal(np.asarray(restored["x"]), np.asarray(x) + 3)
    assert restored["step"] == 3
  # The item directory is an ordinary committed jaxinfra checkpoint.
  assert ck.is_committed(tmp_path / "3" / "default")
  meta = ck.Hf3fsCheckpointHandler().metadata(tmp_path / "3" / "default")
  assert meta["['x']"]["shape"] == [32, 16] and meta["['step']"]["value"] == 3


def test_async_checkpointer_with_the_handler(tmp_path):
  x = jax.device_put(jnp.ones((16, 8), jnp.bfloat16), NamedSharding(_mesh((8,), ("x",)), P("x")))
  with ocp.AsyncCheckpointer(ck.Hf3fsCheckpointHandler()) as checkpointer:
    checkpointer.save(tmp_path / "a", args=ck.Hf3fsSave({"x": x}))
    checkpointer.wait_until_finished()
    got = checkpointer.restore(tmp_path / "a", args=ck.Hf3fsRestore({"x": x}))
  _assert_bit_equal(got["x"], x)


def test_async_save_stages_within_the_budget_and_survives_donation(tmp_path):
  mesh = _mesh((8,), ("x",))
  x = np.random.default_rng(3).standard_normal((256, 512)).astype(np.float32)  # 512 KiB
  arrays = {f"p{i}": jax.device_put(x + i, NamedSharding(mesh, P("x"))) for i in range(4)}
  budget = 256 << 10  # an eighth of the 2 MiB state
  ckpt = ck.Checkpointer(ck.CheckpointOptions(host_budget_bytes=budget, **SMALL))
  ckpt.save_async(tmp_path / "c", arrays)
  # The device buffers may be donated or deleted as soon as save_async returns.
  for a in arrays.values():
    a.delete()
  ckpt.wait_until_finished()
  stats = ckpt.last_save_stats
  assert stats["peak_staging_bytes"] <= budget and stats["staging_bytes"] <= budget
  assert stats["bytes_written"] == 4 * x.nbytes
  restored = ck.restore(tmp_path / "c")
  for i in range(4):
    np.testing.assert_array_equal(np.asarray(restored[f"p{i}"]), x + i)


def test_save_async_overlaps_with_computation(tmp_path):
  mesh = _mesh((8,), ("x",))
  state = {"w": jax.device_put(jnp.ones((512, 256)), NamedSharding(mesh, P("x")))}
  ckpt = ck.Checkpointer(ck.CheckpointOptions(**SMALL))
  step = jax.jit(lambda s: jax.tree.map(lambda a: a * 2, s))
  for i in range(3):
    ckpt.save_async(tmp_path / f"{i}", state)  # waits for the previous save first
    state = step(state)
  ckpt.wait_until_finished()
  assert ck.committed(tmp_path) == ["0", "1", "2"]
  np.testing.assert_array_equal(np.asarray(ck.restore(tmp_path / "2")["w"]), 4.0)


# -- bad input ------------------------------------------------------------------

@pytest.fixture(name="saved")
def _saved(tmp_path):
  mesh = _mesh((8,), ("x",))
  state = {"a": jax.device_put(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32),
                               NamedSharding(mesh, P("x"))),
           "b": {"c": jnp.ones((8,), jnp.bfloat16)}}
  ck.save(tmp_path / "c", state, ck.CheckpointOptions(io="posix", **SMALL))
  return tmp_path / "c", state


def test_missing_and_uncommitted_checkpoints_do_not_restore(tmp_path, saved):
  path, state = saved
  with pytest.raises(ck.CheckpointError, match="does not exist"):
    ck.restore(tmp_path / "nope", state)
  os.remove(path / _format.MARKER)
  with pytest.raises(ck.CheckpointError, match="not a committed"):
    ck.restore(path, state)
  assert ck.committed(tmp_path) == []
  assert ck.remove_uncommitted(tmp_path) == [str(path)]


def test_a_committed_checkpoint_is_not_overwritten(saved):
  path, state = saved
  with pytest.raises(FileExistsError):
    ck.save(path, state)


def test_flipped_byte_is_detected_with_the_leaf_name(saved):
  path, state = saved
  index = _format.read_index(path)
  shard = next(s for s in index["shards"] if s["leaf"] == 0 and s["box"][0] == [24, 32])
  with open(path / shard["file"], "r+b") as f:
    f.seek(shard["offset"] + 100)
    byte = f.read(1)
    f.seek(shard["offset"] + 100)
    f.write(bytes([byte[0] ^ 0x10]))
  with pytest.raises(ck.CorruptCheckpointError, match=r"leaf \['a'\]: CRC-32C mismatch"):
    ck.restore(path, state)  # same sharding: whole shards
  target = dict(state, a=jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=NamedSharding(
      _mesh((2, 2), ("p", "q")), P("p", "q"))))
  with pytest.raises(ck.CorruptCheckpointError, match=r"leaf \['a'\]"):
    ck.restore(path, target)  # resharded: partial shards
  # Without verification the damage goes unnoticed: that is what verify is for.
  bad = ck.restore(path, state, ck.CheckpointOptions(verify=False))
  assert not np.array_equal(np.asarray(bad["a"]), np.asarray(state["a"]))


def test_truncated_data_file_names_the_leaf(saved):
  path, state = saved
  index = _format.read_index(path)
  shard = next(s for s in index["shards"] if s["leaf"] == 0)
  name = path / shard["file"]
  os.truncate(name, os.path.getsize(name) - 1)
  with pytest.raises(ck.CorruptCheckpointError, match=r"leaf \['a'\]: data file .* truncated"):
    ck.restore(path, state)


def test_damaged_index_is_detected(saved):
  path, state = saved
  data = json.loads((path / _format.INDEX).read_text())
  data["leaves"][0]["shape"] = [64, 33]
  (path / _format.INDEX).write_text(json.dumps(data))
  with pytest.raises(ck.CorruptCheckpointError, match="index is damaged"):
    ck.restore(path, state)


def test_changed_structure_dtype_and_shape_are_named(saved):
  path, state = saved
  with pytest.raises(ValueError, match=r"not in the checkpoint: \[\"\['b'\]\['d'\]\"\].*only in "
                                       r"the checkpoint: \[\"\['b'\]\['c'\]\"\]"):
    ck.restore(path, {"a": state["a"], "b": {"d": state["b"]["c"]}})
  with pytest.raises(ValueError, match=r"leaf \['b'\]\['c'\]: the target dtype float32 does not "
                                       r"match the saved dtype bfloat16"):
    ck.restore(path, {"a": state["a"], "b": {"c": jnp.ones((8,), jnp.float32)}})
  with pytest.raises(ValueError, match=r"leaf \['a'\]: the target shape \(32, 64\) does not "
                                       r"match the saved shape \(64, 32\)"):
    ck.restore(path, {"a": jax.ShapeDtypeStruct((32, 64), jnp.float32), "b": state["b"]})
  with pytest.raises(ValueError, match=r"leaf \['b'\]\['c'\]: the checkpoint holds an array"):
    ck.restore(path, {"a": state["a"], "b": {"c": 1.0}})


def test_unsupported_leaves_and_options_are_rejected(tmp_path):
  with pytest.raises(TypeError, match=r"leaf \['f'\]: cannot checkpoint a function"):
    ck.save(tmp_path / "c", {"f": lambda: 0})
  assert not os.path.exists(tmp_path / "c") and ck.committed(tmp_path) == []
  with pytest.raises(ValueError, match="block_bytes"):
    ck.CheckpointOptions(block_bytes=1000)
  with pytest.raises(ValueError, match="io must be"):
    ck.CheckpointOptions(io="nfs")


# -- multiple processes -----------------------------------------------------------

def save_in_two_processes(directory):
  """Runs in each of 2 processes x 4 devices: saves a state sharded over all 8."""
  import jax  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
  import numpy as np  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported

  from jaxinfra import checkpoint as ck  # pylint: disable=g-import-not-at-top,redefined-outer-name,reimported

  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  full = np.arange(64 * 24, dtype=np.float32).reshape(64, 24)
  sharding = NamedSharding(mesh, P("x"))
  state = {"w": jax.make_array_from_callback(full.shape, sharding, lambda i: full[i]),
           "b": jax.make_array_from_callback((8,), NamedSharding(mesh, P()),
                                             lambda i: np.arange(8, dtype=np.int32)[i]),
           "step": 5}
  options = ck.CheckpointOptions(block_bytes=4096, chunk_bytes=8192)
  ck.save(directory + "/two", state, options)
  # Restore across both processes onto a transposed 2D mesh: each reads only its half.
  mesh2 = jax.make_mesh((2, 4), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  target = {"w": jax.ShapeDtypeStruct(full.shape, full.dtype,
                                      sharding=NamedSharding(mesh2, P("b", "a"))),
            "b": state["b"], "step": 0}
  ckpt = ck.Checkpointer(ck.CheckpointOptions(verify=False))
  got = ckpt.restore(directory + "/two", target)
  for shard in got["w"].addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
  return {"bytes_read": ckpt.last_restore_stats["bytes_read"], "step": got["step"]}


@pytest.mark.multiprocess
def test_two_processes_save_one_process_restores(tmp_path):
  results = run_multiprocess(save_in_two_processes, num_processes=2, devices_per_process=4,
                             args=[str(tmp_path)])
  full = np.arange(64 * 24, dtype=np.float32).reshape(64, 24)
  # Each process read its half of w (plus the replicated b), not the whole array.
  assert [r["bytes_read"] for r in results] == [full.nbytes // 2 + 32] * 2
  assert [r["step"] for r in results] == [5, 5]
  index = _format.read_index(tmp_path / "two")
  assert index["process_count"] == 2
  assert {s["file"].split(".")[1] for s in index["shards"]} == {"p0", "p1"}
  sharding = NamedSharding(_mesh((2, 2), ("a", "b")), P(None, "a"))  # 4 devices, 1 process
  got = ck.restore(tmp_path / "two", {
      "w": jax.ShapeDtypeStruct(full.shape, full.dtype, sharding=sharding),
      "b": np.zeros(8, np.int32), "step": 0})
  np.testing.assert_array_equal(np.asarray(got["w"]), full)
  np.testing.assert_array_equal(got["b"], np.arange(8, dtype=np.int32))
  assert got["step"] == 5
