"""The USRBIO binding and checkpoint path, run through the project's C test double."""

import ctypes
import errno
import filecmp
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra import checkpoint as ck
from jaxinfra.checkpoint import usrbio
from jaxinfra.testing import usrbio_double as ud

SMALL = dict(block_bytes=16384, chunk_bytes=16384, host_budget_bytes=64 << 10, max_inflight=8)


@pytest.fixture(name="double")
def _double():
  double = ud.load()
  double.reset()
  yield double
  double.reset()
  stats = double.stats()
  assert stats.live_iovs == 0 and stats.live_rings == 0, "an Iov or ring was leaked"


@pytest.fixture(name="lib")
def _lib(double):
  return usrbio.load(double.path)


@pytest.fixture(name="mount")
def _mount(tmp_path):
  return ud.make_mount(tmp_path / "3fs")


def _options(double, **kw):
  return ck.CheckpointOptions(io="usrbio", usrbio_library=double.path, **{**SMALL, **kw})


def _state():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  x = np.random.default_rng(0).standard_normal((128, 160)).astype(np.float32)
  return {"w": jax.device_put(x, NamedSharding(mesh, P("x"))),
          "v": jax.device_put(x[:, :64].astype(jnp.bfloat16), NamedSharding(mesh, P(None, "x"))),
          "n": np.arange(100, dtype=np.int16), "step": 4}


def test_mount_detection_and_fd_registration_conventions(lib, mount, tmp_path):
  assert lib.extract_mount_point(os.path.join(mount, "a", "b", "not-yet")) == mount
  assert lib.extract_mount_point(tmp_path) is None
  fd = os.open(os.path.join(mount, "f"), os.O_CREAT | os.O_RDWR)
  other = os.open(tmp_path / "g", os.O_CREAT | os.O_RDWR)
  try:
    assert lib.is_hf3fs(fd) and not lib.is_hf3fs(other)
    assert lib.register_fd(fd) <= 0  # <= 0 on success
    with pytest.raises(OSError) as again:  # a positive errno on failure
      lib.register_fd(fd)
    assert again.value.errno == errno.EINVAL
    with pytest.raises(OSError) as off_3fs:
      lib.register_fd(other)
    assert off_3fs.value.errno == errno.EBADF
  finally:
    lib.deregister_fd(fd)
    os.close(fd)
    os.close(other)


def test_ring_prep_wait_and_its_threading_rule(lib, double, mount):
  double.set_wait_cap(2)  # wait_for_ios returns at most 2 per call, however many are ready
  path = os.path.join(mount, "f")
  fd = os.open(path, os.O_CREAT | os.O_RDWR)
  lib.register_fd(fd)
  with lib.iov(mount, 1 << 16) as iov:
    ring = lib.ring(mount, 8, for_read=False)
    try:
      data = np.frombuffer(iov.memory, np.uint8)
      data[:] = np.arange(data.size) % 253
      for i in range(6):
        assert 0 <= ring.prep(iov, i * 4096, fd, i * 4096, 4096, i + 1) < 8
      ring.submit()
      got, calls = [], 0
      while len(got) < 6:
        got += ring.wait(1, timeout=5.0)
        calls += 1
      assert calls >= 3 and sorted(u for _, _, u in got) == [1, 2, 3, 4, 5, 6]
      assert all(result == 4096 for _, result, _ in got)
      # A write ring takes no reads: -EINVAL (raw call, as Ring.prep always matches the ring).
      rc = lib.lib.hf3fs_prep_io(ctypes.byref(ring.struct), ctypes.byref(iov.struct), True,
                                 iov.address, fd, 0, 16, None)
      assert rc == -errno.EINVAL
      with pytest.raises(ValueError, match="outside the Iov"):
        ring.prep(iov, (1 << 16) - 100, fd, 0, 4096, 0)
      caught = []

      def prep_from_another_thread():
        try:
          ring.prep(iov, 0, fd, 0, 16, 0)
        except RuntimeError as e:
          caught.append(e)

      thread = threading.Thread(target=prep_from_another_thread)
      thread.start()
      thread.join()
      assert caught and "not thread-safe" in str(caught[0])
      del data
    finally:
      ring.close()
  lib.deregister_fd(fd)
  os.fsync(fd)  # the file length is exact after fsync
  os.close(fd)
  assert os.path.getsize(path) == 6 * 4096
  with open(path, "rb") as f:
    np.testing.assert_array_equal(np.frombuffer(f.read(), np.uint8),
                                  np.arange(6 * 4096) % 253)


def test_usrbio_off_3fs_is_a_clear_error(double, tmp_path):
  with pytest.raises(ck.NotOn3FSError, match="not on a 3FS mount"):
    ck.save(tmp_path / "c", _state(), _options(double))
  assert not os.path.exists(tmp_path / "c")
  with pytest.raises(ck.UsrbioUnavailableError):
    ck.save(tmp_path / "c", _state(), ck.CheckpointOptions(
        io="usrbio", usrbio_library=str(tmp_path / "libmissing.so")))


def test_usrbio_and_posix_write_identical_checkpoints(double, mount):
  state = _state()
  ck.save(os.path.join(mount, "u"), state, _options(double))
  written = double.stats()
  assert written.ios >= 16 and written.bytes > 128 * 160 * 4  # through the double's rings
  ck.save(os.path.join(mount, "p"), state, ck.CheckpointOptions(io="posix", **SMALL))
  assert double.stats().ios == written.ios  # posix did not touch USRBIO
  names = sorted(os.listdir(os.path.join(mount, "u")))
  assert names == sorted(os.listdir(os.path.join(mount, "p")))
  match, mismatch, errors = filecmp.cmpfiles(os.path.join(mount, "u"), os.path.join(mount, "p"),
                                             names, shallow=False)
  assert mismatch == [] and errors == [] and len(match) == len(names)
  # Each restores through either path; "auto" picks USRBIO on the mount.
  for io in ("usrbio", "posix", "auto"):
    checkpointer = ck.Checkpointer(ck.CheckpointOptions(io=io, usrbio_library=double.path,
                                                        **SMALL))
    got = checkpointer.restore(os.path.join(mount, "p"), state)
    assert checkpointer.last_restore_stats["engine"] == ("posix" if io == "posix" else "usrbio")
    np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(state["w"]))
    np.testing.assert_array_equal(got["n"], state["n"])


@pytest.mark.parametrize("kind,match", [(ud.EIO, "Input/output error"),
                                        (ud.SHORT, "short write"),
                                        (ud.HANG, "did not complete")])
@pytest.mark.parametrize("after", [0, 5])
def test_injected_write_faults_raise_and_commit_nothing(double, mount, kind, match, after):
  state = _state()
  previous = os.path.join(mount, "prev")
  ck.save(previous, state, _options(double))
  double.inject(kind, ud.WRITE, after=after)
  checkpointer = ck.Checkpointer(_options(double, io_timeout=0.5))
  with pytest.raises((OSError, TimeoutError), match=match):
    checkpointer.save(os.path.join(mount, "c"), state)
  assert double.stats().faults == 1
  assert ck.committed(mount) == ["prev"]
  assert sorted(os.listdir(mount)) == ["3fs-virt", "prev"]  # the temporary is gone
  with pytest.raises(ck.CheckpointError):
    ck.restore(os.path.join(mount, "c"), state)
  double.reset()
  got = ck.restore(previous, state, _options(double))
  np.testing.assert_array_equal(np.asarray(got["w"]), np.asarray(state["w"]))


@pytest.mark.parametrize("kind,match", [(ud.EIO, "Input/output error"), (ud.SHORT, "short read"),
                                        (ud.HANG, "did not complete")])
def test_injected_read_faults_raise(double, mount, kind, match):
  state = _state()
  ck.save(os.path.join(mount, "c"), state, _options(double))
  double.inject(kind, ud.READ, after=3)
  with pytest.raises(ck.CorruptCheckpointError, match=match):
    ck.restore(os.path.join(mount, "c"), state, _options(double, io_timeout=0.5))
