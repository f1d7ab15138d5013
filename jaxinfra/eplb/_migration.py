"""Migration-aware rebalancing: reach (nearly) the fresh placement's balance while
moving as few replicas as possible from the previous placement.

Two candidates per layer, and the one that moves fewer replicas wins:

* **Repair.** Start from the previous placement under the new loads and, while
  the most loaded GPU of a domain is above the target ``(1 + slack) * peak``
  (``peak``: the largest GPU load of the placement computed from scratch),
  apply the best single move: re-point one slot to another expert (one replica
  moved: an extra replica of an expert on the hottest GPU, taken from an expert
  that has one to spare), or, when no such move helps, swap two replicas between
  GPUs (two moved). Fails for a layer if no move helps before the target is met
  (or, under the hierarchical policy, if the previous placement does not keep
  groups on single nodes).
* **Aligned fresh placement.** The fresh placement with its nodes and GPUs
  relabelled (greedy matching on common replicas) and each GPU's slots ordered
  so that replicas that stay keep their slot. Always within the target.

A replica counts as moved when its GPU did not hold that expert in the previous
placement (so slot reordering within a GPU is free); both candidates keep every
staying replica in its old slot, so the moved count is also the number of slots
whose expert changes.
"""

from __future__ import annotations

import numpy as np

from jaxinfra.eplb import _improved, _packing

_REL = _improved._REL  # pylint: disable=protected-access


def moved_replicas(old: np.ndarray, new: np.ndarray, num_gpus: int) -> np.ndarray:
  """Replicas per layer ``[L]`` that must be copied from another GPU to turn
  placement ``old [L, P]`` into ``new [L, P]`` (per GPU: the size of the multiset
  difference of the new experts minus the old ones)."""
  layers, slots = old.shape
  rows = layers * num_gpus
  per_gpu = slots // num_gpus
  o = np.sort(old.reshape(rows, per_gpu), axis=1)
  n = np.sort(new.reshape(rows, per_gpu), axis=1)
  return (per_gpu - _multiset_common(o, n)).reshape(layers, num_gpus).sum(axis=1)


def _occurrence(units: np.ndarray) -> np.ndarray:
  """For ``units [..., m]``: how many earlier entries of the same unit are equal."""
  same = units[..., :, None] == units[..., None, :]
  return (same & np.tril(np.ones(same.shape[-2:], bool), -1)).sum(-1)


def _multiset_common(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Size of the multiset intersection of the rows of ``a [R, m]`` and ``b [R, m]``."""
  rank_a = _occurrence(a)
  in_b = (a[:, :, None] == b[:, None, :]).sum(-1)
  return (in_b > rank_a).sum(axis=1)


def _overlap(old_units: np.ndarray, new_units: np.ndarray, num_items: int) -> np.ndarray:
  """``common [X, A_new, A_old]``: multiset intersections of every new unit with
  every old unit (``*_units [X, A, m]`` item ids)."""
  rows, units, m = new_units.shape
  held = np.zeros((rows, units, num_items), np.int64)
  np.add.at(held, (np.arange(rows)[:, None, None], np.arange(units)[None, :, None], new_units),
            1)
  rank = _occurrence(old_units).reshape(rows, 1, -1)                # [X, 1, A*m]
  got = np.take_along_axis(held, old_units.reshape(rows, 1, -1).repeat(units, 1), axis=2)
  return (got > rank).reshape(rows, units, units, m).sum(-1)


def _greedy_match(common: np.ndarray) -> np.ndarray:
  """``target [X, A]``: the old unit each new unit replaces, matching the pairs
  with the most in common first (or keeping the labels where that keeps more)."""
  rows, units, _ = common.shape
  score = common.astype(np.float64).copy()
  target = np.empty((rows, units), np.int64)
  r = np.arange(rows)
  for _ in range(units):
    flat = np.argmax(score.reshape(rows, -1), axis=1)
    b, a = flat // units, flat % units
    target[r, b] = a
    score[r, b, :] = -np.inf
    score[r, :, a] = -np.inf
  kept = np.take_along_axis(common, target[:, :, None], axis=2).sum(axis=(1, 2))
  same = np.trace(common, axis1=1, axis2=2) >= kept
  target[same] = np.arange(units)
  return target


def _relabel(new: np.ndarray, target: np.ndarray) -> np.ndarray:
  """Moves unit ``b`` of ``new [X, A, m]`` to position ``target[x, b]``."""
  out = np.empty_like(new)
  np.put_along_axis(out, target[:, :, None], new, axis=1)
  return out


def _order_slots(old: np.ndarray, new: np.ndarray) -> np.ndarray:
  """Reorders each row of ``new [R, k]`` so that entries also in ``old [R, k]``
  sit where they were in ``old``."""
  rows, k = new.shape
  r = np.arange(rows)
  out = np.full((rows, k), -1, np.int64)
  used = np.zeros((rows, k), bool)
  for j in range(k):
    avail = (new == old[:, j:j + 1]) & ~used
    has = avail.any(axis=1)
    pick = np.argmax(avail, axis=1)
    out[r[has], j] = old[r[has], j]
    used[r[has], pick[has]] = True
  # Remaining entries fill the remaining positions in order.
  rest = np.where(used, np.iinfo(np.int64).max, new)
  rest = np.sort(rest, axis=1)
  free = out < 0
  take = np.cumsum(free, axis=1) - 1
  out[free] = np.take_along_axis(rest, np.maximum(take, 0), axis=1)[free]
  return out


def align(old: np.ndarray, new: np.ndarray, num_nodes: int, num_gpus: int) -> np.ndarray:
  """``new [L, P]`` with nodes and GPUs relabelled and slots reordered to keep
  as many of ``old``'s replicas in place as a greedy matching finds."""
  layers, slots = new.shape
  num_items = int(max(old.max(), new.max())) + 1
  if num_nodes > 1:
    o, n = old.reshape(layers, num_nodes, -1), new.reshape(layers, num_nodes, -1)
    new = _relabel(n, _greedy_match(_overlap(o, n, num_items))).reshape(layers, slots)
  per_node = num_gpus // num_nodes
  o = old.reshape(layers * num_nodes, per_node, -1)
  n = new.reshape(layers * num_nodes, per_node, -1)
  n = _relabel(n, _greedy_match(_overlap(o, n, num_items)))
  k = slots // num_gpus
  return _order_slots(o.reshape(-1, k), n.reshape(-1, k)).reshape(layers, slots)


# --- repair -------------------------------------------------------------------------------------


def _retarget_scores(weight, slots, counts, held, loads, g, num_gpus):
  """Scores ``[R, S * k]`` of re-pointing slot ``s`` (index ``s * k + j``) to the
  expert in slot ``j`` of the hottest GPU ``g`` (which gains a replica; the
  slot's old expert loses one): an upper bound on the new maximum over the GPUs
  not tied with ``g`` (the relief on other GPUs holding the new expert is not
  counted), or inf where the move is not allowed or not an improvement."""
  rows, num_slots = slots.shape
  per_gpu = num_slots // num_gpus
  gpu_of = np.arange(num_slots) // per_gpu
  a = np.arange(rows)
  top = loads[a, g]
  limit = top * (1 - _REL)
  tied = loads >= limit[:, None]
  tied[a, g] = False
  x = slots                                                          # [R, S]
  cx, wx = np.take_along_axis(counts, x, 1), np.take_along_axis(weight, x, 1)
  spare = cx >= 2
  after_x = wx / np.maximum(cx - 1, 1)
  ax = np.where(spare, after_x - wx / cx, 0.0)
  y = np.take_along_axis(slots, g[:, None] * per_gpu + np.arange(per_gpu), 1)   # [R, k]
  cy, wy = np.take_along_axis(counts, y, 1), np.take_along_axis(weight, y, 1)
  add_y = wy / (cy + 1)
  by = add_y - wy / cy
  hx = np.take_along_axis(held, x[:, None, :].repeat(num_gpus, 1), 2)         # [R, G, S]
  on_h = np.arange(num_gpus)[:, None] == gpu_of[None, :]                       # [G, S]
  raised = loads[:, :, None] + hx * ax[:, None, :]                             # [R, G, S]
  other = ~on_h[None] & (np.arange(num_gpus)[None, :, None] != g[:, None, None])
  rest = np.where(other & ~tied[:, :, None], raised, -np.inf).max(axis=1)      # [R, S]
  tied_ok = ~(other & tied[:, :, None] & (hx > 0) & (ax[:, None, :] > 0)).any(axis=1)
  cap_x = _improved.replica_cap(cx - 1, num_gpus)
  x_ok = spare & tied_ok & ((hx - on_h[None]).max(axis=1) <= cap_x)
  h = gpu_of
  hy = held[a[:, None, None], h[None, :, None], y[:, None, :]]                 # [R, S, k]
  hgy = held[a[:, None], g[:, None], y]                                        # [R, k]
  hx_g = hx[a, g]                                                              # [R, S]
  hx_h = np.take_along_axis(hx, h[None, None, :].repeat(rows, 0), 1)[:, 0]     # [R, S]
  same = (h[None, :] == g[:, None])[:, :, None]                                # [R, S, 1]
  swing = -after_x[:, :, None] + add_y[:, None, :]
  new_g = (loads[a, g][:, None, None] + (hx_g * ax)[:, :, None] + (hgy * by)[:, None, :]
           + np.where(same, swing, 0.0))
  new_h = loads[:, h][:, :, None] + (hx_h * ax)[:, :, None] + hy * by[:, None, :] + swing
  h_tied = np.take_along_axis(tied, h[None, :].repeat(rows, 0), 1)[:, :, None]
  h_ok = same | np.where(h_tied, new_h <= loads[:, h][:, :, None], new_h < limit[:, None, None])
  ok = x_ok[:, :, None] & (x[:, :, None] != y[:, None, :]) & h_ok
  ok &= hy + 1 <= _improved.replica_cap(cy + 1, num_gpus)[:, None, :]
  ok &= (new_g < limit[:, None, None]) & (rest < limit[:, None])[:, :, None]
  score = np.maximum(np.maximum(new_g, rest[:, :, None]),
                     np.where(same | h_tied, -np.inf, new_h))
  return np.where(ok, score, np.inf).reshape(rows, -1)


def repair(weight: np.ndarray, slots: np.ndarray, num_gpus: int,
           target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Cheapest-first local search from ``slots [X, S]`` (item per slot, GPU-major)
  until each row's largest GPU load is at most ``target [X]``.

  Returns:
    ``(slots, reached [X])``.
  """
  rows, num_slots = slots.shape
  n = weight.shape[1]
  per_gpu = num_slots // num_gpus
  slots = slots.copy()
  counts = _packing.replica_counts(slots, n)
  held = _improved.held_matrix(slots, n, num_gpus)
  reached = np.zeros(rows, bool)
  active = np.arange(rows)
  for _ in range(4 * num_slots):
    loads = _improved.gpu_loads(weight[active], slots[active], counts[active], num_gpus)
    done = loads.max(axis=1) <= target[active]
    reached[active[done]] = True
    active, loads = active[~done], loads[~done]
    if active.size == 0:
      break
    a = np.arange(active.size)
    g = np.argmax(loads, axis=1)
    w, s, c, hd = weight[active], slots[active], counts[active], held[active]
    rt = _retarget_scores(w, s, c, hd, loads, g, num_gpus)
    best_rt = np.argmin(rt, axis=1)
    use_rt = np.isfinite(rt[a, best_rt])
    sw = _improved.swap_scores(w / c, s, hd, _improved.replica_cap(c, num_gpus), loads, g)
    best_sw = np.argmin(sw, axis=1)
    use_sw = ~use_rt & np.isfinite(sw[a, best_sw])
    # Re-point one slot.
    r = active[use_rt]
    pos, j = best_rt[use_rt] // per_gpu, best_rt[use_rt] % per_gpu
    old_x = slots[r, pos]
    new_y = slots[r, g[use_rt] * per_gpu + j]
    slots[r, pos] = new_y
    h = pos // per_gpu
    np.add.at(held, (r, h, old_x), -1)
    np.add.at(held, (r, h, new_y), 1)
    np.add.at(counts, (r, old_x), -1)
    np.add.at(counts, (r, new_y), 1)
    # Or swap two.
    _improved.apply_swaps(slots, held, active[use_sw], g[use_sw], best_sw[use_sw])
    active = active[use_rt | use_sw]
  return slots, reached
