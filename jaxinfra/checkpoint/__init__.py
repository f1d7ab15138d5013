"""Checkpoints at storage bandwidth: 3FS USRBIO or parallel POSIX I/O, any mesh on restore.

* :func:`save` / :func:`restore` / :class:`Checkpointer` (``save_async``,
  ``wait_until_finished``): jaxinfra's own commit protocol (temporary
  directory, fsync, rename, commit marker).
* :class:`Hf3fsCheckpointHandler` with :class:`Hf3fsSave` / :class:`Hf3fsRestore`:
  the same format inside Orbax (``AsyncCheckpointer``, ``CheckpointManager``).
* :mod:`jaxinfra.checkpoint.usrbio`: the ctypes binding of 3FS's USRBIO API.

Each process writes the shards it owns (replica 0) into its own data files,
with a CRC-32C per shard and per block; restore reads only the byte ranges
each target shard needs, so any mesh, PartitionSpec or process count works.
"""

from jaxinfra.checkpoint import usrbio
from jaxinfra.checkpoint._format import CheckpointError, CorruptCheckpointError, is_committed
from jaxinfra.checkpoint._save import CheckpointOptions
from jaxinfra.checkpoint.checkpointer import (Checkpointer, committed, remove_uncommitted,
                                              restore, save)
from jaxinfra.checkpoint.orbax_handler import Hf3fsCheckpointHandler, Hf3fsRestore, Hf3fsSave
from jaxinfra.checkpoint.usrbio import NotOn3FSError, UsrbioUnavailableError

__all__ = ["CheckpointError", "CheckpointOptions", "Checkpointer", "CorruptCheckpointError",
           "Hf3fsCheckpointHandler", "Hf3fsRestore", "Hf3fsSave", "NotOn3FSError",
           "UsrbioUnavailableError", "committed", "is_committed", "remove_uncommitted", "restore",
           "save", "usrbio"]
