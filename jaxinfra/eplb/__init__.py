"""EPLB for JAX: expert placement, migration-aware rebalancing, load tracking, and
the arrays and shardings jitted MoE code needs for replicated experts.

* :func:`rebalance_experts`: placements (``phy2log``, ``log2phy``, ``logcnt``)
  from per-expert loads; ``policy="deepseek"`` is DeepSeek's algorithm exactly,
  the default ``"auto"`` the improved one (see ``jaxinfra.eplb.policy``).
* :class:`ExpertPlacement`: the placement as a pytree: ``physical_weights``,
  ``partition_spec``/``sharding``, ``route``; :func:`relayout` moves weights
  between placements inside ``jit``.
* :class:`LoadTracker` and :func:`expert_counts`: the loads to rebalance with.
* :func:`zipf_loads`: deterministic skewed loads for tests and benchmarks.
"""

from jaxinfra.eplb.placement import ExpertPlacement, relayout, relayout_shard
from jaxinfra.eplb.policy import POLICIES, Migration, Rebalanced, rebalance_experts
from jaxinfra.eplb.report import gpu_loads, imbalance
from jaxinfra.eplb.synthetic import drift, zipf_loads
from jaxinfra.eplb.tracker import LoadTracker, expert_counts

__all__ = ["ExpertPlacement", "LoadTracker", "Migration", "POLICIES", "Rebalanced", "drift",
           "expert_counts", "gpu_loads", "imbalance", "rebalance_experts", "relayout",
           "relayout_shard", "zipf_loads"]
