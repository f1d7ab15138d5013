"""Standalone save/restore with an atomic commit, and asynchronous saves.

Commit protocol of ``save(path, tree)``:

1. process 0 removes leftovers (an uncommitted ``path``, stale temporaries)
   and creates ``<parent>/.<name>.tmp-<nonce>`` (the nonce is broadcast);
2. every process copies its shards to host (the synchronous part), then in
   the background writes its data files, fsyncs them and publishes
   ``index.p<P>.json``;
3. process 0 waits for every part, writes the merged ``index.json`` (fsync),
   fsyncs the directory, renames it to ``path``, fsyncs the parent, and
   writes the commit marker ``JAXINFRA_COMMITTED`` (temporary file, fsync,
   rename, fsync).

Only a directory with the marker restores; a writer killed at any point leaves
the previous checkpoints untouched and nothing that restores.
"""

from __future__ import annotations

import os
import secrets
import shutil
import threading
import time
from typing import Any

import jax
import numpy as np

from jaxinfra.checkpoint import _format, _restore, _save
from jaxinfra.checkpoint._save import CheckpointOptions

TMP_TAG = ".tmp-"


def _broadcast_nonce(nonce: str) -> str:
  if jax.process_count() == 1:
    return nonce
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  raw = np.frombuffer(bytes.fromhex(nonce), np.uint8).astype(np.int32)
  raw = np.asarray(multihost_utils.broadcast_one_to_all(raw))
  return bytes(raw.astype(np.uint8).tolist()).hex()


def _wait_for(paths: list[str], timeout: float, what: str) -> None:
  deadline = time.monotonic() + timeout
  while not all(os.path.exists(p) for p in paths):
    if time.monotonic() > deadline:
      missing = [p for p in paths if not os.path.exists(p)]
      raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}: {missing}")
    time.sleep(0.01)


def finalize(directory: str, options: CheckpointOptions, *, process_count: int) -> int:
  """Merges the per-process indexes of ``directory`` into ``index.json`` (fsync'd);
  returns the index's CRC-32C."""
  parts = [os.path.join(directory, _format.part_index_name(p)) for p in range(process_count)]
  _wait_for(parts, options.commit_timeout, "every process's part of the checkpoint")
  merged = _format.merge_parts(directory, process_count)
  return _format.write_json_atomic(os.path.join(directory, _format.INDEX), merged)


def remove_uncommitted(root: str | os.PathLike) -> list[str]:
  """Deletes the uncommitted checkpoints and temporaries directly under ``root``."""
  removed = []
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name)
    if os.path.isdir(path) and (TMP_TAG in name or not _format.is_committed(path)):
      if TMP_TAG in name or os.path.exists(os.path.join(path, _format.INDEX)) or any(
          n.startswith(("index.p", "data.p")) for n in os.listdir(path)):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
  return removed


def committed(root: str | os.PathLike) -> list[str]:
  """Names of the committed checkpoints directly under ``root``, sorted."""
  return sorted(n for n in os.listdir(root)
                if TMP_TAG not in n and _format.is_committed(os.path.join(root, n)))


class Checkpointer:
  """Saves and restores pytrees of ``jax.Array``s (and numpy arrays, scalars).

  ``save_async`` returns after the device-to-host copy (bounded by
  ``options.host_budget_bytes``); the writes and the commit run in a
  background thread while training continues. One save is in flight at a
  time: a new save first waits for the previous one. Every process calls
  every method (collectively).
  """

  def __init__(self, options: CheckpointOptions | None = None):
    self.options = options or CheckpointOptions()
    self._thread: threading.Thread | None = None
    self._error: BaseException | None = None
    self.last_save_stats: dict[str, Any] = {}
    self.last_restore_stats: dict[str, Any] = {}

  def save(self, path: str | os.PathLike, tree: Any) -> None:
    """Saves ``tree`` to ``path`` and waits for the commit."""
    self.save_async(path, tree)
    self.wait_until_finished()

  def save_async(self, path: str | os.PathLike, tree: Any) -> None:
    """Starts saving ``tree`` to ``path``; returns once the shards are on the host."""
    self.wait_until_finished()
    final = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(final)
    started = time.perf_counter()
    nonce = secrets.token_hex(8)
    if jax.process_index() == 0:
      if os.path.exists(final):
        if _format.is_committed(final):
          raise FileExistsError(f"a committed checkpoint already exists at {final}")
        shutil.rmtree(final)  # an interrupted save's leftover
      os.makedirs(parent, exist_ok=True)
      for stale in os.listdir(parent):
        if stale.startswith(f".{name}{TMP_TAG}"):
          shutil.rmtree(os.path.join(parent, stale), ignore_errors=True)
    tmp = os.path.join(parent, f".{name}{TMP_TAG}{nonce}")
    if jax.process_index() == 0:
      os.makedirs(tmp)
    tmp = os.path.join(parent, f".{name}{TMP_TAG}{_broadcast_nonce(nonce)}")
    try:
      part = _save.start_part(tmp, tree, self.options)
    except BaseException:
      self._discard(tmp)
      raise
    staged = time.perf_counter()
    self.last_save_stats = {"blocking_seconds": staged - started}

    def commit() -> None:
      try:
        part.finish()
        marker = os.path.join(final, _format.MARKER)
        if jax.process_index() == 0:
          index_crc = finalize(tmp, self.options, process_count=jax.process_count())
          _format.fsync_dir(tmp)
          os.rename(tmp, final)
          _format.fsync_dir(parent)
          _format.write_marker(final, index_crc)
        else:
          _wait_for([marker], self.options.commit_timeout, "process 0's commit")
        self.last_save_stats.update(part.stats, total_seconds=time.perf_counter() - started)
      except BaseException as e:  # pylint: disable=broad-except
        self._error = e
        self._discard(tmp)

    self._thread = threading.Thread(target=commit, daemon=True, name="jaxinfra-checkpoint-commit")
    self._thread.start()

  @staticmethod
  def _discard(tmp: str) -> None:
    """Best-effort removal of a failed save's temporary directory (process 0)."""
    if jax.process_index() == 0:
      shutil.rmtree(tmp, ignore_errors=True)

  def wait_until_finished(self) -> None:
    """Waits for the save in flight; raises its error, if any."""
    if self._thread is not None:
      self._thread.join()
      self._thread = None
    if self._error is not None:
      error, self._error = self._error, None
      raise error

  def restore(self, path: str | os.PathLike, target: Any = None) -> Any:
    """Restores the committed checkpoint at ``path``.

    Args:
      path: a directory written by :meth:`save`.
      target: a pytree like the saved one whose leaves say what to build:
        ``jax.Array`` or ``jax.ShapeDtypeStruct`` (its sharding, any mesh),
        numpy arrays (restored to host), scalars. Shapes and dtypes must match
        the checkpoint. None: the saved tree as nested dicts/lists, arrays on
        the saved mesh when the device count matches (else on one device).

    Raises:
      CheckpointError: no committed checkpoint at ``path``.
      CorruptCheckpointError: a CRC-32C mismatch or a truncated data file
        (the message names the leaf).
      ValueError: the target's structure, a shape or a dtype differs (named).
    """
    self.last_restore_stats = {}
    return _restore.restore(os.fspath(path), target, self.options, self.last_restore_stats)

  def close(self) -> None:
    self.wait_until_finished()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def save(path: str | os.PathLike, tree: Any, options: CheckpointOptions | None = None) -> None:
  """Saves ``tree`` to ``path`` with an atomic commit (see :class:`Checkpointer`)."""
  Checkpointer(options).save(path, tree)


def restore(path: str | os.PathLike, target: Any = None,
            options: CheckpointOptions | None = None) -> Any:
  """Restores the checkpoint at ``path`` (see :meth:`Checkpointer.restore`)."""
  return Checkpointer(options).restore(path, target)
