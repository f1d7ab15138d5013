"""A checkpoint writer that SIGKILLs itself at its Nth I/O event (for test_checkpoint_kill).

usage: python checkpoint_kill_writer.py ROOT STEP KILL_AT IO [USRBIO_LIBRARY]

Counts every pwrite, fsync, rename and USRBIO prep; at event KILL_AT (0: never)
the process kills itself with SIGKILL, wherever the save is.
"""

import os
import signal
import sys

import numpy as np

EVENTS = [0]


def state_for(step: int):
  """The deterministic state saved at ``step`` (also rebuilt by the test)."""
  import jax  # pylint: disable=g-import-not-at-top
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  rng = np.random.default_rng(step)
  w = rng.standard_normal((64, 256)).astype(np.float32)
  return {"w": jax.device_put(w, NamedSharding(mesh, P("x"))),
          "e": jax.device_put(w[:16].astype(ml_dtypes.bfloat16), NamedSharding(mesh, P(None, "x"))),
          "step": step}


def options_for(step: int, usrbio_library: str | None):
  from jaxinfra import checkpoint as ck  # pylint: disable=g-import-not-at-top
  io = "usrbio" if usrbio_library and step % 2 else "posix"
  return ck.CheckpointOptions(io=io, usrbio_library=usrbio_library, block_bytes=8192,
                              chunk_bytes=8192, files_per_process=2)


def count_events(kill_at: int) -> None:
  """Wraps the I/O calls so that event number ``kill_at`` is a SIGKILL."""
  from jaxinfra.checkpoint import usrbio  # pylint: disable=g-import-not-at-top

  def counted(fn):
    def wrapper(*args, **kwargs):
      EVENTS[0] += 1
      if EVENTS[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
      return fn(*args, **kwargs)
    return wrapper

  os.pwrite = counted(os.pwrite)
  os.fsync = counted(os.fsync)
  os.rename = counted(os.rename)
  usrbio.Ring.prep = counted(usrbio.Ring.prep)


def main() -> None:
  root, step, kill_at = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
  library = sys.argv[4] if len(sys.argv) > 4 else None
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_num_cpu_devices", 8)
  from jaxinfra import checkpoint as ck  # pylint: disable=g-import-not-at-top
  state = state_for(step)
  count_events(kill_at)
  ck.save(os.path.join(root, f"step_{step:02d}"), state, options_for(step, library))
  print(f"events {EVENTS[0]}")


if __name__ == "__main__":
  main()
