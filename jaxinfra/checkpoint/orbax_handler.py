"""An Orbax (v0) checkpoint handler writing jaxinfra's format through USRBIO or POSIX.

Usable wherever Orbax takes a handler: ``ocp.AsyncCheckpointer(handler)``,
``ocp.Checkpointer(handler)``, or ``ocp.CheckpointManager`` with
``Hf3fsSave``/``Hf3fsRestore`` args (by themselves or inside
``ocp.args.Composite``). Orbax owns the step directory, the temporary path
and its atomic rename; this handler writes each process's shards and index
into the directory it is given, and ``finalize`` merges the indexes and writes
the commit marker, without which the item does not restore.

Example::

    manager = ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(
        max_to_keep=3, enable_async_checkpointing=True),
        item_handlers=Hf3fsCheckpointHandler())
    manager.save(step, args=Hf3fsSave(state))
    state = manager.restore(step, args=Hf3fsRestore(abstract_state))
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxinfra.checkpoint import _format, _restore, _save, checkpointer
from jaxinfra.checkpoint._save import CheckpointOptions


class _ThreadFuture:
  """An Orbax ``Future`` running ``fn`` in a thread."""

  def __init__(self, fn):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxinfra-orbax")
    self._future = self._pool.submit(fn)
    self._pool.shutdown(wait=False)

  def result(self, timeout: float | None = None) -> Any:
    return self._future.result(timeout)


class Hf3fsCheckpointHandler(ocp.AsyncCheckpointHandler):
  """Saves pytrees of ``jax.Array`` (and numpy arrays, scalars) shard by shard.

  Args:
    options: I/O path, host memory budget, chunking, verification
      (:class:`jaxinfra.checkpoint.CheckpointOptions`).
  """

  def __init__(self, options: CheckpointOptions | None = None):
    self.options = options or CheckpointOptions()

  async def async_save(self, directory, args: "Hf3fsSave") -> list[Any]:
    """Copies this process's shards to host now; returns a future for the writes."""
    part = _save.start_part(os.fspath(directory), args.item, self.options)
    return [_ThreadFuture(part.finish)]

  def save(self, directory, args: "Hf3fsSave") -> None:
    part = _save.start_part(os.fspath(directory), args.item, self.options)
    part.finish()

  def finalize(self, directory) -> None:
    """On the primary process: merge the indexes, then write the commit marker."""
    if jax.process_index() != 0:
      return
    directory = os.fspath(directory)
    index_crc = checkpointer.finalize(directory, self.options, process_count=jax.process_count())
    _format.write_marker(directory, index_crc)

  def restore(self, directory, args: "Hf3fsRestore | None" = None) -> Any:
    target = args.item if args is not None else None
    return _restore.restore(os.fspath(directory), target, self.options)

  def metadata(self, directory) -> dict[str, Any]:
    """Leaf paths, kinds, shapes and dtypes of the committed checkpoint."""
    index = _format.read_index(os.fspath(directory))
    return {leaf["path"]: {k: leaf[k] for k in ("kind", "shape", "dtype", "value") if k in leaf}
            for leaf in index["leaves"]}

  def close(self) -> None:
    pass

  @classmethod
  def typestr(cls) -> str:
    return "jaxinfra.checkpoint.Hf3fsCheckpointHandler"


@ocp.args.register_with_handler(Hf3fsCheckpointHandler, for_save=True)
@dataclasses.dataclass
class Hf3fsSave(ocp.args.CheckpointArgs):
  """Save args: ``item`` is the pytree to save."""
  item: Any


@ocp.args.register_with_handler(Hf3fsCheckpointHandler, for_restore=True)
@dataclasses.dataclass
class Hf3fsRestore(ocp.args.CheckpointArgs):
  """Restore args: ``item`` is the target pytree (``jax.Array``/``ShapeDtypeStruct``
  leaves with shardings, numpy arrays, scalars), or None for the saved layout."""
  item: Any = None
