"""The default placement policy: DeepSeek's structure, better balance, no wasted slots.

Same three decisions as DeepSeek's algorithm (groups to nodes, replica counts,
replicas to GPUs) and the same structure (every group on one node under the
hierarchical policy), with three changes:

* **Distinct GPUs.** Replicas of one expert go to different GPUs of its domain
  (its node, or all GPUs under the global policy); only an expert with more
  replicas than the domain has GPUs may hold ``ceil(count / gpus)`` replicas on
  one GPU.
* **Replica counts chosen with the packing.** DeepSeek's counts minimize the
  largest load per replica; on skewed loads that leaves lumps that no packing
  can balance (a node whose hottest expert carries 60% of its load). Besides
  those counts (packed heaviest replica first onto the lightest GPU that does
  not hold the expert yet, or dealt round-robin where that gets stuck), we
  build placements against a target GPU load ``T``: experts in
  decreasing load order each take the fewest replicas that fit onto distinct
  GPUs under ``T``, keeping room for the experts still to come; free slots then
  get extra replicas. Several targets between the lower bound ``W / gpus`` and
  the first placement's maximum are tried at once (they are rows of one batch),
  and the best placement per domain wins.
* **Improvement steps.** Every candidate ends with a local search that swaps a
  replica on the most loaded GPU with a lighter one elsewhere while that lowers
  the pair's maximum (and keeps replicas on distinct GPUs).

Groups go to nodes as in DeepSeek (greedy, equal group counts), followed by the
same swap search on node loads; where the swaps changed the assignment, both
assignments are placed and each layer keeps the better. Everything is vectorized
over layers and nodes: loops run over items, never over rows.

On Zipf loads at DeepSeek-V3 scale this is never worse than DeepSeek's algorithm
on any layer (tested). It is not a guarantee for every input: on small domains
where DeepSeek's same-GPU replicas amount to an uneven split that helps, the
distinct-GPU rule can cost a little balance on some layers.
"""

from __future__ import annotations

import numpy as np

from jaxinfra.eplb import _packing

_REL = 1e-12        # relative tolerance for load comparisons
_MAX_STEPS = 4096   # bound on local-search steps (each step strictly improves a row)
# Target construction: fractions of the way from the lower bound to the first
# placement's maximum (squared spacing: most candidates near the bound), and how
# much room (in units of the average remaining load per free slot) a GPU keeps
# for the experts still to come.
_TARGET_FRACTIONS = np.linspace(0.0, 1.0, 4) ** 2
_RESERVES = (0.5, 1.0)
_FITS = (True, False)
# Domains whose first placement is within this fraction of the lower bound skip
# the target construction.
_NEAR_OPTIMAL = 1e-3


def replica_cap(counts: np.ndarray, num_gpus: int) -> np.ndarray:
  """Most replicas of an expert that one GPU may hold: 1, or ``ceil(count / gpus)``
  for an expert with more replicas than its domain has GPUs."""
  return np.where(counts > num_gpus, -(-counts // num_gpus), 1)


def _expand(counts: np.ndarray) -> np.ndarray:
  """Replica list ``[X, S]`` of item ids from ``counts [X, n]`` (equal row sums)."""
  rows, n = counts.shape
  ids = np.broadcast_to(np.arange(n), (rows, n)).reshape(-1)
  return np.repeat(ids, counts.reshape(-1)).reshape(rows, -1)


def gpu_loads(weight: np.ndarray, slots: np.ndarray, counts: np.ndarray,
              num_gpus: int) -> np.ndarray:
  """Loads ``[X, num_gpus]`` of slot layout ``slots [X, S]`` (item per slot,
  GPU-major) when item ``e`` splits ``weight[e]`` evenly over ``counts[e]``."""
  per_slot = np.take_along_axis(weight / np.maximum(counts, 1), slots, axis=1)
  return per_slot.reshape(slots.shape[0], num_gpus, slots.shape[1] // num_gpus).sum(-1)


# --- packing replicas onto GPUs -----------------------------------------------------------------


def lpt_distinct(weight: np.ndarray, counts: np.ndarray, num_gpus: int) -> np.ndarray:
  """Greedy packing of the replicas given by ``counts [X, n]`` onto ``num_gpus``
  GPUs of equal slot count, heaviest replica first onto the lightest GPU that has
  room and does not hold the expert yet (at most its :func:`replica_cap`).

  Returns:
    ``slots [X, S]``: the item in each slot, GPU-major.
  """
  rows, n = weight.shape
  num_slots = int(counts[0].sum())
  per_gpu = num_slots // num_gpus
  items = _expand(counts)
  share = np.take_along_axis(weight / counts, items, axis=1)
  order = _packing.descending_order(share)
  items = np.take_along_axis(items, order, axis=1)
  share = np.take_along_axis(share, order, axis=1)
  cap = replica_cap(counts, num_gpus)
  r = np.arange(rows)
  loads = np.zeros((rows, num_gpus))
  filled = np.zeros((rows, num_gpus), np.int64)
  held = np.zeros((rows, num_gpus, n), np.int64)
  slots = np.empty((rows, num_gpus, per_gpu), np.int64)
  for i in range(num_slots):
    e = items[:, i]
    room = filled < per_gpu
    ok = room & (held[r, :, e] < cap[r, e][:, None])
    ok = np.where(ok.any(1)[:, None], ok, room)  # stuck: solve_domains deals it cyclically
    g = np.argmin(np.where(ok, loads, np.inf), axis=1)
    slots[r, g, filled[r, g]] = e
    filled[r, g] += 1
    loads[r, g] += share[:, i]
    held[r, g, e] += 1
  return slots.reshape(rows, num_slots)


def cyclic_deal(weight: np.ndarray, counts: np.ndarray, num_gpus: int) -> np.ndarray:
  """Replicas dealt round-robin over the GPUs, expert by expert (heaviest
  per-replica load first): an expert's ``c`` replicas are consecutive, so no GPU
  gets more than ``ceil(c / gpus)`` of them (one when ``c <= gpus``). Always
  satisfies the distinct-GPU rule; the fallback when :func:`lpt_distinct` cannot.

  Returns:
    ``slots [X, S]``, GPU-major.
  """
  rows = weight.shape[0]
  per_replica = weight / counts
  order = _packing.descending_order(per_replica)
  dealt = _expand(np.take_along_axis(counts, order, axis=1))          # positions in `order`
  items = np.take_along_axis(order, dealt, axis=1)                    # [X, S] in deal order
  return items.reshape(rows, -1, num_gpus).transpose(0, 2, 1).reshape(rows, -1)


def violations(slots: np.ndarray, counts: np.ndarray, num_gpus: int) -> np.ndarray:
  """Rows ``[X]`` where some GPU holds more replicas of an expert than
  :func:`replica_cap` allows."""
  held = held_matrix(slots, counts.shape[1], num_gpus)
  return (held > replica_cap(counts, num_gpus)[:, None, :]).any(axis=(1, 2))


def held_matrix(slots: np.ndarray, num_items: int, num_gpus: int) -> np.ndarray:
  """``held [X, G, n]``: replicas of each item on each GPU of ``slots [X, S]``."""
  rows, num_slots = slots.shape
  held = np.zeros((rows, num_gpus, num_items), np.int64)
  np.add.at(held, (np.arange(rows)[:, None], np.arange(num_slots) // (num_slots // num_gpus),
                   slots), 1)
  return held


def swap_scores(share, slots, held, cap, loads, g):
  """Scores ``[R, k * S]`` of swapping slot ``g * k + i`` (on the most loaded
  GPU ``g``) with slot ``j`` (index ``i * S + j``): the larger of the two new
  loads, or inf where the swap is not an improvement (both new loads must stay
  below ``g``'s) or breaks :func:`replica_cap`."""
  rows, num_slots = slots.shape
  num_gpus = loads.shape[1]
  per_gpu = num_slots // num_gpus
  gpu_of = np.arange(num_slots) // per_gpu
  a = np.arange(rows)
  v = np.take_along_axis(share, slots, axis=1)                     # [R, S]
  top = loads[a, g]
  limit = (top * (1 - _REL))[:, None, None]
  pos_a = g[:, None] * per_gpu + np.arange(per_gpu)                # [R, k]
  va, ea = np.take_along_axis(v, pos_a, 1), np.take_along_axis(slots, pos_a, 1)
  delta = va[:, :, None] - v[:, None, :]                           # [R, k, S]
  new_g = top[:, None, None] - delta
  new_h = loads[:, gpu_of][:, None, :] + delta
  ok = (delta > 0) & (new_g < limit) & (new_h < limit) & (gpu_of != g[:, None])[:, None, :]
  ok &= held[a[:, None, None], gpu_of[None, None, :], ea[:, :, None]] < \
      np.take_along_axis(cap, ea, 1)[:, :, None]                    # e_a may join h
  ok &= (held[a[:, None], g[:, None], slots] < np.take_along_axis(cap, slots, 1))[:, None, :]
  return np.where(ok, np.maximum(new_g, new_h), np.inf).reshape(rows, -1)


def apply_swaps(slots, held, rows, g, best) -> None:
  """Applies the swaps ``best`` (indices into :func:`swap_scores`) in place."""
  num_slots = slots.shape[1]
  per_gpu = num_slots // held.shape[1]
  pa, pb = g * per_gpu + best // num_slots, best % num_slots
  ea, eb = slots[rows, pa], slots[rows, pb]
  slots[rows, pa], slots[rows, pb] = eb, ea
  h = pb // per_gpu
  np.add.at(held, (rows, g, ea), -1)
  np.add.at(held, (rows, g, eb), 1)
  np.add.at(held, (rows, h, eb), -1)
  np.add.at(held, (rows, h, ea), 1)


def swap_search(weight: np.ndarray, slots: np.ndarray, counts: np.ndarray,
                num_gpus: int) -> np.ndarray:
  """Local search: while some swap of a replica on the most loaded GPU ``g`` with
  a lighter replica on another GPU ``h`` leaves both below ``g``'s load (and
  respects :func:`replica_cap`), apply the swap with the lowest resulting
  maximum of the two. Other GPUs tied with ``g`` stay as they are, so every step
  removes ``g`` from the set of most loaded GPUs: the search terminates.

  Args:
    weight: ``[X, n]`` item loads; counts: ``[X, n]`` replicas per item.
    slots: ``[X, S]`` item per slot, GPU-major.

  Returns:
    The improved ``slots [X, S]`` (same replica counts per GPU and per item).
  """
  slots = slots.copy()
  share = weight / np.maximum(counts, 1)
  cap = replica_cap(counts, num_gpus)
  held = held_matrix(slots, weight.shape[1], num_gpus)
  active = np.arange(slots.shape[0])
  for _ in range(_MAX_STEPS):
    if active.size == 0:
      break
    s = slots[active]
    loads = gpu_loads(weight[active], s, counts[active], num_gpus)
    g = np.argmax(loads, axis=1)
    score = swap_scores(share[active], s, held[active], cap[active], loads, g)
    best = np.argmin(score, axis=1)
    found = np.isfinite(score[np.arange(active.size), best])
    active = active[found]
    apply_swaps(slots, held, active, g[found], best[found])
  return slots


# --- replica counts against a target load -------------------------------------------------------


def _place_replicas(slots, filled, loads, rows, e, share, count, key) -> None:
  """Puts ``count[r]`` replicas of item ``e[r]`` on the GPUs that sort first by ``key``."""
  order = np.argsort(key, axis=1, kind="stable")
  for j in range(int(count.max(initial=0))):
    m = count > j
    r, g = rows[m], order[m, j]
    slots[r, g, filled[r, g]] = e[m]
    filled[r, g] += 1
    loads[r, g] += share[m]


def construct(weight: np.ndarray, target: np.ndarray, reserve: np.ndarray, num_slots: int,
              num_gpus: int, best_fit: bool) -> tuple[np.ndarray, np.ndarray]:
  """Builds a placement per row aiming at GPU load ``target [X]``.

  Items in decreasing load order each take the fewest replicas ``c`` (on
  distinct GPUs, within the extra-slot budget) such that ``c`` GPUs with a free
  slot have room for ``weight / c`` under the target, after keeping
  ``reserve * (average remaining load per free slot)`` for each of their other
  free slots. Among the GPUs with room, ``best_fit`` picks those with the least
  room (else the most). An item that fits nowhere goes to the GPU with a free
  slot and the most room. Free slots at the end get extra replicas (the largest
  per-replica load that does not raise the maximum, else the smallest addition).

  Returns:
    ``(slots [X, S] GPU-major, counts [X, n])``.
  """
  rows_n, n = weight.shape
  per_gpu = num_slots // num_gpus
  rows = np.arange(rows_n)
  order = _packing.descending_order(weight)
  sorted_w = np.take_along_axis(weight, order, axis=1)
  remaining = np.cumsum(sorted_w[:, ::-1], axis=1)[:, ::-1] - sorted_w  # load after item i
  loads = np.zeros((rows_n, num_gpus))
  filled = np.zeros((rows_n, num_gpus), np.int64)
  slots = np.full((rows_n, num_gpus, per_gpu), -1, np.int64)
  counts = np.zeros((rows_n, n), np.int64)
  extra = np.full(rows_n, num_slots - n)
  choices = np.arange(1, num_gpus + 1)
  for i in range(n):
    e, w = order[:, i], sorted_w[:, i]
    free_after = num_slots - i - 1 - (num_slots - n - extra)
    per_slot = reserve * remaining[:, i] / np.maximum(free_after, 1)
    free = filled < per_gpu
    room = np.where(free, target[:, None] - loads - (per_gpu - filled - 1) * per_slot[:, None],
                    -np.inf)
    ranked = -np.sort(-room, axis=1)
    fits = (ranked >= w[:, None] / choices * (1 - _REL)) & (choices - 1 <= extra[:, None])
    any_fit = fits.any(axis=1)
    count = np.where(any_fit, np.argmax(fits, axis=1) + 1, 1)
    share = w / count
    ok = free & (room >= share[:, None] * (1 - _REL))
    key = np.where(ok, room if best_fit else -room, np.inf)
    key = np.where(any_fit[:, None], key, np.where(free, loads, np.inf))
    _place_replicas(slots, filled, loads, rows, e, share, count, key)
    counts[rows, e] = count
    extra -= count - 1
  _fill_free_slots(weight, slots, filled, loads, counts, num_gpus)
  return slots.reshape(rows_n, num_slots), counts


def _fill_free_slots(weight, slots, filled, loads, counts, num_gpus) -> None:
  """Fills every free slot with an extra replica (in place), lightest GPU first."""
  per_gpu = slots.shape[2]
  while True:
    free = filled < per_gpu
    r = np.nonzero(free.any(axis=1))[0]
    if r.size == 0:
      return
    a = np.arange(r.size)
    h = np.argmin(np.where(free[r], loads[r], np.inf), axis=1)
    on_h = np.zeros((r.size, weight.shape[1]), bool)
    here = slots[r, h]                                               # [R, k], -1 = empty
    on_h[np.repeat(a, per_gpu)[here.reshape(-1) >= 0], here[here >= 0]] = True
    w, c = weight[r], counts[r]
    added = w / (c + 1)
    allowed = ~on_h & (c < num_gpus)
    fits = allowed & (loads[r, h][:, None] + added <= loads[r].max(axis=1)[:, None])
    big = np.where(fits, w / c, -np.inf)
    e = np.where(np.isfinite(big.max(axis=1)), np.argmax(big, axis=1),
                 np.argmin(np.where(allowed, added, np.inf), axis=1))
    old, new = w[a, e] / c[a, e], w[a, e] / (c[a, e] + 1)
    loads[r] += (slots[r] == e[:, None, None]).sum(-1) * (new - old)[:, None]
    slots[r, h, filled[r, h]] = e
    filled[r, h] += 1
    loads[r, h] += new
    counts[r, e] += 1


def _best_target_placement(weight, lower, upper, num_slots, num_gpus):
  """Runs :func:`construct` for every candidate (target, reserve, fit) of every
  row and keeps each row's best placement."""
  rows, n = weight.shape
  cands = [(f, r, bf) for r in _RESERVES for bf in _FITS for f in _TARGET_FRACTIONS]
  per_row = len(cands)
  fraction, reserve, fit = (np.array(x) for x in zip(*cands))
  target = (lower[:, None] + (upper - lower)[:, None] * fraction).ravel()
  reserve, fit = np.tile(reserve, rows), np.tile(fit, rows)
  big_w = np.repeat(weight, per_row, axis=0)
  slots = np.empty((rows * per_row, num_slots), np.int64)
  counts = np.empty((rows * per_row, n), np.int64)
  for bf in _FITS:
    m = fit == bf
    slots[m], counts[m] = construct(big_w[m], target[m], reserve[m], num_slots, num_gpus, bf)
  peak = gpu_loads(big_w, slots, counts, num_gpus).max(axis=1).reshape(rows, per_row)
  pick = np.arange(rows) * per_row + np.argmin(peak, axis=1)
  return slots[pick], counts[pick]


# --- one domain: n items onto G GPUs with S slots -----------------------------------------------


def solve_domains(weight: np.ndarray, num_slots: int,
                  num_gpus: int) -> tuple[np.ndarray, np.ndarray]:
  """Best placement found for each row of ``weight [X, n]`` onto ``num_gpus``
  GPUs with ``num_slots`` slots in all.

  Returns:
    ``(slots [X, num_slots] item per slot GPU-major, counts [X, n])``.
  """
  rows, n = weight.shape
  counts = _packing.dhondt_counts(weight, num_slots)
  slots = lpt_distinct(weight, counts, num_gpus)
  stuck = violations(slots, counts, num_gpus)
  if stuck.any():
    slots[stuck] = cyclic_deal(weight[stuck], counts[stuck], num_gpus)
  slots = swap_search(weight, slots, counts, num_gpus)
  best = gpu_loads(weight, slots, counts, num_gpus).max(axis=1)
  if num_slots == n:  # no replication: nothing to choose
    return slots, counts
  lower = weight.sum(axis=1) / num_gpus
  todo = np.nonzero(best > lower * (1 + _NEAR_OPTIMAL))[0]
  if todo.size == 0:
    return slots, counts
  t_slots, t_counts = _best_target_placement(weight[todo], lower[todo], best[todo], num_slots,
                                             num_gpus)
  t_slots = swap_search(weight[todo], t_slots, t_counts, num_gpus)
  t_max = gpu_loads(weight[todo], t_slots, t_counts, num_gpus).max(axis=1)
  better = (t_max < best[todo]) & ~violations(t_slots, t_counts, num_gpus)
  slots[todo[better]], counts[todo[better]] = t_slots[better], t_counts[better]
  return slots, counts


# --- the policy ---------------------------------------------------------------------------------


def assign_groups(group_load: np.ndarray, num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
  """Node of every group ``[L, num_groups]`` with equal group counts per node:
  DeepSeek's greedy assignment, and the same improved by swaps between the most
  loaded node and the others.

  Returns:
    ``(greedy, improved)``, both ``[L, num_groups]``.
  """
  per_node = group_load.shape[1] // num_nodes
  node, rank = _packing.greedy_packing(group_load, num_nodes)
  slots = _packing.inverse_permutation(node * per_node + rank)      # group in each node slot
  slots = swap_search(group_load, slots, np.ones_like(slots), num_nodes)
  return node, _packing.inverse_permutation(slots) // per_node


def node_members(group_node: np.ndarray, group_size: int, num_nodes: int) -> np.ndarray:
  """Experts of every node ``[L * N, E / N]`` (in group order) given the node of
  every group ``[L, num_groups]`` (equal group counts per node)."""
  layers = group_node.shape[0]
  groups = np.argsort(group_node, axis=1, kind="stable").reshape(layers, num_nodes, -1)
  return (groups[..., None] * group_size + np.arange(group_size)).reshape(layers * num_nodes, -1)


def _place(weight, group_node, num_replicas, num_nodes, num_gpus):
  """Replicas of each node's experts onto its GPUs: ``phy2log [L', P]``."""
  layers, experts = weight.shape
  members = node_members(group_node, experts // group_node.shape[1], num_nodes)
  node_w = np.take_along_axis(weight, members.reshape(layers, -1), axis=1).reshape(
      layers * num_nodes, -1)
  slots, _ = solve_domains(node_w, num_replicas // num_nodes, num_gpus // num_nodes)
  return np.take_along_axis(members, slots, axis=1).reshape(layers, num_replicas)


def layer_peak(weight: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
  """Largest GPU load ``[L]`` of placements ``phy2log [L, P]``."""
  counts = _packing.replica_counts(phy2log, weight.shape[1])
  return gpu_loads(weight, phy2log, counts, num_gpus).max(axis=1)


def rebalance(weight: np.ndarray, num_replicas: int, num_groups: int, num_nodes: int,
              num_gpus: int) -> np.ndarray:
  """Placement ``phy2log [L, P]`` (hierarchical when ``num_nodes > 1``; the
  global policy is ``num_groups = num_nodes = 1``). Slot ``p`` lives on GPU
  ``p // (P / num_gpus)``; node ``n`` owns GPUs ``[n * M/N, (n+1) * M/N)``.

  Where swapping groups between nodes changed DeepSeek's greedy group
  assignment, both assignments are placed and each layer keeps the better one.
  """
  layers, experts = weight.shape
  group_load = weight.reshape(layers, num_groups, -1).sum(-1)
  greedy, improved = assign_groups(group_load, num_nodes)
  phy2log = _place(weight, improved, num_replicas, num_nodes, num_gpus)
  differ = np.nonzero((greedy != improved).any(axis=1))[0]
  if differ.size:
    alt = _place(weight[differ], greedy[differ], num_replicas, num_nodes, num_gpus)
    better = layer_peak(weight[differ], alt, num_gpus) < layer_peak(
        weight[differ], phy2log[differ], num_gpus)
    phy2log[differ[better]] = alt[better]
  return phy2log

