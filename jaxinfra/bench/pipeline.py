"""``jaxinfra bench pipeline``: measured vs simulated step time of every schedule.

Measures one stage's forward (F), full backward (B), input-gradient half (I),
weight-gradient half (W) and overlapped forward + backward pair (FB) on one
device, as the executor runs them, then times one training step of an MLP cut
into ``stages`` stages with each schedule over the pipeline mesh (DualPipeV on
half the ranks) and prints each schedule's measured step time beside two
predictions from the measured op times:

* ``simulated_ms``: :func:`jaxinfra.pipeline.simulate`'s makespan, where each
  rank runs an op as soon as its inputs arrive;
* ``lockstep_ms``: the executor's own model: all ranks advance one tick at a
  time, so a tick lasts as long as its slowest op (sum over ticks of the max
  op time);

with the schedules' ranks by each, and whether the measured order is the
simulated one. Schedules whose simulated step times lie within
``TIE_TOLERANCE`` of each other count as tied: either order agrees.

Stages: 8 on accelerators (the devices there). On CPU, one stage per core (an
even number, at most 8; 2 on a 2-core host), each device in a process of its
own pinned to its own core where the OS allows it (Linux; ``jax.distributed``
on 127.0.0.1, gloo collectives): XLA:CPU spreads every op over all the cores a process may use,
so CPU devices that share a process share its cores and run one after the
other, and a step of P such devices measures the total work, not the bubbles.
Each process measures the op times on its own core, as its device runs them.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra import pipeline as pl
from jaxinfra.pipeline import executor as pl_executor
from jaxinfra.bench import _harness

_SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")
# (hidden, tokens per micro-batch, micro-batches)
_SMALL = (1024, 512, 16)
_FULL = (4096, 4096, 16)
# Relative difference of simulated step times under which two schedules count as tied.
TIE_TOLERANCE = 0.05


def _stage(p, x):
  return x + jax.nn.gelu(x @ p["w1"]) @ p["w2"]


def _loss(_, y, target):
  return jnp.mean((y - target) ** 2)


def _cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _num_stages() -> int:
  if jax.default_backend() != "cpu":
    return max(2, min(8, len(jax.devices()) // 2 * 2))
  return max(2, min(8, _cores() // 2 * 2))


def _problem(hidden: int, tokens: int, chunks: int, stages: int) -> dict[str, np.ndarray]:
  """The MLP's stacked stage parameters, inputs and targets (float32, seeded)."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
  return {"w1": normal(stages, hidden, 2 * hidden) / np.float32(np.sqrt(hidden)),
          "w2": normal(stages, 2 * hidden, hidden) / np.float32(np.sqrt(2 * hidden)),
          "x": normal(chunks * tokens, hidden), "target": normal(chunks * tokens, hidden)}


def _forward(p, x):
  """The stage's output and the residuals the executor stashes (its VJP less the parameters)."""
  y, vjp = jax.vjp(_stage, p, x)
  return y, pl_executor.split_residuals(vjp, p)[2]


def _stage_times(p, x, iters: int) -> dict[str, float]:
  """Seconds of F (forward keeping residuals), B, I (input grad), W, FB on one device."""
  g = jnp.ones_like(x)
  forward = jax.jit(_forward)
  _, vjp = jax.jit(lambda p, x: jax.vjp(_stage, p, x))(p, x)

  @jax.jit
  def full(vjp, g):
    return vjp(g)

  @jax.jit
  def weight(vjp, g):
    return vjp(g)[0]

  @jax.jit
  def input_grad(vjp, g):
    return vjp(g)[1]

  @jax.jit
  def fb(p, x, vjp, g):
    return _forward(p, x), vjp(g)

  time = lambda fn, *args: _harness.median_time(fn, *args, iters=iters)
  times = {"F": time(forward, p, x), "B": time(full, vjp, g), "I": time(input_grad, vjp, g),
           "W": time(weight, vjp, g), "FB": time(fb, p, x, vjp, g)}
  times["W"] = min(times["W"], times["B"])
  return times


def _replicated(mesh: jax.sharding.Mesh, value: np.ndarray) -> jax.Array:
  """``value`` on every device of ``mesh`` (which may span processes)."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def measure(hidden: int, tokens: int, chunks: int, stages: int, iters: int,
            schedules: list[str]) -> dict:
  """This process's measurements: op times and each schedule's step time.

  Runs in every process of the pipeline (one on accelerators; one per pinned
  CPU core otherwise). A schedule's mesh is the first ``ranks`` devices; a
  process holding none of them skips it.

  Returns:
    ``{"times": {op: seconds}, "steps": {schedule: seconds or None}}``.
  """
  problem = _problem(hidden, tokens, chunks, stages)
  local = jax.local_devices()[0]
  stage0 = {k: jax.device_put(problem[k][0], local) for k in ("w1", "w2")}
  times = _stage_times(stage0, jax.device_put(problem["x"][:tokens], local), iters)
  steps: dict[str, float | None] = {}
  for name in schedules:
    ranks = stages // 2 if name == "dualpipev" else stages
    devices = jax.devices()[:ranks]
    if len(devices) < ranks or not any(d.process_index == jax.process_index() for d in devices):
      steps[name] = None
      continue
    mesh = jax.make_mesh((ranks,), ("pp",), devices=devices,
                         axis_types=(jax.sharding.AxisType.Explicit,))
    arrays = {k: _replicated(mesh, v) for k, v in problem.items()}
    params = {"w1": arrays["w1"], "w2": arrays["w2"]}
    step = lambda: pl.pipeline_step(_stage, params, arrays["x"], arrays["target"], _loss,
                                    mesh=mesh, schedule=name, num_chunks=chunks)
    steps[name] = _harness.median_time(step, iters=iters)
  return {"times": times, "steps": steps}


def _measure_in_pinned_processes(sizes: tuple[int, int, int], stages: int, iters: int,
                                 schedules: list[str]) -> dict:
  from jaxinfra.testing import multiprocess  # pylint: disable=g-import-not-at-top
  results = multiprocess.run_multiprocess(
      measure, num_processes=stages, devices_per_process=1,
      pin_cores=hasattr(os, "sched_setaffinity"),
      args=(*sizes, stages, iters, list(schedules)), timeout=3600)
  return results[0]


def _lockstep(schedule: pl.Schedule, times: dict[str, float]) -> float:
  total = 0.0
  for row in pl.tick_table(schedule):
    total += max((pl.op_time(op, **times) for op in row if op is not None), default=0.0)
  return total


def _ranks(values: list[float]) -> list[int]:
  order = np.argsort(values, kind="stable")
  ranks = [0] * len(values)
  for position, i in enumerate(order):
    ranks[i] = position + 1
  return ranks


def disagreements(names: list[str], measured: list[float], predicted: list[float],
                  tolerance: float = TIE_TOLERANCE) -> list[tuple[str, str]]:
  """Pairs ``(a, b)`` predicted faster-slower by more than ``tolerance`` but measured not."""
  out = []
  for i, a in enumerate(names):
    for j, b in enumerate(names):
      if predicted[i] < predicted[j] * (1 - tolerance) and measured[i] >= measured[j]:
        out.append((a, b))
  return out


@_harness.register("pipeline", "pipeline schedules: measured vs simulated step time")
def run(ctx: _harness.BenchContext) -> None:
  sizes = _FULL if ctx.full else _SMALL
  chunks = sizes[2]
  stages = _num_stages()
  schedules = list(_SCHEDULES)
  if jax.default_backend() == "cpu":
    with ctx.console.status(f"running {stages} processes, one per core"):
      found = _measure_in_pinned_processes(sizes, stages, ctx.iters, schedules)
  else:
    found = measure(*sizes, stages, ctx.iters, schedules)
  times = found["times"]
  for op in ("F", "B", "I", "W", "FB"):
    ctx.add(schedule=f"op {op}", ms=times[op] * 1e3)

  results = []
  for name in schedules:
    ranks = stages // 2 if name == "dualpipev" else stages
    if found["steps"][name] is None:
      ctx.console.print(f"[yellow]skipping {name}: needs {ranks} devices")
      continue
    schedule = pl.make_schedule(name, ranks, chunks)
    sim = pl.simulate(schedule, **times)
    results.append((name, ranks, found["steps"][name], sim.makespan, _lockstep(schedule, times),
                    max(sim.peak_activations)))
  if not results:
    return
  names = [r[0] for r in results]
  by_measured = _ranks([r[2] for r in results])
  by_sim = _ranks([r[3] for r in results])
  by_lockstep = _ranks([r[4] for r in results])
  for i, (name, ranks, measured, simulated, lockstep, peak) in enumerate(results):
    ctx.add(schedule=name, ranks=ranks, stages=stages, chunks=chunks, ms=measured * 1e3,
            simulated_ms=simulated * 1e3, lockstep_ms=lockstep * 1e3,
            rank_measured=by_measured[i], rank_simulated=by_sim[i],
            rank_lockstep=by_lockstep[i], peak_activations=peak)
  measured = [r[2] for r in results]
  lines = [f"ranking by measured time:  {_order(results, 2)}"]
  for label, column in (("simulation", 3), ("lockstep model", 4)):
    wrong = disagreements(names, measured, [r[column] for r in results])
    verdict = ("agrees" if not wrong else
               "differs: " + ", ".join(f"{a} measured no faster than {b}" for a, b in wrong))
    lines.append(f"ranking by {label + ':':16s} {_order(results, column)}  ({verdict}; "
                 f"ties within {TIE_TOLERANCE:.0%})")
  ctx.console.print("\n".join(lines))


def _order(results, column: int) -> str:
  return " < ".join(r[0] for r in sorted(results, key=lambda r: r[column]))
