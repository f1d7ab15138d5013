"""The USRBIO test double: a C library with 3FS's USRBIO ABI, for tests only.

``libjaxinfra_hf3fs_double.so`` (built from ``csrc/checkpoint/hf3fs_usrbio_double.c``
and installed next to this module) serves the USRBIO calls with ordinary file
I/O. A directory counts as a 3FS mount when it holds ``3fs-virt/``
(:func:`make_mount`). Faults are injected per I/O (:meth:`Double.inject`).

Example::

    double = usrbio_double.load()
    mount = usrbio_double.make_mount(tmp_path / "3fs")
    usrbio = jaxinfra.checkpoint.usrbio.load(double.path)
    double.inject(usrbio_double.EIO, usrbio_double.WRITE, after=3)
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import sys

LIBRARY = "libjaxinfra_hf3fs_double.so"

# Fault kinds and directions (hf3fs_double_inject).
NONE, EIO, SHORT, HANG = 0, 1, 2, 3
WRITE, READ, BOTH = 0, 1, 2


def library_path() -> str:
  """Where the double is installed (next to this module, or in an editable install's
  site-packages copy of ``jaxinfra/testing``)."""
  candidates = [os.path.join(os.path.dirname(os.path.abspath(__file__)), LIBRARY)]
  candidates += [os.path.join(p, "jaxinfra", "testing", LIBRARY) for p in sys.path if p]
  for candidate in candidates:
    if os.path.isfile(candidate):
      return candidate
  raise FileNotFoundError(f"{LIBRARY} not found (looked in {candidates[:3]} ...); "
                          "install jaxinfra with pip to build it")


def make_mount(path: str | os.PathLike) -> str:
  """Makes ``path`` a (test double) 3FS mount: creates ``path/3fs-virt/iovs``."""
  os.makedirs(os.path.join(path, "3fs-virt", "iovs"), exist_ok=True)
  return os.fspath(path)


@dataclasses.dataclass(frozen=True)
class Stats:
  ios: int
  bytes: int
  faults: int
  live_iovs: int
  live_rings: int


class Double:
  """Controls of the loaded double (faults, completion batching, counters)."""

  def __init__(self, path: str):
    self.path = path
    self._lib = ctypes.CDLL(path)
    self._lib.hf3fs_double_inject.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long,
                                              ctypes.c_long]
    self._lib.hf3fs_double_set_wait_cap.argtypes = [ctypes.c_int]
    self._lib.hf3fs_double_stats.argtypes = [ctypes.POINTER(ctypes.c_long)]

  def inject(self, kind: int, direction: int = BOTH, *, after: int = 0, count: int = 1) -> None:
    """The I/O after ``after`` matching ones fails with ``kind`` (EIO: result -EIO;
    SHORT: half the bytes moved; HANG: never completes), for ``count`` I/Os (-1: all)."""
    self._lib.hf3fs_double_inject(kind, direction, after, count)

  def set_wait_cap(self, cap: int) -> None:
    """``hf3fs_wait_for_ios`` returns at most ``cap`` results per call (0: no cap)."""
    self._lib.hf3fs_double_set_wait_cap(cap)

  def stats(self) -> Stats:
    out = (ctypes.c_long * 5)()
    self._lib.hf3fs_double_stats(out)
    return Stats(*out)

  def reset(self) -> None:
    """No fault, wait cap 2, counters zeroed."""
    self._lib.hf3fs_double_reset()


def load() -> Double:
  return Double(library_path())
