"""NumPy building blocks shared by the placement policies.

Every function works on a batch of independent rows (one row per layer, or per
(layer, node)) and loops only over items, never over rows, so 61 layers cost
about as much as one.
"""

from __future__ import annotations

import numpy as np


def descending_order(weight: np.ndarray) -> np.ndarray:
  """Indices sorting each row of ``weight [X, n]`` by decreasing weight; ties keep
  the lower index first (a stable sort)."""
  return np.argsort(-weight, axis=-1, kind="stable")


def greedy_packing(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
  """DeepSeek's balanced packing: ``weight [X, n]`` into ``num_packs`` packs of
  exactly ``n / num_packs`` items each.

  Items are taken heaviest first (ties: lower index first) and each goes to the
  lightest pack that still has room (ties: lowest pack index). With one item
  per pack, item ``j`` goes to pack ``j``.

  Returns:
    ``(pack [X, n] int64, rank_in_pack [X, n] int64)``.
  """
  rows, n = weight.shape
  per_pack = n // num_packs
  if per_pack == 1:
    ident = np.broadcast_to(np.arange(n), (rows, n)).copy()
    return ident, np.zeros((rows, n), np.int64)
  order = descending_order(weight)
  pack = np.empty((rows, n), np.int64)
  rank = np.empty((rows, n), np.int64)
  loads = np.zeros((rows, num_packs))
  counts = np.zeros((rows, num_packs), np.int64)
  row_ids = np.arange(rows)
  for i in range(n):
    item = order[:, i]
    chosen = np.argmin(np.where(counts < per_pack, loads, np.inf), axis=-1)
    pack[row_ids, item] = chosen
    rank[row_ids, item] = counts[row_ids, chosen]
    counts[row_ids, chosen] += 1
    loads[row_ids, chosen] += weight[row_ids, item]
  return pack, rank


def dhondt_counts(weight: np.ndarray, num_slots: int) -> np.ndarray:
  """Replica counts ``[X, n]`` summing to ``num_slots`` per row: one replica per
  item, then each extra replica to the item with the largest load per replica
  (ties: lower index). This minimizes the largest ``weight / count``."""
  rows, n = weight.shape
  counts = np.ones((rows, n), np.int64)
  row_ids = np.arange(rows)
  for _ in range(num_slots - n):
    counts[row_ids, np.argmax(weight / counts, axis=-1)] += 1
  return counts


def replicate(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """DeepSeek's replication: slots ``0..n-1`` hold items ``0..n-1``; each extra
  slot goes, in order, to the item with the largest load per replica.

  Returns:
    ``(slot_item [X, num_slots], slot_rank [X, num_slots], counts [X, n])``,
    where ``slot_rank`` is the replica index of the slot within its item.
  """
  rows, n = weight.shape
  slot_item = np.empty((rows, num_slots), np.int64)
  slot_rank = np.zeros((rows, num_slots), np.int64)
  slot_item[:, :n] = np.arange(n)
  counts = np.ones((rows, n), np.int64)
  row_ids = np.arange(rows)
  for i in range(n, num_slots):
    item = np.argmax(weight / counts, axis=-1)
    slot_item[:, i] = item
    slot_rank[:, i] = counts[row_ids, item]
    counts[row_ids, item] += 1
  return slot_item, slot_rank, counts


def inverse_permutation(perm: np.ndarray) -> np.ndarray:
  """Row-wise inverse of permutations ``perm [X, n]``."""
  inv = np.empty_like(perm)
  np.put_along_axis(inv, perm, np.broadcast_to(np.arange(perm.shape[-1]), perm.shape), axis=-1)
  return inv


def replica_ranks(phy2log: np.ndarray, num_logical: int) -> np.ndarray:
  """For each slot of ``phy2log [L, P]``, how many earlier slots hold the same
  expert (its replica index)."""
  del num_logical
  layers, slots = phy2log.shape
  order = np.argsort(phy2log, axis=1, kind="stable")
  ordered = np.take_along_axis(phy2log, order, axis=1)
  pos = np.broadcast_to(np.arange(slots), (layers, slots))
  starts = np.where(np.concatenate([np.ones((layers, 1), bool),
                                    ordered[:, 1:] != ordered[:, :-1]], axis=1), pos, 0)
  rank_sorted = pos - np.maximum.accumulate(starts, axis=1)
  ranks = np.empty((layers, slots), np.int64)
  np.put_along_axis(ranks, order, rank_sorted, axis=1)
  return ranks


def replica_counts(slot_item: np.ndarray, num_items: int) -> np.ndarray:
  """Replicas of each item ``[X, num_items]`` int64 in ``slot_item [X, S]``."""
  counts = np.zeros((slot_item.shape[0], num_items), np.int64)
  np.add.at(counts, (np.arange(slot_item.shape[0])[:, None], slot_item), 1)
  return counts


def logical_to_physical(phy2log: np.ndarray, phyrank: np.ndarray,
                        num_logical: int) -> tuple[np.ndarray, np.ndarray]:
  """``log2phy [L, E, max_replicas]`` (-1 padded) and ``logcnt [L, E]`` with
  ``log2phy[l, phy2log[l, p], phyrank[l, p]] == p``."""
  layers, slots = phy2log.shape
  logcnt = replica_counts(phy2log, num_logical)
  width = int(logcnt.max())
  log2phy = np.full((layers, num_logical * width), -1, np.int64)
  np.put_along_axis(log2phy, phy2log * width + phyrank,
                    np.broadcast_to(np.arange(slots), phy2log.shape), axis=1)
  return log2phy.reshape(layers, num_logical, width), logcnt
