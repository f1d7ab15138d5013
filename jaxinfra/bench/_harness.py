"""The benchmark harness behind ``jaxinfra bench`` (see ``jaxinfra.bench``)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import platform as platform_lib
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jaxlib
import numpy as np
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

import jaxinfra
from jaxinfra import _custom_call

# Benchmark modules, imported on demand so that `jaxinfra bench --help` stays fast.
_MODULES = ("jaxinfra.bench.quant", "jaxinfra.bench.mla", "jaxinfra.bench.gemm", "jaxinfra.bench.moe",
            "jaxinfra.bench.eplb", "jaxinfra.bench.pipeline", "jaxinfra.bench.ckpt")


@dataclasses.dataclass(frozen=True)
class BenchSpec:
  name: str
  help: str
  run: Callable[["BenchContext"], None]


_REGISTRY: dict[str, BenchSpec] = {}


def register(name: str, help: str) -> Callable:  # pylint: disable=redefined-builtin
  """Decorator registering ``run(ctx)`` as ``jaxinfra bench <name>``."""
  def wrap(run: Callable[["BenchContext"], None]) -> Callable:
    _REGISTRY[name] = BenchSpec(name, help, run)
    return run
  return wrap


def registered() -> dict[str, BenchSpec]:
  for module in _MODULES:
    importlib.import_module(module)
  return dict(_REGISTRY)


def available_impls(*calls: _custom_call.CustomCall) -> list[str]:
  """``"xla"``, plus ``"ffi"`` when every call has a custom call on this platform."""
  platform = _custom_call.current_platform()
  impls = ["xla"]
  if calls and all(platform in _custom_call.available_platforms(c)
                   and not _custom_call.is_disabled(c) for c in calls):
    impls.append("ffi")
  return impls


def environment() -> dict[str, Any]:
  """Device and versions, recorded with every result."""
  device = jax.devices()[0]
  build = _custom_call.build_info()
  return {
      "device": device.device_kind,
      "platform": _custom_call.current_platform(),
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "jaxinfra": jaxinfra.__version__,
      "python": platform_lib.python_version(),
      "cuda_build": build.get("cuda_version") if build.get("cuda") else None,
      "platform_version": getattr(device.client, "platform_version", ""),
  }


def _block(tree: Any) -> None:
  jax.tree_util.tree_map(lambda a: a.block_until_ready() if hasattr(a, "block_until_ready")
                         else a, tree)


def median_time(fn: Callable, *args, iters: int, warmup: int = 1) -> float:
  """Median wall time in seconds of ``iters`` calls of ``fn(*args)`` after ``warmup`` calls."""
  for _ in range(warmup):
    _block(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    _block(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


class BenchContext:
  """What a benchmark gets: its size, a timer and a place for its rows."""

  def __init__(self, name: str, size: str, iters: int, console: Console, progress: Progress):
    self.name = name
    self.size = size          # "small" (CPU-sized) or "full" (the published configurations)
    self.iters = iters
    self.console = console
    self.progress = progress
    self.rows: list[dict[str, Any]] = []

  @property
  def full(self) -> bool:
    return self.size == "full"

  def time(self, fn: Callable, *args, warmup: int = 1) -> float:
    """Median wall time in seconds of ``fn(*args)`` (compiled first, outputs awaited)."""
    return median_time(fn, *args, iters=self.iters, warmup=warmup)

  def add(self, **row: Any) -> None:
    self.rows.append(row)

  def track(self, cases: Sequence[Any], description: str) -> Any:
    """Iterates over ``cases`` with a progress bar."""
    return self.progress.track(cases, description=description)


def _format(value: Any) -> str:
  if isinstance(value, float):
    if value == 0 or 1e-2 <= abs(value) < 1e5:
      return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return f"{value:.3e}"
  return str(value)


def _table(title: str, rows: list[dict[str, Any]]) -> Table:
  columns: list[str] = []
  for row in rows:
    columns += [k for k in row if k not in columns]
  table = Table(title=title)
  for column in columns:
    table.add_column(column, justify="right")
  for row in rows:
    table.add_row(*(_format(row.get(c, "")) for c in columns))
  return table


def main(name: str, *, size: str | None = None, iters: int = 10,
         json_path: str | None = None) -> int:
  """Runs benchmark ``name``; returns the exit status."""
  benchmarks = registered()
  if name not in benchmarks:
    raise ValueError(f"unknown benchmark {name!r}; available: {', '.join(sorted(benchmarks))}")
  if size is None:
    size = "small" if jax.default_backend() == "cpu" else "full"
  if size not in ("small", "full"):
    raise ValueError(f"size must be 'small' or 'full', got {size!r}")
  console = Console()
  env = environment()
  with Progress(console=console, transient=True) as progress:
    ctx = BenchContext(name, size, iters, console, progress)
    benchmarks[name].run(ctx)
  console.print(_table(f"jaxinfra bench {name} ({size}) on {env['device']} "
                       f"[jax {env['jax']}]", ctx.rows))
  if json_path:
    with open(json_path, "w") as f:
      json.dump({"benchmark": name, "size": size, "iters": iters, "environment": env,
                 "rows": ctx.rows}, f, indent=1, default=_json_default)
    console.print(f"wrote {json_path}")
  return 0


def _json_default(value: Any) -> Any:
  if isinstance(value, (np.generic,)):
    return value.item()
  raise TypeError(f"not JSON serializable: {type(value).__name__}")
