"""I/O engines: many large writes and reads in flight, through POSIX or USRBIO.

Both engines own a staging *arena* of ``budget`` bytes (anonymous memory for
POSIX, a USRBIO Iov for 3FS), handed out by a first-fit allocator that blocks
while the budget is used up: that is the host-memory bound of a save. Writes
and reads are split into ``chunk_bytes`` pieces, at most ``max_inflight`` of
them in flight.

* :class:`PosixEngine`: a thread pool running ``os.pwrite`` / ``os.preadv``
  (both release the GIL); reads land directly in the caller's buffers.
* :class:`UsrbioEngine`: one thread preps and submits on a write ring (the
  API's rule: ``prep_io`` is not thread-safe per ring), one thread reaps it
  (``wait_for_ios`` may return fewer completions than are ready, so it loops);
  the same for a read ring. Data is written from and read into the Iov. An
  I/O that has not completed after ``io_timeout`` seconds fails the engine
  with :class:`TimeoutError`.

The first error fails the engine: pending and later operations raise it, and
:meth:`Engine.drain` re-raises it, so no caller mistakes a failed write for a
finished one.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import dataclasses
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from jaxinfra.checkpoint import usrbio as usrbio_lib

ALIGN = 4096


class EngineFailed(RuntimeError):
  """Raised by operations on an engine that already failed."""


class Arena:
  """First-fit allocator over ``memory``; :meth:`alloc` blocks until a block fits."""

  def __init__(self, memory: memoryview, failed: Callable[[], BaseException | None]):
    self.memory = memory
    self.size = len(memory)
    self._free = [(0, self.size)]  # sorted, disjoint (start, end)
    self._cond = threading.Condition()
    self._failed = failed
    self.peak = 0
    self._used = 0

  def alloc(self, nbytes: int) -> int:
    """Offset of ``nbytes`` (rounded up to 4 KiB) free bytes, waiting if needed."""
    need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
    if need > self.size:
      raise ValueError(f"a staging block of {nbytes} bytes exceeds the host memory budget of "
                       f"{self.size} bytes; raise the budget")
    with self._cond:
      while True:
        error = self._failed()
        if error is not None:
          raise EngineFailed(f"the I/O engine failed: {error!r}") from error
        for i, (start, end) in enumerate(self._free):
          if end - start >= need:
            if end - start == need:
              del self._free[i]
            else:
              self._free[i] = (start + need, end)
            self._used += need
            self.peak = max(self.peak, self._used)
            return start
        self._cond.wait(0.1)

  def free(self, offset: int, nbytes: int) -> None:
    need = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
    with self._cond:
      i = bisect.bisect(self._free, (offset, offset))
      start, end = offset, offset + need
      if i < len(self._free) and self._free[i][0] == end:  # merge right
        end = self._free.pop(i)[1]
      if i > 0 and self._free[i - 1][1] == start:          # merge left
        start = self._free.pop(i - 1)[0]
        i -= 1
      self._free.insert(i, (start, end))
      self._used -= need
      self._cond.notify_all()

  def wake(self) -> None:
    with self._cond:
      self._cond.notify_all()


@dataclasses.dataclass
class FileHandle:
  path: str
  fd: int
  writable: bool
  registered: bool = False


class Engine:
  """Base class: the arena, error state and outstanding-operation accounting."""

  name = "engine"

  def __init__(self, *, budget: int, chunk_bytes: int, max_inflight: int):
    if budget < ALIGN or chunk_bytes < ALIGN or max_inflight < 1:
      raise ValueError(f"budget and chunk_bytes must be >= {ALIGN} and max_inflight >= 1, got "
                       f"{budget}, {chunk_bytes}, {max_inflight}")
    self.chunk_bytes = chunk_bytes
    self.max_inflight = max_inflight
    self._error: BaseException | None = None
    self._pending = 0
    self._cond = threading.Condition()
    self.bytes_written = 0
    self.bytes_read = 0
    self.arena = Arena(self._memory(budget), lambda: self._error)

  def _memory(self, budget: int) -> memoryview:
    raise NotImplementedError

  # -- error state ---------------------------------------------------------
  def fail(self, error: BaseException) -> None:
    with self._cond:
      if self._error is None:
        self._error = error
      self._cond.notify_all()
    self.arena.wake()

  def check(self) -> None:
    if self._error is not None:
      raise EngineFailed(f"the I/O engine failed: {self._error!r}") from self._error

  def _begin(self) -> None:
    with self._cond:
      self.check()
      self._pending += 1

  def _end(self) -> None:
    with self._cond:
      self._pending -= 1
      self._cond.notify_all()

  def drain(self) -> None:
    """Waits for every operation issued so far; raises the first error."""
    with self._cond:
      while self._pending and self._error is None:
        self._cond.wait(0.1)
    if self._error is not None:
      raise self._error

  # -- files ---------------------------------------------------------------
  def open(self, path: str, *, write: bool) -> FileHandle:
    flags = (os.O_RDWR | os.O_CREAT) if write else os.O_RDONLY
    fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o644)
    return FileHandle(path, fd, write)

  def close_file(self, handle: FileHandle, *, fsync: bool) -> None:
    """fsync (which also fixes a 3FS file's length) and close."""
    try:
      if fsync:
        os.fsync(handle.fd)
    finally:
      os.close(handle.fd)

  # -- I/O -----------------------------------------------------------------
  def write(self, handle: FileHandle, file_offset: int, arena_offset: int, length: int,
            done: Callable[[], None]) -> None:
    """Writes ``arena[arena_offset:+length]`` at ``file_offset``, asynchronously;
    ``done()`` runs when every piece is on its way to disk."""
    raise NotImplementedError

  def read(self, requests: Sequence[tuple[FileHandle, int, memoryview]]) -> None:
    """Reads each ``(file, offset, destination)`` fully, in parallel; raises on
    errors and on short reads (a truncated file)."""
    raise NotImplementedError

  def close(self) -> None:
    raise NotImplementedError

  def __enter__(self) -> "Engine":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _pieces(self, offset: int, length: int) -> list[tuple[int, int]]:
    return [(start, min(self.chunk_bytes, length - start))
            for start in range(0, length, self.chunk_bytes)] or [(0, 0)]


def _countdown(n: int, done: Callable[[], None]) -> Callable[[], None]:
  """A callback that runs ``done()`` on its ``n``-th call (from any thread)."""
  remaining = [n]
  lock = threading.Lock()

  def step() -> None:
    with lock:
      remaining[0] -= 1
      last = remaining[0] == 0
    if last:
      done()
  return step


def _short(handle: FileHandle, offset: int, want: int, got: int, what: str) -> OSError:
  if what == "read":
    return OSError(f"short read from {handle.path} at offset {offset}: {got} of {want} bytes "
                   "(the data file is truncated)")
  return OSError(f"short write to {handle.path} at offset {offset}: {got} of {want} bytes")


class PosixEngine(Engine):
  """pwrite/preadv from a thread pool."""

  name = "posix"

  def __init__(self, *, budget: int, chunk_bytes: int = 8 << 20, max_inflight: int = 16):
    super().__init__(budget=budget, chunk_bytes=chunk_bytes, max_inflight=max_inflight)
    self._pool = concurrent.futures.ThreadPoolExecutor(max_inflight,
                                                       thread_name_prefix="jaxinfra-posix-io")

  def _memory(self, budget: int) -> memoryview:
    self._mmap = mmap.mmap(-1, budget)
    return memoryview(self._mmap)

  def _write_piece(self, handle, file_offset, view, piece_done) -> None:
    try:
      self.check()
      done = 0
      while done < len(view):
        n = os.pwrite(handle.fd, view[done:], file_offset + done)
        if n <= 0:
          raise _short(handle, file_offset, len(view), done, "write")
        done += n
      with self._cond:
        self.bytes_written += done
      piece_done()
    except BaseException as e:  # pylint: disable=broad-except
      self.fail(e)
    finally:
      self._end()

  def write(self, handle, file_offset, arena_offset, length, done) -> None:
    self.write_view(handle, file_offset,
                    self.arena.memory[arena_offset:arena_offset + length], done)

  def write_view(self, handle: FileHandle, file_offset: int, view: memoryview,
                 done: Callable[[], None]) -> None:
    """Writes ``view`` (any host memory, kept alive by the caller until ``done()``)."""
    view = memoryview(view).cast("B")
    pieces = self._pieces(file_offset, len(view))
    piece_done = _countdown(len(pieces), done)
    for start, size in pieces:
      self._begin()
      self._pool.submit(self._write_piece, handle, file_offset + start,
                        view[start:start + size], piece_done)

  def _read_piece(self, handle, offset, view) -> None:
    done = 0
    while done < len(view):
      n = os.preadv(handle.fd, [view[done:]], offset + done)
      if n <= 0:
        raise _short(handle, offset, len(view), done, "read")
      done += n
    with self._cond:
      self.bytes_read += done

  def read(self, requests) -> None:
    self.check()
    futures = []
    for handle, offset, dest in requests:
      dest = memoryview(dest).cast("B")
      for start, size in self._pieces(offset, len(dest)):
        futures.append(self._pool.submit(self._read_piece, handle, offset + start,
                                         dest[start:start + size]))
    for future in futures:
      future.result()

  def close(self) -> None:
    self._pool.shutdown(wait=True)
    self.arena.memory = None
    try:
      self._mmap.close()
    except BufferError:  # a view is still alive somewhere; the GC frees the map later
      pass


@dataclasses.dataclass
class _Io:
  handle: FileHandle
  file_offset: int
  arena_offset: int
  length: int
  on_done: Callable[[], None]
  started: float = 0.0


class _RingWorker:
  """A ring with one prep/submit thread and one reaping thread."""

  def __init__(self, engine: "UsrbioEngine", for_read: bool, entries: int, io_depth: int):
    self.engine = engine
    self.ring = engine.usrbio.ring(engine.mount, entries, for_read=for_read, io_depth=io_depth)
    self.slots = threading.Semaphore(min(entries, engine.max_inflight))
    self.queue: queue.Queue = queue.Queue()
    self.inflight: dict[int, _Io] = {}
    self.lock = threading.Lock()
    self.next_id = 1
    self.stop = False
    kind = "read" if for_read else "write"
    self.submitter = threading.Thread(target=self._submit_loop, daemon=True,
                                      name=f"jaxinfra-usrbio-{kind}-submit")
    self.reaper = threading.Thread(target=self._reap_loop, daemon=True,
                                   name=f"jaxinfra-usrbio-{kind}-reap")
    self.submitter.start()
    self.reaper.start()

  def _submit_loop(self) -> None:
    engine = self.engine
    while True:
      io = self.queue.get()
      if io is None:
        return
      try:
        while not self.slots.acquire(timeout=0.1):
          engine.check()
        engine.check()
        with self.lock:
          io_id = self.next_id
          self.next_id += 1
          io.started = time.monotonic()
          self.inflight[io_id] = io
        self.ring.prep(engine.iov, io.arena_offset, io.handle.fd, io.file_offset, io.length,
                       io_id)
        if self.queue.empty():
          self.ring.submit()
      except BaseException as e:  # pylint: disable=broad-except
        engine.fail(e)
        engine._end()  # pylint: disable=protected-access

  def _reap_loop(self) -> None:
    engine = self.engine
    while not self.stop:
      try:
        completions = self.ring.wait(1, timeout=0.05)
      except BaseException as e:  # pylint: disable=broad-except
        engine.fail(e)
        return
      for _, result, io_id in completions:
        with self.lock:
          io = self.inflight.pop(io_id)
        self.slots.release()
        try:
          if result < 0:
            raise OSError(-result, f"USRBIO {'read' if self.ring.for_read else 'write'} of "
                                   f"{io.length} bytes at offset {io.file_offset} of "
                                   f"{io.handle.path}: {os.strerror(-result)}")
          if result != io.length:
            raise _short(io.handle, io.file_offset, io.length, result,
                         "read" if self.ring.for_read else "write")
          with engine._cond:  # pylint: disable=protected-access
            if self.ring.for_read:
              engine.bytes_read += result
            else:
              engine.bytes_written += result
          io.on_done()
        except BaseException as e:  # pylint: disable=broad-except
          engine.fail(e)
        finally:
          engine._end()  # pylint: disable=protected-access
      with self.lock:
        oldest = min((io.started for io in self.inflight.values()), default=None)
      if oldest is not None and time.monotonic() - oldest > engine.io_timeout:
        engine.fail(TimeoutError(f"a USRBIO I/O did not complete in {engine.io_timeout} s"))
        return

  def close(self) -> None:
    self.queue.put(None)
    self.submitter.join()
    self.stop = True
    self.reaper.join()
    self.ring.close()


class UsrbioEngine(Engine):
  """USRBIO rings over an Iov on the 3FS mount holding ``directory``."""

  name = "usrbio"

  def __init__(self, usrbio: usrbio_lib.Usrbio, directory: str, *, budget: int,
               chunk_bytes: int = 8 << 20, max_inflight: int = 64, io_depth: int = 0,
               io_timeout: float = 120.0):
    self.usrbio = usrbio
    self.mount = usrbio.mount_point_or_raise(directory)
    self.io_timeout = io_timeout
    self._io_depth = io_depth
    self._rings: dict[bool, _RingWorker] = {}
    self._rings_lock = threading.Lock()
    super().__init__(budget=budget, chunk_bytes=chunk_bytes, max_inflight=max_inflight)

  def _memory(self, budget: int) -> memoryview:
    self.iov = self.usrbio.iov(self.mount, budget)
    return self.iov.memory

  def _ring(self, for_read: bool) -> _RingWorker:
    with self._rings_lock:
      if for_read not in self._rings:
        self._rings[for_read] = _RingWorker(self, for_read, max(self.max_inflight, 1),
                                            self._io_depth)
      return self._rings[for_read]

  def open(self, path: str, *, write: bool) -> FileHandle:
    handle = super().open(path, write=write)
    try:
      self.usrbio.register_fd(handle.fd)
    except BaseException:
      os.close(handle.fd)
      raise
    handle.registered = True
    return handle

  def close_file(self, handle: FileHandle, *, fsync: bool) -> None:
    try:
      if fsync:
        os.fsync(handle.fd)  # USRBIO writes: the file length is exact only after fsync
    finally:
      if handle.registered:
        self.usrbio.deregister_fd(handle.fd)
      os.close(handle.fd)

  def _issue(self, for_read: bool, io: _Io) -> None:
    self._begin()
    self._ring(for_read).queue.put(io)

  def write(self, handle, file_offset, arena_offset, length, done) -> None:
    pieces = self._pieces(file_offset, length)
    piece_done = _countdown(len(pieces), done)
    for start, size in pieces:
      self._issue(False, _Io(handle, file_offset + start, arena_offset + start, size, piece_done))

  def read(self, requests) -> None:
    """Reads through the Iov: staged in the arena, then copied to each destination."""
    self.check()
    pieces: collections.deque = collections.deque()
    for handle, offset, dest in requests:
      dest = memoryview(dest).cast("B")
      for start, size in self._pieces(offset, len(dest)):
        pieces.append((handle, offset + start, dest[start:start + size]))
    outstanding = [0]
    cond = threading.Condition()

    def make_done(arena_offset: int, dest: memoryview):
      def on_done():
        dest[:] = self.arena.memory[arena_offset:arena_offset + len(dest)]
        self.arena.free(arena_offset, len(dest))
        with cond:
          outstanding[0] -= 1
          cond.notify_all()
      return on_done

    while pieces:
      handle, offset, dest = pieces.popleft()
      if not len(dest):
        continue
      arena_offset = self.arena.alloc(len(dest))
      with cond:
        outstanding[0] += 1
      self._issue(True, _Io(handle, offset, arena_offset, len(dest),
                            make_done(arena_offset, dest)))
    with cond:
      while outstanding[0] and self._error is None:
        cond.wait(0.1)
    self.check()

  def close(self) -> None:
    with self._rings_lock:
      rings, self._rings = list(self._rings.values()), {}
    for ring in rings:
      ring.close()
    self.arena.memory = None
    self.iov.close()


def make_engine(io: str, directory: str, *, budget: int, chunk_bytes: int, max_inflight: int,
                usrbio_library: str | None = None, io_timeout: float = 120.0,
                ) -> Engine:
  """The engine for ``io`` in {"auto", "posix", "usrbio"} on ``directory``.

  ``auto`` uses USRBIO when a USRBIO library loads and ``directory`` is on a
  3FS mount, POSIX otherwise; ``usrbio`` raises :class:`usrbio.NotOn3FSError`
  off 3FS and :class:`usrbio.UsrbioUnavailableError` without the library.
  """
  if io not in ("auto", "posix", "usrbio"):
    raise ValueError(f"io must be 'auto', 'posix' or 'usrbio', got {io!r}")
  if io in ("auto", "usrbio"):
    lib = usrbio_lib.load(usrbio_library) if io == "usrbio" else usrbio_lib.try_load(
        usrbio_library)
    if lib is not None and (io == "usrbio" or lib.extract_mount_point(directory) is not None):
      return UsrbioEngine(lib, directory, budget=budget, chunk_bytes=chunk_bytes,
                          max_inflight=max_inflight, io_timeout=io_timeout)
  return PosixEngine(budget=budget, chunk_bytes=chunk_bytes, max_inflight=max_inflight)


