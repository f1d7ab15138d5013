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

with the schedules' ranks by each. Stages: 8 on accelerators (the devices
there); on CPU one device per pair of cores up to 8 (2 on a 2-core host), since
CPU devices share the host's cores and a pipeline of more devices than cores
measures total work, not bubbles. For steadier CPU numbers give each device one
thread: ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
intra_op_parallelism_threads=1"``.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra import pipeline as pl
from jaxinfra.bench import _harness

try:  # the pipeline needs several devices; on CPU ask for 8 unless the user chose
  if jax.config.jax_num_cpu_devices == -1:
    jax.config.update("jax_num_cpu_devices", 8)
except RuntimeError:  # backends already started: use the devices there are
  pass

_SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")
# (hidden, tokens per micro-batch, micro-batches)
_SMALL = (256, 512, 16)
_FULL = (4096, 4096, 16)


def _stage(p, x):
  return x + jax.nn.gelu(x @ p["w1"]) @ p["w2"]


def _loss(_, y, target):
  return jnp.mean((y - target) ** 2)


def _num_stages() -> int:
  if jax.default_backend() != "cpu":
    return max(2, min(8, len(jax.devices()) // 2 * 2))
  return max(2, min(8, (os.cpu_count() or 2) // 2 * 2))


def _stage_times(ctx: _harness.BenchContext, p, x) -> dict[str, float]:
  """Seconds of F (forward keeping residuals), B, I (input grad), W, FB on one device."""
  g = jnp.ones_like(x)
  forward = jax.jit(lambda p, x: jax.vjp(_stage, p, x))
  _, vjp = forward(p, x)

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
    return jax.vjp(_stage, p, x), vjp(g)

  return {"F": ctx.time(forward, p, x), "B": ctx.time(full, vjp, g),
          "I": ctx.time(input_grad, vjp, g), "W": ctx.time(weight, vjp, g),
          "FB": ctx.time(fb, p, x, vjp, g)}


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


@_harness.register("pipeline", "pipeline schedules: measured vs simulated step time")
def run(ctx: _harness.BenchContext) -> None:
  hidden, tokens, chunks = _FULL if ctx.full else _SMALL
  devices = jax.devices()
  stages = _num_stages()
  k = jax.random.split(jax.random.key(0), 4)
  params = {"w1": jax.random.normal(k[0], (stages, hidden, 2 * hidden)) / np.sqrt(hidden),
            "w2": jax.random.normal(k[1], (stages, 2 * hidden, hidden)) / np.sqrt(2 * hidden)}
  stage0 = jax.tree_util.tree_map(lambda a: a[0], params)
  x = jax.random.normal(k[2], (chunks * tokens, hidden))
  target = jax.random.normal(k[3], (chunks * tokens, hidden))
  times = _stage_times(ctx, stage0, x[:tokens])
  times["W"] = min(times["W"], times["B"])
  for op in ("F", "B", "I", "W", "FB"):
    ctx.add(schedule=f"op {op}", ms=times[op] * 1e3)

  cases = [(name, stages // 2 if name == "dualpipev" else stages) for name in _SCHEDULES]
  results = []
  for name, ranks in ctx.track(cases, "schedules"):
    if ranks > len(devices):
      ctx.console.print(f"[yellow]skipping {name}: needs {ranks} devices, have {len(devices)} "
                        "(on CPU set JAX_NUM_CPU_DEVICES=8)")
      continue
    mesh = jax.make_mesh((ranks,), ("pp",), devices=devices[:ranks],
                         axis_types=(jax.sharding.AxisType.Explicit,))
    step = functools.partial(pl.pipeline_step, _stage, params, x, target, _loss, mesh=mesh,
                             schedule=name, num_chunks=chunks)
    measured = ctx.time(lambda: step())
    schedule = pl.make_schedule(name, ranks, chunks)
    sim = pl.simulate(schedule, **times)
    results.append((name, ranks, measured, sim.makespan, _lockstep(schedule, times),
                    max(sim.peak_activations)))
  by_measured = _ranks([r[2] for r in results])
  by_sim = _ranks([r[3] for r in results])
  by_lockstep = _ranks([r[4] for r in results])
  for i, (name, ranks, measured, simulated, lockstep, peak) in enumerate(results):
    ctx.add(schedule=name, ranks=ranks, stages=stages, chunks=chunks, ms=measured * 1e3,
            simulated_ms=simulated * 1e3, lockstep_ms=lockstep * 1e3,
            rank_measured=by_measured[i], rank_simulated=by_sim[i],
            rank_lockstep=by_lockstep[i], peak_activations=peak)
  if results:
    ctx.console.print(
        f"ranking by measured time: {_order(results, 2)}\n"
        f"ranking by simulation:    {_order(results, 3)}"
        f"{'  (same)' if by_measured == by_sim else '  (differs)'}\n"
        f"ranking by lockstep model: {_order(results, 4)}"
        f"{'  (same)' if by_measured == by_lockstep else '  (differs)'}")


def _order(results, column: int) -> str:
  return " < ".join(r[0] for r in sorted(results, key=lambda r: r[column]))
