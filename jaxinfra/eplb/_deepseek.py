"""DeepSeek's EPLB algorithm, written from its published description.

Kept for comparison and for matching placements that other systems compute; the
default policy (``jaxinfra.eplb._improved``) balances better and never wastes a
slot on a second replica of an expert on the same GPU.
"""

from __future__ import annotations

import numpy as np

from jaxinfra.eplb import _packing


def rebalance(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
              num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
  """The three steps: groups to nodes, replicas within nodes, replicas to GPUs.

  Args:
    weight: ``[L, E]`` float64 loads.

  Returns:
    ``(phy2log [L, P], phyrank [L, P])``: the logical expert of every physical
    slot and its replica index. Slot ``p`` lives on GPU ``p // (P / num_gpus)``.
  """
  layers, experts = weight.shape
  group_size = experts // num_groups
  groups_per_node = num_groups // num_nodes
  gpus_per_node = num_gpus // num_nodes
  slots_per_gpu = num_replicas // num_gpus
  experts_per_node = experts // num_nodes
  slots_per_node = num_replicas // num_nodes

  # 1. Groups to nodes; renumber experts so node n owns [n * E/N, (n+1) * E/N).
  group_load = weight.reshape(layers, num_groups, group_size).sum(-1)
  group_node, group_rank = _packing.greedy_packing(group_load, num_nodes)
  log2mlog = (((group_node * groups_per_node + group_rank) * group_size)[:, :, None]
              + np.arange(group_size)).reshape(layers, experts)
  mlog2log = _packing.inverse_permutation(log2mlog)

  # 2. Replicate within each node: one row per (layer, node).
  node_weight = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, experts_per_node)
  phy2mlog, phyrank, mlogcnt = _packing.replicate(node_weight, slots_per_node)

  # 3. Pack each node's replicas onto its GPUs.
  replica_load = np.take_along_axis(node_weight / mlogcnt, phy2mlog, axis=1)
  gpu, rank = _packing.greedy_packing(replica_load, gpus_per_node)
  pphy2phy = _packing.inverse_permutation(gpu * slots_per_gpu + rank)
  pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(layers, num_nodes, -1)
  pphy2mlog = (pphy2mlog + (np.arange(num_nodes) * experts_per_node)[:, None]).reshape(layers, -1)
  phy2log = np.take_along_axis(mlog2log, pphy2mlog, axis=1)
  phyrank = np.take_along_axis(phyrank, pphy2phy, axis=1).reshape(layers, -1)
  return phy2log, phyrank
