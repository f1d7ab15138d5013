"""The on-disk format: leaf records, shard boxes, the index, and byte runs.

A checkpoint directory holds

* ``data.p<P>.f<F>.bin``: process P's data files; each shard it owns (replica
  0) is one C-order byte range, starting at a 4 KiB-aligned offset;
* ``index.p<P>.json``: process P's shards (written last by P, atomically);
* ``index.json``: the merged index (leaves, shards, file sizes);
* ``JAXINFRA_COMMITTED``: the commit marker, holding the index's CRC-32C.

A shard record is ``{leaf, box, file, offset, length, crc32c, blocks}``: ``box``
is ``[[start, stop], ...]`` per dimension of the global array, ``crc32c`` the
CRC-32C of its bytes and ``blocks`` the CRC-32C of each ``block_bytes`` piece
(so a restore that needs part of a shard verifies what it reads).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra.checkpoint import _crc

FORMAT = "jaxinfra.checkpoint/1"
INDEX = "index.json"
MARKER = "JAXINFRA_COMMITTED"
ALIGN = 4096

Box = tuple[tuple[int, int], ...]


class CheckpointError(RuntimeError):
  """A checkpoint is missing, uncommitted, damaged or unreadable."""


class CorruptCheckpointError(CheckpointError):
  """Stored bytes fail their CRC-32C, or a data file is truncated."""


def part_index_name(process: int) -> str:
  return f"index.p{process}.json"


def data_file_name(process: int, file: int) -> str:
  return f"data.p{process}.f{file}.bin"


# -- tree keys ----------------------------------------------------------------

def key_entry(key: Any) -> list:
  """A JSON form of one pytree key (for rebuilding a tree without a target)."""
  if isinstance(key, jax.tree_util.DictKey):
    k = key.key
    return ["dict", k if isinstance(k, (str, int)) else str(k)]
  if isinstance(key, jax.tree_util.SequenceKey):
    return ["seq", key.idx]
  if isinstance(key, jax.tree_util.GetAttrKey):
    return ["attr", key.name]
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return ["flat", key.key]
  return ["other", str(key)]


def rebuild_tree(keys: Sequence[list], values: Sequence[Any]) -> Any:
  """Nested dicts/lists from leaf key paths (attributes become dict keys)."""
  if len(keys) == 1 and not keys[0]:
    return values[0]
  root: Any = None

  def container(kind):
    return [] if kind == "seq" else {}

  for path, value in zip(keys, values):
    if root is None:
      root = container(path[0][0])
    node = root
    for depth, (kind, key) in enumerate(path):
      last = depth == len(path) - 1
      child = value if last else container(path[depth + 1][0])
      if isinstance(node, list):
        while len(node) <= key:
          node.append(None)
        if node[key] is None:
          node[key] = child
        node = node[key]
      else:
        name = key if kind != "attr" else str(key)
        if name not in node:
          node[name] = child
        node = node[name]
  return root


# -- dtypes, boxes ---------------------------------------------------------------

def dtype_name(dtype: Any) -> str:
  return np.dtype(dtype).name


def dtype_from_name(name: str) -> np.dtype:
  return np.dtype(jnp.dtype(name))


def box_from_index(index: tuple, shape: Sequence[int]) -> Box:
  """A shard's ``index`` (tuple of slices) as ``((start, stop), ...)``."""
  out = []
  for dim, s in zip(shape, tuple(index) + (slice(None),) * (len(shape) - len(index))):
    start, stop, step = s.indices(dim)
    if step != 1:
      raise ValueError(f"strided shard index {index} is not supported")
    out.append((start, stop))
  return tuple(out)


def box_shape(box: Box) -> tuple[int, ...]:
  return tuple(b - a for a, b in box)


def intersect(a: Box, b: Box) -> Box | None:
  out = tuple((max(x0, y0), min(x1, y1)) for (x0, x1), (y0, y1) in zip(a, b))
  return out if all(lo < hi for lo, hi in out) else None


def runs(shape: Sequence[int], lo: Sequence[int], hi: Sequence[int]) -> tuple[np.ndarray, int]:
  """Contiguous element runs of the sub-box ``[lo, hi)`` of a C-order array of ``shape``.

  Returns ``(starts, length)``: the flat element offset of each run, in C order
  of the sub-box (so the runs, concatenated, are the sub-box in C order), and
  the common run length in elements.
  """
  n = len(shape)
  if n == 0:
    return np.zeros(1, np.int64), 1
  k = n - 1
  while k > 0 and lo[k] == 0 and hi[k] == shape[k]:
    k -= 1
  inner = math.prod(shape[k + 1:])
  length = (hi[k] - lo[k]) * inner
  strides = [math.prod(shape[d + 1:]) for d in range(n)]
  starts = np.asarray(lo[k] * strides[k], np.int64).reshape(())
  for d in range(k - 1, -1, -1):
    axis = np.arange(lo[d], hi[d], dtype=np.int64) * strides[d]
    starts = axis.reshape((-1,) + (1,) * starts.ndim) + starts
  return starts.reshape(-1), length


# -- index files -----------------------------------------------------------------

def fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def write_json_atomic(path: str, payload: Any) -> int:
  """Writes JSON through a temporary file, fsync and rename; returns its CRC-32C."""
  data = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
    f.flush()
    os.fsync(f.fileno())
  os.rename(tmp, path)
  fsync_dir(os.path.dirname(path) or ".")
  return _crc.crc32c(data)


def is_committed(directory: str | os.PathLike) -> bool:
  return os.path.isfile(os.path.join(directory, MARKER))


def read_index(directory: str | os.PathLike) -> dict:
  """The committed index of ``directory``; a :class:`CheckpointError` if there is none."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint at {directory!r}: the directory does not exist")
  marker = os.path.join(directory, MARKER)
  if not os.path.isfile(marker):
    raise CheckpointError(f"{directory!r} is not a committed jaxinfra checkpoint (no {MARKER}: "
                          "the save did not finish, or this is not a jaxinfra checkpoint)")
  with open(marker) as f:
    try:
      expected = json.load(f)["index_crc32c"]
    except (ValueError, KeyError) as e:
      raise CorruptCheckpointError(f"{marker!r} is damaged: {e}") from e
  path = os.path.join(directory, INDEX)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError as e:
    raise CorruptCheckpointError(f"{directory!r} is committed but has no {INDEX}") from e
  if _crc.crc32c(data) != expected:
    raise CorruptCheckpointError(f"{path!r} fails its CRC-32C (the index is damaged)")
  index = json.loads(data)
  if index.get("format") != FORMAT:
    raise CheckpointError(f"{path!r} has format {index.get('format')!r}, expected {FORMAT!r}")
  return index


def merge_parts(directory: str, process_count: int) -> dict:
  """Merges ``index.p*.json`` into one index and checks every array is covered."""
  parts = []
  for p in range(process_count):
    with open(os.path.join(directory, part_index_name(p))) as f:
      parts.append(json.load(f))
  merged = {k: v for k, v in parts[0].items() if k not in ("shards", "files", "process")}
  merged["process_count"] = process_count
  merged["shards"] = [s for part in parts for s in part["shards"]]
  merged["files"] = {name: size for part in parts for name, size in part["files"].items()}
  for part in parts[1:]:
    if part["leaves"] != merged["leaves"]:
      raise CheckpointError(f"process {part['process']} saved a different tree than process 0")
  _check_coverage(merged)
  return merged


def _check_coverage(index: dict) -> None:
  covered = [0] * len(index["leaves"])
  for shard in index["shards"]:
    covered[shard["leaf"]] += math.prod(b - a for a, b in shard["box"])
  for i, leaf in enumerate(index["leaves"]):
    if leaf["kind"] in ("array", "numpy"):
      size = math.prod(leaf["shape"])
      if covered[i] != size:
        raise CheckpointError(f"leaf {leaf['path']}: the saved shards cover {covered[i]} of "
                              f"{size} elements (a process's shards are missing or repeated)")


def write_marker(directory: str, index_crc: int) -> None:
  write_json_atomic(os.path.join(directory, MARKER), {"format": FORMAT, "index_crc32c": index_crc})
