"""Run a function in N real JAX processes on this machine.

Each process gets ``devices_per_process`` CPU devices, joins a
``jax.distributed`` cluster coordinated on 127.0.0.1 (gloo collectives), calls
the function, and reports its JSON-serializable return value. Any failure,
crash or timeout ends every process and raises :class:`MultiprocessError` with
each process's exit status and the tail of its output.

Example (in a test module)::

    def all_reduce():
      import jax
      ...
      return jax.process_index()

    def test_all_reduce():
      assert run_multiprocess(all_reduce, num_processes=2) == [0, 1]
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

RESULT_MARKER = "__jaxinfra_multiprocess_result__ "


class MultiprocessError(RuntimeError):
  """A worker process failed, crashed or timed out."""


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _tail(path: str, limit: int = 4000) -> str:
  with open(path, errors="replace") as f:
    text = f.read()
  return text if len(text) <= limit else "...\n" + text[-limit:]


def _kill(process: subprocess.Popen) -> None:
  if process.poll() is None:
    try:
      os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass
  process.wait()


def run_multiprocess(fn: Callable[..., Any], *, num_processes: int = 2,
                     devices_per_process: int = 4, args: Sequence[Any] = (),
                     timeout: float = 180.0, env: dict[str, str] | None = None,
                     pin_cores: bool = False) -> list[Any]:
  """Runs ``fn(*args)`` in ``num_processes`` JAX processes; returns their results.

  Args:
    fn: a module-level function (it is imported by file path and name in each
      worker); it returns something ``json.dumps`` accepts.
    num_processes: processes to start.
    devices_per_process: CPU devices in each process.
    args: JSON-serializable positional arguments for ``fn``.
    timeout: seconds for the whole run, start-up included.
    env: extra environment variables for the workers.
    pin_cores: run process ``i`` on one core only (the ``i``-th this process may
      use, wrapping around), so that each process computes on a core of its
      own: without it, every XLA:CPU process spreads its ops over all cores.

  Returns:
    ``fn``'s return value in each process, by process index.
  """
  if num_processes < 1 or devices_per_process < 1:
    raise ValueError(f"num_processes and devices_per_process must be positive, got "
                     f"{num_processes} and {devices_per_process}")
  source = inspect.getsourcefile(fn)
  if source is None or fn.__qualname__ != fn.__name__:
    raise ValueError(f"fn must be a module-level function, got {fn!r}")
  if pin_cores and not hasattr(os, "sched_setaffinity"):
    raise ValueError("pin_cores=True needs os.sched_setaffinity (Linux)")
  cores = sorted(os.sched_getaffinity(0)) if pin_cores else []
  port = free_port()
  worker_env = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
  with tempfile.TemporaryDirectory(prefix="jaxinfra-mp-") as tmp:
    processes, logs = [], []
    for rank in range(num_processes):
      log = os.path.join(tmp, f"process_{rank}.log")
      command = [sys.executable, "-m", "jaxinfra.testing._worker", "--file", source,
                 "--function", fn.__name__, "--process-id", str(rank),
                 "--num-processes", str(num_processes), "--port", str(port),
                 "--devices", str(devices_per_process), "--args", json.dumps(list(args))]
      if pin_cores:
        command += ["--core", str(cores[rank % len(cores)])]
      with open(log, "w") as out:
        # cwd=tmp: `python -m` puts the working directory first on sys.path, and
        # a source checkout there would shadow the installed package.
        processes.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                          env=worker_env, cwd=tmp, start_new_session=True))
      logs.append(log)

    deadline = time.monotonic() + timeout
    failure = None
    try:
      while failure is None:
        # A failed process ends the run: the others may wait forever on a collective.
        failed = [r for r, p in enumerate(processes) if p.poll() not in (None, 0)]
        if failed:
          failure = f"process {failed[0]} exited with status {processes[failed[0]].returncode}"
        elif all(p.poll() == 0 for p in processes):
          break
        elif time.monotonic() > deadline:
          failure = f"timed out after {timeout:.0f} s"
        else:
          time.sleep(0.05)
    finally:
      for p in processes:
        _kill(p)

    results, report = [], []
    for rank, (p, log) in enumerate(zip(processes, logs)):
      with open(log, errors="replace") as f:
        reported = [l for l in f.read().splitlines() if l.startswith(RESULT_MARKER)]
      if reported:
        results.append(json.loads(reported[-1][len(RESULT_MARKER):]))
      elif failure is None:
        failure = f"process {rank} exited without reporting a result"
      report.append(f"--- process {rank} (exit status {p.returncode}) ---\n{_tail(log)}")
    if failure:
      raise MultiprocessError(f"{fn.__name__} in {num_processes} processes: {failure}\n"
                              + "\n".join(report))
    return results
