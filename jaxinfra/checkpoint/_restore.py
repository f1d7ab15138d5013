"""Reading a checkpoint into any mesh.

For every ``jax.Array`` leaf, each distinct box that this process's devices
need (``sharding.addressable_devices_indices_map``) is assembled from the
saved shards it intersects. A saved shard is one C-order byte range, so the
intersection is a set of equal-length runs (:func:`_format.runs`): only those
bytes are read (``verify=False``), or those bytes rounded out to the CRC
blocks that contain them, which are then checked (``verify=True``, the
default). A box that is exactly one saved shard is read straight into its
host buffer. Boxes are then ``device_put`` and assembled with
``jax.make_array_from_single_device_arrays``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxinfra.checkpoint import _crc, _engine, _format
from jaxinfra.checkpoint._save import CheckpointOptions


@dataclasses.dataclass
class _Target:
  kind: str                     # "array" (jax.Array), "numpy" or "scalar"
  sharding: Any = None


def _sharding_from_record(record: dict | None, name: str) -> Any:
  if record is not None and math.prod(record["mesh_shape"]) == jax.device_count():
    types = record.get("axis_types") or []
    kwargs = {}
    if len(types) == len(record["axis_names"]):
      kwargs["axis_types"] = tuple(jax.sharding.AxisType[t] for t in types)
    mesh = jax.make_mesh(tuple(record["mesh_shape"]), tuple(record["axis_names"]), **kwargs)
    spec = [tuple(p) if isinstance(p, list) else p for p in record["spec"]]
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
  if jax.process_count() == 1:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  raise ValueError(f"leaf {name}: the saved sharding does not fit {jax.device_count()} devices; "
                   "pass a target (jax.ShapeDtypeStruct with a sharding) for it")


def _targets_without_tree(index: dict) -> list[_Target]:
  out = []
  for leaf in index["leaves"]:
    if leaf["kind"] == "array":
      out.append(_Target("array", _sharding_from_record(leaf.get("sharding"), leaf["path"])))
    else:
      out.append(_Target(leaf["kind"]))
  return out


def _check_structure(index: dict, target: Any) -> tuple[list, Any]:
  flat, treedef = jax.tree_util.tree_flatten_with_path(target)
  saved = [leaf["path"] for leaf in index["leaves"]]
  wanted = [jax.tree_util.keystr(path) for path, _ in flat]
  if saved != wanted:
    missing = [p for p in wanted if p not in saved]
    extra = [p for p in saved if p not in wanted]
    raise ValueError("the target tree's structure differs from the checkpoint's: "
                     f"leaves not in the checkpoint: {missing or 'none'}; leaves only in the "
                     f"checkpoint: {extra or 'none'}"
                     + ("" if missing or extra else "; the leaf order differs"))
  return [value for _, value in flat], treedef


def _target_of(leaf: dict, value: Any) -> _Target:
  name = leaf["path"]
  if leaf["kind"] == "scalar":
    if not isinstance(value, (bool, int, float, str)) or type(value).__name__ != leaf["type"]:
      raise ValueError(f"leaf {name}: the checkpoint holds a {leaf['type']} scalar, the target "
                       f"a {type(value).__name__}")
    return _Target("scalar")
  if isinstance(value, (bool, int, float, str)):
    raise ValueError(f"leaf {name}: the checkpoint holds an array, the target a "
                     f"{type(value).__name__}")
  shape = tuple(getattr(value, "shape", ()))
  dtype = getattr(value, "dtype", None)
  if dtype is None:
    raise ValueError(f"leaf {name}: a target leaf must be a jax.Array, jax.ShapeDtypeStruct, "
                     f"numpy array or scalar, got {type(value).__name__}")
  if tuple(leaf["shape"]) != shape:
    raise ValueError(f"leaf {name}: the target shape {shape} does not match the saved shape "
                     f"{tuple(leaf['shape'])}")
  if _format.dtype_name(dtype) != leaf["dtype"]:
    raise ValueError(f"leaf {name}: the target dtype {_format.dtype_name(dtype)} does not match "
                     f"the saved dtype {leaf['dtype']}")
  if isinstance(value, (np.ndarray, np.generic)):
    return _Target("numpy")
  sharding = getattr(value, "sharding", None)
  if sharding is None:
    sharding = _sharding_from_record(leaf.get("sharding"), name)
  return _Target("array", sharding)


class _Reader:
  """Plans reads for host boxes, runs them through the engine, then checks and places."""

  def __init__(self, directory: str, index: dict, options: CheckpointOptions,
               engine: _engine.Engine):
    self.directory = directory
    self.index = index
    self.options = options
    self.engine = engine
    self.block = index["block_bytes"]
    self.handles: dict[str, _engine.FileHandle] = {}
    self.by_leaf: dict[int, list[dict]] = {}
    for shard in index["shards"]:
      self.by_leaf.setdefault(shard["leaf"], []).append(shard)
    self.requests: list = []
    self.after: list[Callable[[], None]] = []

  def _handle(self, name: str, leaf: str) -> _engine.FileHandle:
    if name not in self.handles:
      path = os.path.join(self.directory, name)
      try:
        size = os.stat(path).st_size
      except FileNotFoundError as e:
        raise _format.CorruptCheckpointError(f"leaf {leaf}: data file {path} is missing") from e
      if size < self.index["files"][name]:
        raise _format.CorruptCheckpointError(
            f"leaf {leaf}: data file {path} is truncated ({size} of "
            f"{self.index['files'][name]} bytes)")
      self.handles[name] = self.engine.open(path, write=False)
    return self.handles[name]

  def box(self, leaf_id: int, box: _format.Box) -> np.ndarray:
    """A host array for ``box`` of leaf ``leaf_id``, filled after :meth:`run`."""
    leaf = self.index["leaves"][leaf_id]
    dtype = _format.dtype_from_name(leaf["dtype"])
    out = np.empty(_format.box_shape(box), dtype)
    for shard in self.by_leaf.get(leaf_id, []):
      saved = tuple(tuple(b) for b in shard["box"])
      inter = _format.intersect(saved, box)
      if inter is None:
        continue
      self._plan(leaf, shard, saved, inter, box, out, dtype)
    return out

  def _plan(self, leaf, shard, saved, inter, box, out, dtype) -> None:
    name = leaf["path"]
    handle = self._handle(shard["file"], name)
    itemsize = dtype.itemsize
    if inter == saved == box:  # one whole shard, straight into place
      dest = out.reshape(-1).view(np.uint8)
      self.requests.append((handle, shard["offset"], dest))
      if self.options.verify:
        self.after.append(lambda: self._verify(name, shard, dest, 0, None))
      return
    lo = [a - s for (a, _), (s, _) in zip(inter, saved)]
    hi = [b - s for (_, b), (s, _) in zip(inter, saved)]
    starts, length = _format.runs(_format.box_shape(saved), lo, hi)
    byte_starts, byte_len = starts * itemsize, length * itemsize
    # A shard-sized buffer: only the pages read into are ever touched.
    staging = np.empty(shard["length"], np.uint8)
    if self.options.verify:
      nblocks = -(-shard["length"] // self.block)
      needed = np.zeros(nblocks + 1, np.int64)
      np.add.at(needed, byte_starts // self.block, 1)
      np.add.at(needed, (byte_starts + byte_len - 1) // self.block + 1, -1)
      wanted = np.cumsum(needed[:-1]) > 0
      spans = _true_runs(wanted)
      for b0, b1 in spans:
        a, b = b0 * self.block, min(b1 * self.block, shard["length"])
        self.requests.append((handle, shard["offset"] + a, staging[a:b]))
      self.after.append(lambda: self._verify(name, shard, staging, None, spans))
    else:
      for s in _merge(byte_starts, byte_len):
        self.requests.append((handle, shard["offset"] + s[0], staging[s[0]:s[1]]))
    dst = tuple(slice(a - b0, b - b0) for (a, b), (b0, _) in zip(inter, box))
    src = tuple(slice(a, b) for a, b in zip(lo, hi))
    shape = _format.box_shape(saved)
    self.after.append(lambda: out.__setitem__(dst, staging.view(dtype).reshape(shape)[src]))

  def _verify(self, name, shard, data, _unused, spans) -> None:
    blocks = shard["blocks"]
    length = shard["length"]
    ranges = spans if spans is not None else [(0, len(blocks))]
    for b0, b1 in ranges:
      for i in range(b0, b1):
        a, b = i * self.block, min((i + 1) * self.block, length)
        if _crc.crc32c(data[a:b]) != blocks[i]:
          raise _format.CorruptCheckpointError(
              f"leaf {name}: CRC-32C mismatch in {shard['file']} at bytes "
              f"[{shard['offset'] + a}, {shard['offset'] + b}) (the data file is damaged)")
    if spans is None and _crc.combine_blocks(blocks, length, self.block) != shard["crc32c"]:
      raise _format.CorruptCheckpointError(f"leaf {name}: shard CRC-32C mismatch in "
                                           f"{shard['file']} at offset {shard['offset']}")

  def read(self) -> list[Callable[[], None]]:
    """Reads everything planned so far; returns the checks and copies still to run."""
    try:
      self.engine.read(self.requests)
    except _engine.EngineFailed as e:
      raise _format.CorruptCheckpointError(f"reading the checkpoint failed: {e}") from e
    except OSError as e:
      names = sorted({self.index['leaves'][s['leaf']]['path'] for s in self.index['shards']
                      if any(h.path.endswith(s['file']) for h in self.handles.values())})
      raise _format.CorruptCheckpointError(f"reading leaves {names} failed: {e}") from e
    steps, self.requests, self.after = self.after, [], []
    return steps

  def run(self) -> None:
    _run_parallel(self.read())

  def close(self) -> None:
    for handle in self.handles.values():
      self.engine.close_file(handle, fsync=False)
    self.handles.clear()


def _run_parallel(steps: list[Callable[[], None]]) -> None:
  """Runs checksum and copy steps (they release the GIL) on threads; raises the first error."""
  if len(steps) > 1:
    with concurrent.futures.ThreadPoolExecutor(
        min(8, len(steps)), thread_name_prefix="jaxinfra-verify") as pool:
      for future in [pool.submit(step) for step in steps]:
        future.result()
  elif steps:
    steps[0]()


def _true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
  edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
  return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


def _merge(starts: np.ndarray, length: int) -> list[tuple[int, int]]:
  out: list[list[int]] = []
  for s in starts.tolist():
    if out and out[-1][1] == s:
      out[-1][1] = s + length
    else:
      out.append([s, s + length])
  return [(a, b) for a, b in out]


def restore(directory: str, target: Any, options: CheckpointOptions,
            stats: dict | None = None) -> Any:
  """Reads the committed checkpoint at ``directory`` (see :func:`jaxinfra.checkpoint.restore`);
  ``stats`` (if given) receives ``bytes_read`` and ``engine``."""
  directory = os.fspath(directory)
  index = _format.read_index(directory)
  leaves = index["leaves"]
  if target is None:
    values = [None] * len(leaves)
    targets = _targets_without_tree(index)
    treedef = None
  else:
    values, treedef = _check_structure(index, target)
    targets = [_target_of(leaf, value) for leaf, value in zip(leaves, values)]
  total = sum(s["length"] for s in index["shards"])
  budget = max(min(options.host_budget_bytes, total), options.chunk_bytes, _format.ALIGN)
  budget = -(-budget // _format.ALIGN) * _format.ALIGN
  results: list[Any] = [None] * len(leaves)
  engine = _engine.make_engine(options.io, directory, budget=budget,
                               chunk_bytes=options.chunk_bytes, max_inflight=options.max_inflight,
                               usrbio_library=options.usrbio_library,
                               io_timeout=options.io_timeout)
  reader = _Reader(directory, index, options, engine)
  # Batches of about a quarter of the budget: while one batch is checked and put on
  # its devices (a background thread), the next one is read.
  batch_bytes = max(budget // 4, options.chunk_bytes)
  finisher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxinfra-place")
  finishing: list[concurrent.futures.Future] = []

  def flush(pending: list[Callable[[], None]]) -> None:
    steps = reader.read()
    if finishing:
      finishing[-1].result()  # at most one batch waits for placement
    finishing.append(finisher.submit(lambda: (_run_parallel(steps), [p() for p in pending])))

  try:
    pending: list[Callable[[], None]] = []
    planned = 0
    for i, (leaf, tgt) in enumerate(zip(leaves, targets)):
      if tgt.kind == "scalar":
        results[i] = leaf["value"]
        continue
      shape = tuple(leaf["shape"])
      if tgt.kind == "numpy" or leaf["kind"] == "numpy" and tgt.kind != "array":
        host = reader.box(i, tuple((0, d) for d in shape))
        pending.append(lambda i=i, host=host: results.__setitem__(i, host))
        planned += host.nbytes
      else:
        pending.append(_plan_array(reader, i, shape, tgt.sharding, results))
        planned += math.prod(shape) * _format.dtype_from_name(leaf["dtype"]).itemsize
      if planned >= batch_bytes:
        flush(pending)
        pending, planned = [], 0
    flush(pending)
    for future in finishing:
      future.result()
  finally:
    finisher.shutdown(wait=True)
    reader.close()
    engine.close()
    if stats is not None:
      stats.update(bytes_read=engine.bytes_read, engine=engine.name)
  if treedef is None:
    return _format.rebuild_tree([leaf["keys"] for leaf in leaves], results)
  return jax.tree_util.tree_unflatten(treedef, results)


def _plan_array(reader: _Reader, i: int, shape: tuple[int, ...], sharding: Any,
                results: list) -> Callable[[], None]:
  index_map = sharding.addressable_devices_indices_map(shape)
  hosts: dict[_format.Box, np.ndarray] = {}
  placement = []
  for device, index in index_map.items():
    box = _format.box_from_index(index, shape)
    if box not in hosts:
      hosts[box] = reader.box(i, box)
    placement.append((device, box))

  def place() -> None:
    arrays = [jax.device_put(hosts[box], device) for device, box in placement]
    results[i] = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
  return place
