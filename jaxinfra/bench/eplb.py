"""``jaxinfra bench eplb``: placement quality and speed at DeepSeek-V3 scale.

Loads: ``jaxinfra.eplb.zipf_loads(61, 256, exponent=1, seed=0)``. For each
configuration (288 and 320 slots on 4 and 8 nodes of 8 GPUs, 8 groups, under
the hierarchical and the global policy) and each policy (``deepseek``,
``auto``): median and worst max/mean GPU load over the 61 layers, layers where
``auto`` is worse than ``deepseek``, same-GPU replicas the distinct-GPU rule
forbids, and the time for all 61 layers (wall, median of ``--iters``; and
process CPU time). Then migration after a 10% drift (``drift(w, 0.1, seed=1)``):
replicas moved by the migration-aware mode, by the placement from scratch (slots
whose expert changes), and by the placement from scratch relabelled onto the old
GPUs; and the worst layer's max load relative to the fresh placement.

EPLB runs on the host in NumPy, so ``small`` and ``full`` are the same sizes;
``small`` uses fewer timing repetitions (at most 3).
"""

from __future__ import annotations

import time

import numpy as np

from jaxinfra import eplb
from jaxinfra.bench import _harness
from jaxinfra.eplb import _improved, _migration, _packing

# (slots, groups, nodes, gpus, policy)
_CASES = [(288, 8, 4, 32, "hierarchical"), (320, 8, 8, 64, "hierarchical"),
          (288, 8, 4, 32, "global"), (320, 8, 8, 64, "global")]


def forbidden_same_gpu(phy2log: np.ndarray, num_gpus: int, domain_gpus: int) -> int:
  """Replicas sharing a GPU with another replica of their expert although the
  expert has no more replicas than ``domain_gpus``."""
  counts = _packing.replica_counts(phy2log, int(phy2log.max()) + 1)
  held = _improved.held_matrix(phy2log, counts.shape[1], num_gpus)
  extra = np.maximum(held - 1, 0) * (counts[:, None, :] <= domain_gpus)
  return int(extra.sum())


def _timed(ctx, fn, *args):
  cpu = time.process_time()
  wall = ctx.time(fn, *args, warmup=0)
  runs = ctx.iters
  return wall, (time.process_time() - cpu) / runs


@_harness.register("eplb", "expert placement: balance, same-GPU replicas, migration, speed")
def run(ctx: _harness.BenchContext) -> None:
  if not ctx.full:
    ctx.iters = min(ctx.iters, 3)
  w = eplb.zipf_loads(61, 256, exponent=1.0, seed=0)
  drifted = eplb.drift(w, 0.1, seed=1)
  for slots, groups, nodes, gpus, policy in ctx.track(_CASES, "eplb"):
    config = (slots, groups, nodes, gpus)
    domain = gpus // nodes if policy == "hierarchical" else gpus
    ds_config = config if policy == "hierarchical" else (slots, 1, 1, gpus)
    base = None
    for name in ("deepseek", "auto"):
      args = (w, *ds_config) if name == "deepseek" else (w, *config)
      kwargs = {"policy": "deepseek" if name == "deepseek" else policy}
      result = eplb.rebalance_experts(*args, **kwargs)
      wall, cpu = _timed(ctx, lambda: eplb.rebalance_experts(*args, **kwargs))
      ratio = eplb.imbalance(w, result.phy2log, gpus)
      if base is None:
        base = ratio
      ctx.add(case=f"{slots} slots, {nodes}x{gpus // nodes} GPUs", policy=f"{name} ({policy})",
              median_max_mean=float(np.median(ratio)), worst_max_mean=float(ratio.max()),
              layers_worse_than_deepseek=int((ratio > base * (1 + 1e-12)).sum()),
              forbidden_same_gpu=forbidden_same_gpu(result.phy2log, gpus, domain),
              ms_61_layers=wall * 1e3, cpu_ms_61_layers=cpu * 1e3)
    previous = eplb.rebalance_experts(w, *config, policy=policy)
    start = time.perf_counter()
    *_, report = eplb.rebalance_experts(drifted, *config, policy=policy, previous=previous)
    seconds = time.perf_counter() - start
    moved, scratch = report.total_replicas_moved, int(report.from_scratch_moved.sum())
    # The fresh placement relabelled onto the old GPUs: what relabelling alone saves.
    fresh = eplb.rebalance_experts(drifted, *config, policy=policy).phy2log
    nodes_used = nodes if policy == "hierarchical" else 1
    aligned = _migration.align(previous.phy2log.astype(np.int64), fresh.astype(np.int64),
                               nodes_used, gpus)
    ctx.add(case=f"{slots} slots, {nodes}x{gpus // nodes} GPUs",
            policy=f"migration ({policy}, 10% drift)",
            replicas_moved=moved, from_scratch_moved=scratch,
            relabelled_fresh_moved=int(_migration.moved_replicas(previous.phy2log, aligned,
                                                                 gpus).sum()),
            moved_fraction=moved / max(scratch, 1),
            worst_peak_vs_fresh=float((report.peak / report.from_scratch_peak).max()),
            ms_61_layers=seconds * 1e3)
