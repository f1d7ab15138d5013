"""``jaxinfra bench ckpt``: checkpoint save and restore bandwidth.

On one directory (``$JAXINFRA_BENCH_DIR``, default the system's temporary
directory) and one sharded state over every device, measures

* the disk's sequential bandwidth: one file of the state's size written in
  8 MiB pieces and fsync'd, then read back after its pages were dropped from
  the page cache (``posix_fadvise(POSIX_FADV_DONTNEED)``, which needs no root);
* ``jaxinfra.checkpoint`` save (until committed, fsync included) and restore
  (into the same sharding, from a cold page cache), POSIX or USRBIO as
  ``io="auto"`` picks for the directory;
* stock Orbax, ``StandardCheckpointer`` (TensorStore, OCDBT), the same way.

Sizes: small (CPU default) 32 MiB; full 2 GiB (``--size full``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra import checkpoint as ck
from jaxinfra.bench import _harness

_SMALL_BYTES = 32 << 20
_FULL_BYTES = 2 << 30
_COLUMNS = 4096


def _drop_cache(path: str) -> None:
  """Drops the (clean) pages of every file under ``path`` from the page cache."""
  paths = [path] if os.path.isfile(path) else [
      os.path.join(d, f) for d, _, files in os.walk(path) for f in files]
  for p in paths:
    fd = os.open(p, os.O_RDONLY)
    try:
      os.fsync(fd)
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def _disk(directory: str, nbytes: int) -> tuple[float, float]:
  """Seconds to write ``nbytes`` sequentially with fsync, and to read them back cold."""
  path = os.path.join(directory, "sequential.bin")
  piece = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
  start = time.perf_counter()
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
  try:
    for offset in range(0, nbytes, piece.nbytes):
      os.write(fd, piece[:min(piece.nbytes, nbytes - offset)])
    os.fsync(fd)
  finally:
    os.close(fd)
  write = time.perf_counter() - start
  _drop_cache(path)
  buffer = bytearray(8 << 20)
  start = time.perf_counter()
  with open(path, "rb", buffering=0) as f:
    while f.readinto(buffer):
      pass
  read = time.perf_counter() - start
  os.remove(path)
  return write, read


def _state(nbytes: int) -> dict:
  mesh = jax.make_mesh((jax.device_count(),), ("x",),
                       axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = NamedSharding(mesh, P("x"))
  rows = max(jax.device_count(), nbytes // 8 // (_COLUMNS * 4) // jax.device_count()
             * jax.device_count())
  state = {}
  for i in range(8):  # 8 leaves, each sharded over every device
    key = jax.random.key(i)
    make = jax.jit(lambda k: jax.random.normal(k, (rows, _COLUMNS), jnp.float32),
                   out_shardings=sharding)
    state[f"layer_{i}"] = make(key)
  jax.block_until_ready(state)
  return state


def _median(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    times.append(fn())
  return statistics.median(times)


@_harness.register("ckpt", "checkpoint save/restore GB/s vs stock Orbax and the disk")
def run(ctx: _harness.BenchContext) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  target_bytes = _FULL_BYTES if ctx.full else _SMALL_BYTES
  repeats = max(1, min(ctx.iters, 3 if ctx.full else 2))
  root = tempfile.mkdtemp(prefix="jaxinfra-bench-ckpt-",
                          dir=os.environ.get("JAXINFRA_BENCH_DIR") or None)
  try:
    state = _state(target_bytes)
    nbytes = sum(a.nbytes for a in jax.tree.leaves(state))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            state)
    counter = [0]

    def fresh(name: str) -> str:
      counter[0] += 1
      return os.path.join(root, f"{name}_{counter[0]}")

    results: dict[str, float] = {}
    engine = ["?"]
    checkpointer = ck.Checkpointer()
    orbax = ocp.StandardCheckpointer()

    def ours_save() -> float:
      path = fresh("jaxinfra")
      start = time.perf_counter()
      checkpointer.save(path, state)
      elapsed = time.perf_counter() - start
      engine[0] = checkpointer.last_save_stats.get("engine", "?")
      results["ours_path"] = path
      return elapsed

    def ours_restore() -> float:
      _drop_cache(results["ours_path"])
      start = time.perf_counter()
      jax.block_until_ready(checkpointer.restore(results["ours_path"], abstract))
      return time.perf_counter() - start

    def orbax_save() -> float:
      path = fresh("orbax")
      start = time.perf_counter()
      orbax.save(path, state)
      orbax.wait_until_finished()
      results["orbax_path"] = path
      return time.perf_counter() - start

    def orbax_restore() -> float:
      _drop_cache(results["orbax_path"])
      start = time.perf_counter()
      jax.block_until_ready(orbax.restore(results["orbax_path"], abstract))
      return time.perf_counter() - start

    cases = [("disk", None), ("jaxinfra save", ours_save), ("jaxinfra restore", ours_restore),
             ("orbax save", orbax_save), ("orbax restore", orbax_restore)]
    seconds: dict[str, float] = {}
    for name, fn in ctx.track(cases, f"checkpoint {nbytes / 2**30:.2f} GiB"):
      if name == "disk":
        timings = [_disk(root, nbytes) for _ in range(repeats)]
        seconds["disk write"] = statistics.median(t[0] for t in timings)
        seconds["disk read"] = statistics.median(t[1] for t in timings)
      else:
        seconds[name] = _median(fn, repeats)
    # Check the restores before reporting their speed.
    got = checkpointer.restore(results["ours_path"], abstract)
    for key in state:
      if not np.array_equal(np.asarray(got[key]), np.asarray(state[key])):
        raise AssertionError(f"jaxinfra restore of {key} differs from the saved array")
    orbax.close()

    gbps = {k: nbytes / v / 1e9 for k, v in seconds.items()}
    for kind in ("save", "restore"):
      disk = gbps["disk write" if kind == "save" else "disk read"]
      for who in ("jaxinfra", "orbax"):
        ctx.add(op=f"{who} {kind}", io=engine[0] if who == "jaxinfra" else "tensorstore",
                gib=nbytes / 2**30, s=seconds[f"{who} {kind}"], gb_per_s=gbps[f"{who} {kind}"],
                vs_orbax=gbps[f"{who} {kind}"] / gbps[f"orbax {kind}"],
                of_disk=gbps[f"{who} {kind}"] / disk)
    for kind in ("write", "read"):
      ctx.add(op=f"disk sequential {kind}", io="posix", gib=nbytes / 2**30,
              s=seconds[f"disk {kind}"], gb_per_s=gbps[f"disk {kind}"], vs_orbax="", of_disk=1.0)
    ctx.console.print(
        f"jaxinfra vs Orbax: save {gbps['jaxinfra save'] / gbps['orbax save']:.2f}x, restore "
        f"{gbps['jaxinfra restore'] / gbps['orbax restore']:.2f}x; of the disk's sequential "
        f"bandwidth: save {gbps['jaxinfra save'] / gbps['disk write']:.0%}, restore "
        f"{gbps['jaxinfra restore'] / gbps['disk read']:.0%} (Orbax: "
        f"{gbps['orbax save'] / gbps['disk write']:.0%}, "
        f"{gbps['orbax restore'] / gbps['disk read']:.0%})")
  finally:
    shutil.rmtree(root, ignore_errors=True)
