"""A ctypes binding of 3FS's USRBIO C API (``hf3fs_usrbio.h``).

USRBIO is 3FS's zero-copy I/O path: data lives in an *Iov* (shared memory that
the 3FS FUSE daemon maps and registers with InfiniBand) and requests go
through an *Ior*, an io_uring-like submission/completion ring. This module
loads ``libhf3fs_api_shared.so`` and wraps it with the API's own conventions:

* ``hf3fs_reg_fd`` returns a value <= 0 on success and a **positive** errno on
  failure; every other call returns ``-errno``. Both become :class:`OSError`.
* ``hf3fs_prep_io`` is not thread-safe per ring: :class:`Ring` documents that one
  thread preps and submits while (at most) one other thread waits.
* ``hf3fs_wait_for_ios`` may return fewer completions than are ready: callers
  loop (:meth:`Ring.wait` returns what one call gave).
* A file's length is only exact after ``fsync`` (or close): writers fsync before
  they publish anything that depends on it.

The library is found through ``load(path)``, ``$JAXINFRA_HF3FS_LIBRARY``, or
the system's library search (``libhf3fs_api_shared.so``). Tests load the
project's test double, ``jaxinfra.testing.usrbio_double``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errno_lib
import os
import threading
import time
from typing import Any

LIBRARY_NAME = "libhf3fs_api_shared.so"
LIBRARY_ENV = "JAXINFRA_HF3FS_LIBRARY"
HF3FS_SUPER_MAGIC = 0x8F3F5FFF
IOR_ALLOW_READ_UNCOMMITTED = 1
IOR_FORBID_READ_HOLES = 2


class NotOn3FSError(ValueError):
  """USRBIO was requested for a path that is not on a 3FS mount."""


class UsrbioUnavailableError(OSError):
  """``libhf3fs_api_shared.so`` (or the library asked for) could not be loaded."""


class Iov(ctypes.Structure):
  """``struct hf3fs_iov``: a shared-memory data buffer."""
  _fields_ = [("base", ctypes.POINTER(ctypes.c_uint8)),
              ("iovh", ctypes.c_void_p),
              ("id", ctypes.c_char * 16),
              ("mount_point", ctypes.c_char * 256),
              ("size", ctypes.c_size_t),
              ("block_size", ctypes.c_size_t),
              ("numa", ctypes.c_int)]


class Ior(ctypes.Structure):
  """``struct hf3fs_ior``: a submission/completion ring (reads or writes)."""
  _fields_ = [("iov", Iov),
              ("iorh", ctypes.c_void_p),
              ("mount_point", ctypes.c_char * 256),
              ("for_read", ctypes.c_bool),
              ("io_depth", ctypes.c_int),
              ("priority", ctypes.c_int),
              ("timeout", ctypes.c_int),
              ("flags", ctypes.c_uint64)]


class Cqe(ctypes.Structure):
  """``struct hf3fs_cqe``: one completion (``result`` = bytes moved or -errno)."""
  _fields_ = [("index", ctypes.c_int32),
              ("reserved", ctypes.c_int32),
              ("result", ctypes.c_int64),
              ("userdata", ctypes.c_void_p)]


class Timespec(ctypes.Structure):
  _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "hf3fs_is_hf3fs": (ctypes.c_bool, [ctypes.c_int]),
    "hf3fs_extract_mount_point": (ctypes.c_int, [ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]),
    "hf3fs_iovcreate": (ctypes.c_int, [ctypes.POINTER(Iov), ctypes.c_char_p, ctypes.c_size_t,
                                       ctypes.c_size_t, ctypes.c_int]),
    "hf3fs_iovdestroy": (None, [ctypes.POINTER(Iov)]),
    "hf3fs_ior_size": (ctypes.c_size_t, [ctypes.c_int]),
    "hf3fs_iorcreate4": (ctypes.c_int, [ctypes.POINTER(Ior), ctypes.c_char_p, ctypes.c_int,
                                        ctypes.c_bool, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_uint64]),
    "hf3fs_iordestroy": (None, [ctypes.POINTER(Ior)]),
    "hf3fs_reg_fd": (ctypes.c_int, [ctypes.c_int, ctypes.c_uint64]),
    "hf3fs_dereg_fd": (None, [ctypes.c_int]),
    "hf3fs_io_entries": (ctypes.c_int, [ctypes.POINTER(Ior)]),
    "hf3fs_prep_io": (ctypes.c_int, [ctypes.POINTER(Ior), ctypes.POINTER(Iov), ctypes.c_bool,
                                     ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t,
                                     ctypes.c_uint64, ctypes.c_void_p]),
    "hf3fs_submit_ios": (ctypes.c_int, [ctypes.POINTER(Ior)]),
    "hf3fs_wait_for_ios": (ctypes.c_int, [ctypes.POINTER(Ior), ctypes.POINTER(Cqe), ctypes.c_int,
                                          ctypes.c_int, ctypes.POINTER(Timespec)]),
}


def _os_error(code: int, what: str) -> OSError:
  return OSError(code, f"{what}: {os.strerror(code)}")


class Usrbio:
  """A loaded USRBIO library: mount detection, fd registration, Iovs and rings."""

  def __init__(self, path: str):
    try:
      self._lib = ctypes.CDLL(path)
    except OSError as e:
      raise UsrbioUnavailableError(errno_lib.ENOENT,
                                   f"cannot load the USRBIO library {path!r}: {e}") from e
    missing = [name for name in _SIGNATURES if not hasattr(self._lib, name)]
    if missing:
      raise UsrbioUnavailableError(errno_lib.ENOSYS,
                                   f"{path!r} is not a USRBIO library (missing {missing})")
    for name, (restype, argtypes) in _SIGNATURES.items():
      fn = getattr(self._lib, name)
      fn.restype, fn.argtypes = restype, argtypes
    self.path = path

  @property
  def lib(self) -> ctypes.CDLL:
    return self._lib

  def extract_mount_point(self, path: str | os.PathLike) -> str | None:
    """The 3FS mount point holding ``path`` (which need not exist), or None."""
    encoded = os.fsencode(os.path.abspath(path))
    size = 256
    while True:
      out = ctypes.create_string_buffer(size)
      n = self._lib.hf3fs_extract_mount_point(out, size, encoded)
      if n < 0:
        return None
      if n <= size:  # strlen + 1
        return os.fsdecode(out.value)
      size = n

  def is_hf3fs(self, fd: int) -> bool:
    """Whether the open file ``fd`` is on 3FS."""
    return bool(self._lib.hf3fs_is_hf3fs(fd))

  def mount_point_or_raise(self, path: str | os.PathLike) -> str:
    mount = self.extract_mount_point(path)
    if mount is None:
      raise NotOn3FSError(
          f"USRBIO was requested for {os.fspath(path)!r}, which is not on a 3FS mount "
          f"(hf3fs_extract_mount_point returned -1 with {self.path}); use io='posix' or 'auto'")
    return mount

  def register_fd(self, fd: int) -> int:
    """Registers ``fd`` for USRBIO; returns the (<= 0) handle ``prep_io`` also accepts."""
    rc = self._lib.hf3fs_reg_fd(fd, 0)
    if rc > 0:  # a positive errno: EBADF when not on 3FS, EINVAL when already registered
      raise _os_error(rc, f"hf3fs_reg_fd({fd})")
    return rc

  def deregister_fd(self, fd: int) -> None:
    self._lib.hf3fs_dereg_fd(fd)

  def iov(self, mount: str, size: int, *, block_size: int = 0, numa: int = -1) -> "IovBuffer":
    return IovBuffer(self, mount, size, block_size=block_size, numa=numa)

  def ring(self, mount: str, entries: int, *, for_read: bool, io_depth: int = 0,
           timeout: int = 0, numa: int = -1, flags: int = 0) -> "Ring":
    return Ring(self, mount, entries, for_read=for_read, io_depth=io_depth, timeout=timeout,
                numa=numa, flags=flags)


class IovBuffer:
  """An Iov (``hf3fs_iovcreate``), its memory exposed as a writable memoryview."""

  def __init__(self, usrbio: Usrbio, mount: str, size: int, *, block_size: int = 0,
               numa: int = -1):
    if size <= 0:
      raise ValueError(f"size must be positive, got {size}")
    self._usrbio = usrbio
    self.struct = Iov()
    rc = usrbio.lib.hf3fs_iovcreate(ctypes.byref(self.struct), os.fsencode(mount), size,
                                    block_size, numa)
    if rc != 0:
      raise _os_error(-rc, f"hf3fs_iovcreate({mount!r}, {size})")
    self.size = size
    self.address = ctypes.cast(self.struct.base, ctypes.c_void_p).value
    self.memory = memoryview((ctypes.c_uint8 * size).from_address(self.address)).cast("B")

  def close(self) -> None:
    if self.address is not None:
      # Views of `memory` must be dropped by now: the mapping goes away.
      self.memory = None
      self._usrbio.lib.hf3fs_iovdestroy(ctypes.byref(self.struct))
      self.address = None

  def __enter__(self) -> "IovBuffer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Ring:
  """An Ior (``hf3fs_iorcreate4``), for reads or for writes.

  Threading (the API's rule): :meth:`prep` and :meth:`submit` from one thread
  only; :meth:`wait` from (at most) one other thread.
  """

  def __init__(self, usrbio: Usrbio, mount: str, entries: int, *, for_read: bool,
               io_depth: int = 0, timeout: int = 0, numa: int = -1, flags: int = 0):
    self._usrbio = usrbio
    self.struct = Ior()
    self.for_read = for_read
    rc = usrbio.lib.hf3fs_iorcreate4(ctypes.byref(self.struct), os.fsencode(mount), entries,
                                     for_read, io_depth, timeout, numa, flags)
    if rc != 0:
      raise _os_error(-rc, f"hf3fs_iorcreate4({mount!r}, entries={entries})")
    self.entries = usrbio.lib.hf3fs_io_entries(ctypes.byref(self.struct))
    self._cqes = (Cqe * self.entries)()
    self._prep_thread: int | None = None
    self._open = True

  def prep(self, iov: IovBuffer, offset_in_iov: int, fd: int, file_offset: int, length: int,
           userdata: int) -> int:
    """Queues one I/O of ``iov[offset_in_iov:+length]``; returns its ring slot."""
    me = threading.get_ident()
    if self._prep_thread is None:
      self._prep_thread = me
    elif self._prep_thread != me:
      raise RuntimeError("hf3fs_prep_io is not thread-safe: prep and submit on a ring "
                         "from one thread only")
    if offset_in_iov < 0 or offset_in_iov + length > iov.size:
      raise ValueError(f"[{offset_in_iov}, +{length}) is outside the Iov of {iov.size} bytes")
    rc = self._usrbio.lib.hf3fs_prep_io(ctypes.byref(self.struct), ctypes.byref(iov.struct),
                                        self.for_read, iov.address + offset_in_iov, fd,
                                        file_offset, length, userdata)
    if rc < 0:
      raise _os_error(-rc, f"hf3fs_prep_io(fd={fd}, offset={file_offset}, length={length})")
    return rc

  def submit(self) -> None:
    rc = self._usrbio.lib.hf3fs_submit_ios(ctypes.byref(self.struct))
    if rc < 0:
      raise _os_error(-rc, "hf3fs_submit_ios")

  def wait(self, min_results: int = 1, timeout: float | None = None) -> list[tuple[int, int, int]]:
    """One ``hf3fs_wait_for_ios`` call: ``[(slot, result, userdata)]``, possibly
    fewer than are ready (or none when ``timeout`` seconds pass)."""
    deadline = None
    if timeout is not None:
      now = time.time() + timeout
      deadline = Timespec(int(now), int((now % 1) * 1e9))
    n = self._usrbio.lib.hf3fs_wait_for_ios(
        ctypes.byref(self.struct), self._cqes, self.entries, min_results,
        ctypes.byref(deadline) if deadline is not None else None)
    if n == -errno_lib.ETIMEDOUT:
      return []
    if n < 0:
      raise _os_error(-n, "hf3fs_wait_for_ios")
    return [(c.index, c.result, c.userdata or 0) for c in self._cqes[:n]]

  def close(self) -> None:
    if self._open:
      self._usrbio.lib.hf3fs_iordestroy(ctypes.byref(self.struct))
      self._open = False


_LOADED: dict[str, Usrbio] = {}
_LOCK = threading.Lock()


def default_library() -> str | None:
  """``$JAXINFRA_HF3FS_LIBRARY``, else the system's ``libhf3fs_api_shared.so`` if found."""
  if os.environ.get(LIBRARY_ENV):
    return os.environ[LIBRARY_ENV]
  found = ctypes.util.find_library("hf3fs_api_shared")
  return found


def load(path: str | None = None) -> Usrbio:
  """The USRBIO library at ``path`` (default: :func:`default_library`), loaded once.

  Raises:
    UsrbioUnavailableError: no library is found or it cannot be loaded.
  """
  path = path or default_library()
  if path is None:
    # Let the dynamic loader try its own search path as a last resort.
    path = LIBRARY_NAME
  with _LOCK:
    if path not in _LOADED:
      _LOADED[path] = Usrbio(path)
    return _LOADED[path]


def try_load(path: str | None = None) -> Usrbio | None:
  """Like :func:`load`, but None when no USRBIO library is available."""
  try:
    return load(path)
  except UsrbioUnavailableError:
    return None
