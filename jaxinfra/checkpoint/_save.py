"""Writing one process's part of a checkpoint.

:func:`start_part` runs in the caller's thread: it describes the tree, plans
where each owned shard goes (file, 4 KiB-aligned offset), and copies shards
from device into the engine's staging arena (blocking while the host-memory
budget is used up). A background thread waits for the directory, computes
each block's CRC-32C and issues the writes; :meth:`PendingPart.finish` waits
for all of it, fsyncs and closes the data files, and publishes
``index.p<P>.json`` (atomically) as the process's "done" signal.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import math
import os
import queue
import threading
import time
from typing import Any

import jax
import numpy as np

from jaxinfra.checkpoint import _crc, _engine, _format

_SCALARS = (bool, int, float, str)


@dataclasses.dataclass(frozen=True)
class CheckpointOptions:
  """How checkpoints are written and read.

  Attributes:
    io: ``"auto"`` (USRBIO on a 3FS mount when the library loads, else POSIX),
      ``"posix"`` or ``"usrbio"`` (an error off 3FS).
    host_budget_bytes: staging host memory of a save (and of USRBIO reads); a
      save blocks in its synchronous part while this is used up. At least the
      largest shard is always admitted.
    chunk_bytes: size of one write or read request.
    block_bytes: CRC-32C granularity inside a shard (a multiple of 4 KiB).
    files_per_process: data files each process writes in parallel.
    max_inflight: requests in flight (POSIX threads; USRBIO ring entries).
    usrbio_library: path of ``libhf3fs_api_shared.so`` (default: search).
    io_timeout: seconds before an unfinished USRBIO request is an error.
    verify: on restore, check the CRC-32C of everything read (reads are then
      rounded out to whole ``block_bytes`` blocks); False reads exactly the
      bytes each target shard needs, unchecked.
    commit_timeout: seconds to wait for the other processes' parts.
  """
  io: str = "auto"
  host_budget_bytes: int = 1 << 30
  chunk_bytes: int = 8 << 20
  block_bytes: int = 1 << 20
  files_per_process: int = 4
  max_inflight: int = 16
  usrbio_library: str | None = None
  io_timeout: float = 120.0
  verify: bool = True
  commit_timeout: float = 600.0

  def __post_init__(self):
    if self.io not in ("auto", "posix", "usrbio"):
      raise ValueError(f"io must be 'auto', 'posix' or 'usrbio', got {self.io!r}")
    if self.block_bytes <= 0 or self.block_bytes % _format.ALIGN:
      raise ValueError(f"block_bytes must be a positive multiple of {_format.ALIGN}, "
                       f"got {self.block_bytes}")
    if self.chunk_bytes < self.block_bytes or self.chunk_bytes % self.block_bytes:
      raise ValueError(f"chunk_bytes must be a multiple of block_bytes={self.block_bytes}, "
                       f"got {self.chunk_bytes}")
    if self.files_per_process < 1 or self.max_inflight < 1 or self.host_budget_bytes < 1:
      raise ValueError("files_per_process, max_inflight and host_budget_bytes must be positive")


@dataclasses.dataclass
class _Owned:
  leaf: int
  box: _format.Box
  data: Any          # a jax single-device array or a numpy array
  dtype: np.dtype
  nbytes: int
  file: int = 0
  offset: int = 0


def _sharding_record(sharding: Any) -> dict | None:
  if isinstance(sharding, jax.sharding.NamedSharding):
    mesh = sharding.mesh
    spec = [list(p) if isinstance(p, tuple) else p for p in sharding.spec]
    return {"mesh_shape": [int(s) for s in mesh.devices.shape],
            "axis_names": [str(n) for n in mesh.axis_names],
            "axis_types": [t.name for t in getattr(mesh, "axis_types", ())],
            "spec": spec}
  return None


def describe(tree: Any) -> tuple[list[dict], list[_Owned]]:
  """Leaf records for the index, and the shards this process writes."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  leaves, owned = [], []
  me = jax.process_index()
  for i, (path, value) in enumerate(flat):
    name = jax.tree_util.keystr(path)
    record = {"path": name, "keys": [_format.key_entry(k) for k in path]}
    if isinstance(value, jax.Array):
      record.update(kind="array", shape=list(value.shape), dtype=_format.dtype_name(value.dtype),
                    sharding=_sharding_record(value.sharding))
      for shard in value.addressable_shards:
        if shard.replica_id == 0:
          box = _format.box_from_index(shard.index, value.shape)
          owned.append(_Owned(i, box, shard.data, np.dtype(value.dtype),
                              math.prod(_format.box_shape(box)) * value.dtype.itemsize))
    elif isinstance(value, (np.ndarray, np.generic)):
      array = np.asarray(value)
      if array.dtype.hasobject or array.dtype.kind in "OUSV":
        raise TypeError(f"leaf {name}: numpy dtype {array.dtype} cannot be checkpointed")
      record.update(kind="numpy", shape=list(array.shape), dtype=_format.dtype_name(array.dtype))
      if me == 0:
        box = tuple((0, d) for d in array.shape)
        owned.append(_Owned(i, box, array, array.dtype, array.nbytes))
    elif isinstance(value, _SCALARS):
      record.update(kind="scalar", type=type(value).__name__, value=value)
    else:
      raise TypeError(f"leaf {name}: cannot checkpoint a {type(value).__name__} (supported: "
                      "jax.Array, numpy arrays and scalars, bool, int, float, str)")
    leaves.append(record)
  return leaves, owned


def plan(owned: list[_Owned], files: int) -> list[int]:
  """Assigns each shard a file (the least filled) and an aligned offset; file sizes."""
  ends = [0] * files
  for shard in sorted(owned, key=lambda s: -s.nbytes):
    if shard.nbytes == 0:  # nothing to write
      continue
    f = min(range(files), key=lambda k: (ends[k], k))
    offset = -(-ends[f] // _format.ALIGN) * _format.ALIGN
    shard.file, shard.offset = f, offset
    ends[f] = offset + shard.nbytes
  return ends


class PendingPart:
  """One process's save in flight; :meth:`finish` completes it."""

  def __init__(self, directory: str, leaves: list[dict], owned: list[_Owned],
               ends: list[int], options: CheckpointOptions, engine: _engine.Engine):
    self.directory = directory
    self.options = options
    self.engine = engine
    self._leaves = leaves
    self._owned = owned
    self._ends = ends
    self._handles: dict[int, _engine.FileHandle] = {}
    self._records: list[dict | None] = [None] * len(owned)
    self._queue: queue.Queue = queue.Queue()
    self._crc_pool = concurrent.futures.ThreadPoolExecutor(
        max(2, min(8, options.max_inflight)), thread_name_prefix="jaxinfra-crc")
    self._error: BaseException | None = None
    self._thread = threading.Thread(target=self._writer, daemon=True,
                                    name="jaxinfra-checkpoint-writer")
    self._thread.start()
    self.staged_seconds = 0.0
    self.stats: dict = {}

  # Caller's thread ---------------------------------------------------------
  def _direct(self, shard: _Owned) -> np.ndarray | None:
    """A CPU shard's bytes, zero-copy, when POSIX can write them in place.

    On CPU devices, device memory is host memory: ``np.asarray`` is a view that
    keeps the buffer alive (a later ``delete`` or donation does not free or
    reuse it), so there is nothing to stage.
    """
    if self.engine.name != "posix" or not isinstance(shard.data, jax.Array):
      return None
    if any(d.platform != "cpu" for d in shard.data.devices()):
      return None
    view = np.asarray(shard.data)
    return view if view.flags.c_contiguous else None

  def stage_all(self) -> None:
    """Copies every owned shard into the arena and queues it (blocks on the budget);
    CPU shards on the POSIX path are queued as zero-copy views instead."""
    start = time.perf_counter()
    try:
      for i, shard in enumerate(self._owned):
        if shard.nbytes == 0:
          self._queue.put((i, None))
          continue
        direct = self._direct(shard)
        if direct is not None:
          shard.data = None
          self._queue.put((i, direct))
          continue
        offset = self.engine.arena.alloc(shard.nbytes)
        view = np.frombuffer(self.engine.arena.memory, np.uint8, shard.nbytes, offset)
        host = np.asarray(shard.data)  # device to host (a view on CPU)
        np.copyto(view.view(shard.dtype).reshape(host.shape), host, casting="no")
        shard.data = None  # drop the device reference
        self._queue.put((i, offset))
    finally:
      self._queue.put(None)
      self.staged_seconds = time.perf_counter() - start

  # Writer thread ---------------------------------------------------------------
  def _wait_for_directory(self) -> None:
    deadline = time.monotonic() + self.options.commit_timeout
    while not os.path.isdir(self.directory):
      if time.monotonic() > deadline:
        raise TimeoutError(f"{self.directory} was not created in time")
      time.sleep(0.005)

  def _handle(self, f: int) -> _engine.FileHandle:
    if f not in self._handles:
      path = os.path.join(self.directory, _format.data_file_name(jax.process_index(), f))
      self._handles[f] = self.engine.open(path, write=True)
    return self._handles[f]

  def _checksum_and_write(self, i: int, source: int | np.ndarray) -> None:
    shard = self._owned[i]
    block = self.options.block_bytes
    if isinstance(source, np.ndarray):  # a zero-copy view of a CPU shard
      memory, offset = memoryview(source.reshape(-1).view(np.uint8)), 0
    else:
      memory, offset = self.engine.arena.memory, source
    blocks = [_crc.crc32c(memory[offset + a:offset + min(a + block, shard.nbytes)])
              for a in range(0, shard.nbytes, block)]
    self._records[i] = self._record(shard, blocks)
    if isinstance(source, np.ndarray):
      self.engine.write_view(self._handle(shard.file), shard.offset, memory, lambda: None)
    else:
      self.engine.write(self._handle(shard.file), shard.offset, source, shard.nbytes,
                        lambda: self.engine.arena.free(source, shard.nbytes))

  def _record(self, shard: _Owned, blocks: list[int]) -> dict:
    return {"leaf": shard.leaf, "box": [list(b) for b in shard.box],
            "file": _format.data_file_name(jax.process_index(), shard.file),
            "offset": shard.offset, "length": shard.nbytes,
            "crc32c": _crc.combine_blocks(blocks, shard.nbytes, self.options.block_bytes),
            "blocks": blocks}

  def _writer(self) -> None:
    futures = []
    try:
      waited = False
      while True:
        item = self._queue.get()
        if item is None:
          break
        if not waited:
          self._wait_for_directory()
          for f in range(len(self._ends)):  # open (create) every planned file up front
            if self._ends[f]:
              self._handle(f)
          waited = True
        i, source = item
        if source is None:
          self._records[i] = self._record(self._owned[i], [])
          continue
        futures.append(self._crc_pool.submit(self._checksum_and_write, i, source))
      for future in futures:
        future.result()
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e
      self.engine.fail(e)

  def finish(self) -> None:
    """Waits for the writes, fsyncs and closes the files, publishes the part index."""
    try:
      self._thread.join()
      self.stats = {"engine": self.engine.name, "bytes_written": self.engine.bytes_written,
                    "peak_staging_bytes": self.engine.arena.peak,
                    "staging_bytes": self.engine.arena.size}
      if self._error is not None:
        raise self._error
      self.engine.drain()
      self.stats["bytes_written"] = self.engine.bytes_written
      files = {}
      for f, handle in sorted(self._handles.items()):
        self.engine.close_file(handle, fsync=True)
        files[_format.data_file_name(jax.process_index(), f)] = self._ends[f]
      self._handles.clear()
      payload = {"format": _format.FORMAT, "process": jax.process_index(),
                 "block_bytes": self.options.block_bytes, "leaves": self._leaves,
                 "shards": self._records, "files": files}
      _format.write_json_atomic(
          os.path.join(self.directory, _format.part_index_name(jax.process_index())), payload)
    finally:
      self.close()

  def close(self) -> None:
    self._crc_pool.shutdown(wait=True)
    for handle in self._handles.values():
      try:
        self.engine.close_file(handle, fsync=False)
      except OSError:
        pass
    self._handles.clear()
    self.engine.close()


def start_part(directory: str, tree: Any, options: CheckpointOptions) -> PendingPart:
  """Plans this process's shards and stages them to host; returns the pending part.

  ``directory`` may not exist yet: writes start once it does.
  """
  leaves, owned = describe(tree)
  ends = plan(owned, options.files_per_process)
  largest = max((s.nbytes for s in owned), default=0)
  total = sum(-(-s.nbytes // _format.ALIGN) * _format.ALIGN for s in owned)
  budget = max(min(options.host_budget_bytes, total), largest, _format.ALIGN)
  budget = -(-budget // _format.ALIGN) * _format.ALIGN
  engine = _engine.make_engine(
      options.io, os.path.dirname(os.path.abspath(directory)), budget=budget,
      chunk_bytes=options.chunk_bytes, max_inflight=options.max_inflight,
      usrbio_library=options.usrbio_library, io_timeout=options.io_timeout)
  part = PendingPart(os.fspath(directory), leaves, owned, ends, options, engine)
  try:
    part.stage_all()
  except BaseException as e:
    part.engine.fail(RuntimeError("staging failed"))
    part._thread.join()  # pylint: disable=protected-access
    part.close()
    if isinstance(e, _engine.EngineFailed) and e.__cause__ is not None:
      raise e.__cause__ from None  # the I/O error that stopped the save
    raise
  return part
