"""``rebalance_experts``: where each expert's replicas live.

Given per-expert loads (tokens per expert, per layer), choose how many replicas
each logical expert gets and on which GPU every replica (physical slot) sits, so
that the GPUs of an expert-parallel group get even loads. Physical slot ``p`` of
``P`` lives on GPU ``p // (P / num_gpus)``, and GPU ``m`` on node
``m // (num_gpus / num_nodes)`` (slots are sharded contiguously, see
:class:`jaxinfra.eplb.ExpertPlacement`).

Policies:

* ``"deepseek"``: DeepSeek's EPLB algorithm, exactly (same placements as
  ``deepseek-ai/EPLB``, e.g. its README example): hierarchical when
  ``num_groups % num_nodes == 0``, global otherwise. Kept for comparison and
  for matching placements other systems compute.
* ``"hierarchical"``: the improved algorithm (``jaxinfra.eplb._improved``) with
  every expert group on one node (its replicas too), for group-limited routing
  (DeepSeek uses it for prefill).
* ``"global"``: the improved algorithm over all GPUs, ignoring groups (decode).
* ``"auto"`` (default): ``"hierarchical"`` when ``num_groups % num_nodes == 0``,
  else ``"global"``; DeepSeek's rule with the improved algorithm.

The improved policies never put two replicas of an expert on one GPU unless the
expert has more replicas than its domain has GPUs (its node under the
hierarchical policy, all GPUs under the global one), and choose replica counts
together with the packing; see ``_improved``'s docstring.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from jaxinfra.eplb import _deepseek, _improved, _migration, _packing

POLICIES = ("auto", "deepseek", "hierarchical", "global")


class Rebalanced(NamedTuple):
  """A placement as arrays (all int32).

  Attributes:
    phy2log: ``[L, P]`` logical expert in each physical slot.
    log2phy: ``[L, E, R]`` physical slots of each expert (``R`` = the largest
      replica count), padded with -1; ``log2phy[l, phy2log[l, p], k] == p`` for
      the slot's replica index ``k``.
    logcnt: ``[L, E]`` replicas of each expert (at least 1).
  """
  phy2log: np.ndarray
  log2phy: np.ndarray
  logcnt: np.ndarray


@dataclasses.dataclass(frozen=True)
class Migration:
  """What a migration-aware rebalance moves (per layer, ``[L]`` int64 arrays).

  Attributes:
    replicas_moved: replicas whose GPU did not hold that expert before (each is
      one expert's weights copied from another GPU).
    bytes_moved: ``replicas_moved * expert_bytes``.
    from_scratch_moved: replicas the placement computed from scratch would move
      (slots whose expert changes; what a plain rebalance moves).
    peak: the largest GPU load of the chosen placement ``[L]`` (float64).
    from_scratch_peak: the same for the placement computed from scratch.
    kept_previous: layers whose previous placement was already within the target.
  """
  replicas_moved: np.ndarray
  bytes_moved: np.ndarray
  from_scratch_moved: np.ndarray
  peak: np.ndarray
  from_scratch_peak: np.ndarray
  kept_previous: np.ndarray

  @property
  def total_replicas_moved(self) -> int:
    return int(self.replicas_moved.sum())

  @property
  def total_bytes_moved(self) -> int:
    return int(self.bytes_moved.sum())


# --- validation ---------------------------------------------------------------------------------


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"rebalance_experts: {name} must be an int, got {value!r}")
  if value < minimum:
    raise ValueError(f"rebalance_experts: {name} must be >= {minimum}, got {value}")
  return int(value)


def _check_divides(a_name: str, a: int, b_name: str, b: int) -> None:
  if a % b:
    raise ValueError(f"rebalance_experts: {a_name} ({a}) must be divisible by {b_name} ({b})")


def check_weight(weight: Any, name: str = "weight") -> np.ndarray:
  """``weight`` as a float64 ``[L, E]`` array of finite, non-negative loads."""
  w = np.asarray(weight)
  if w.ndim != 2 or w.shape[0] < 1 or w.shape[1] < 1:
    raise ValueError(f"rebalance_experts: {name} must have shape [layers, experts], "
                     f"got shape {w.shape}")
  if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
    raise ValueError(f"rebalance_experts: {name} must be real numbers, got dtype {w.dtype} "
                     f"(shape {w.shape})")
  w = w.astype(np.float64)
  if not np.isfinite(w).all():
    bad = np.argwhere(~np.isfinite(w))[0]
    raise ValueError(f"rebalance_experts: {name} (shape {w.shape}) has a NaN or infinite "
                     f"load at [layer {bad[0]}, expert {bad[1]}]")
  if (w < 0).any():
    bad = np.argwhere(w < 0)[0]
    raise ValueError(f"rebalance_experts: {name} (shape {w.shape}) has a negative load "
                     f"{w[tuple(bad)]} at [layer {bad[0]}, expert {bad[1]}]")
  return w


def _check_config(weight, num_replicas, num_groups, num_nodes, num_gpus, policy):
  w = check_weight(weight)
  experts = w.shape[1]
  num_replicas = _check_int("num_replicas", num_replicas)
  num_groups = _check_int("num_groups", num_groups)
  num_nodes = _check_int("num_nodes", num_nodes)
  num_gpus = _check_int("num_gpus", num_gpus)
  if policy not in POLICIES:
    raise ValueError(f"rebalance_experts: policy must be one of {POLICIES}, got {policy!r}")
  _check_divides("the number of experts (weight.shape[1])", experts, "num_groups", num_groups)
  _check_divides("num_gpus", num_gpus, "num_nodes", num_nodes)
  _check_divides("num_replicas", num_replicas, "num_gpus", num_gpus)
  if num_replicas < experts:
    raise ValueError(f"rebalance_experts: num_replicas ({num_replicas}) must be at least the "
                     f"number of experts (weight.shape[1] = {experts})")
  if policy == "hierarchical":
    _check_divides("num_groups", num_groups, "num_nodes", num_nodes)
  return w, num_replicas, num_groups, num_nodes, num_gpus


def hierarchical(num_groups: int, num_nodes: int, policy: str) -> bool:
  """Whether ``policy`` places hierarchically (groups kept on nodes)."""
  if policy == "global":
    return False
  return num_groups % num_nodes == 0


# --- the entry point ----------------------------------------------------------------------------


def _arrays(phy2log: np.ndarray, num_experts: int, phyrank: np.ndarray | None = None) -> Rebalanced:
  if phyrank is None:
    phyrank = _packing.replica_ranks(phy2log, num_experts)
  log2phy, logcnt = _packing.logical_to_physical(phy2log, phyrank, num_experts)
  return Rebalanced(phy2log.astype(np.int32), log2phy.astype(np.int32), logcnt.astype(np.int32))


def _fresh(w, num_replicas, num_groups, num_nodes, num_gpus, policy) -> np.ndarray:
  if hierarchical(num_groups, num_nodes, policy):
    return _improved.rebalance(w, num_replicas, num_groups, num_nodes, num_gpus)
  return _improved.rebalance(w, num_replicas, 1, 1, num_gpus)


def rebalance_experts(weight: Any, num_replicas: int, num_groups: int, num_nodes: int,
                      num_gpus: int, *, policy: str = "auto", previous: Any = None,
                      balance_slack: float = 0.02,
                      expert_bytes: int = 0) -> Rebalanced | tuple[np.ndarray, np.ndarray,
                                                                   np.ndarray, Migration]:
  """Expert placement for every layer.

  Args:
    weight: ``[L, E]`` non-negative loads (e.g. tokens routed to each expert,
      or their moving average, see :class:`LoadTracker`); any real dtype.
    num_replicas: physical expert slots ``P`` per layer (a multiple of
      ``num_gpus``, at least ``E``).
    num_groups: expert groups (``E`` divisible by it); with the hierarchical
      policy every group stays on one node.
    num_nodes: nodes (``num_gpus`` divisible by it).
    num_gpus: GPUs in the expert-parallel group ``M``.
    policy: ``"auto"``, ``"deepseek"``, ``"hierarchical"`` or ``"global"`` (see
      the module docstring).
    previous: the placement in use (an :class:`ExpertPlacement`, a
      :class:`Rebalanced`, or its ``phy2log [L, P]``) for migration-aware
      rebalancing (not with ``policy="deepseek"``).
    balance_slack: with ``previous``: how much balance to trade for fewer moved
      replicas. Every layer's largest GPU load stays within ``(1 + slack)``
      times that of the placement computed from scratch; within that bound the
      placement that moves the fewest replicas is returned. ``0`` moves replicas
      only to relabel the fresh placement onto the old one; larger values keep
      more of the previous placement.
    expert_bytes: with ``previous``: bytes of one expert's weights, for
      :attr:`Migration.bytes_moved`.

  Returns:
    ``(phy2log [L, P], log2phy [L, E, R], logcnt [L, E])`` int32 (a
    :class:`Rebalanced`); with ``previous``, a 4-tuple that adds a
    :class:`Migration` report.

  Raises:
    ValueError: on a non-divisible configuration (experts by groups, GPUs by
      nodes, replicas by GPUs, and groups by nodes for ``"hierarchical"``),
      fewer replicas than experts, or negative, NaN or infinite loads; each
      names the parameter.
  """
  w, num_replicas, num_groups, num_nodes, num_gpus = _check_config(
      weight, num_replicas, num_groups, num_nodes, num_gpus, policy)
  experts = w.shape[1]
  if policy == "deepseek":
    if previous is not None:
      raise ValueError("rebalance_experts: previous (migration-aware mode) needs an improved "
                       "policy ('auto', 'hierarchical' or 'global'), not 'deepseek'")
    if num_groups % num_nodes:
      num_groups, num_nodes = 1, 1
    phy2log, phyrank = _deepseek.rebalance(w, num_replicas, num_groups, num_nodes, num_gpus)
    return _arrays(phy2log, experts, phyrank)
  fresh = _fresh(w, num_replicas, num_groups, num_nodes, num_gpus, policy)
  if previous is None:
    return _arrays(fresh, experts)
  if not (isinstance(balance_slack, (int, float, np.floating)) and balance_slack >= 0):
    raise ValueError(f"rebalance_experts: balance_slack must be a number >= 0, "
                     f"got {balance_slack!r}")
  _check_int("expert_bytes", expert_bytes, minimum=0)
  old = _previous_phy2log(previous, w.shape, num_replicas)
  nodes = num_nodes if hierarchical(num_groups, num_nodes, policy) else 1
  groups = num_groups if nodes > 1 else 1
  phy2log, report = _migrate(w, old, fresh, groups, nodes, num_gpus, float(balance_slack),
                             int(expert_bytes))
  return (*_arrays(phy2log, experts), report)


def _previous_phy2log(previous: Any, shape: tuple[int, int], num_replicas: int) -> np.ndarray:
  phy2log = getattr(previous, "phy2log", previous)
  phy2log = np.asarray(phy2log)
  layers, experts = shape
  if phy2log.shape != (layers, num_replicas) or not np.issubdtype(phy2log.dtype, np.integer):
    raise ValueError(f"rebalance_experts: previous must be a placement with phy2log of shape "
                     f"[layers, num_replicas] = {(layers, num_replicas)} (integers), got shape "
                     f"{phy2log.shape} dtype {phy2log.dtype}")
  if phy2log.min() < 0 or phy2log.max() >= experts:
    raise ValueError(f"rebalance_experts: previous.phy2log (shape {phy2log.shape}) has expert "
                     f"ids outside [0, {experts})")
  if (_packing.replica_counts(phy2log, experts) == 0).any():
    raise ValueError(f"rebalance_experts: previous.phy2log (shape {phy2log.shape}) leaves an "
                     f"expert without a replica")
  return phy2log.astype(np.int64)


# --- migration-aware mode -----------------------------------------------------------------------


def _node_domains(old, num_experts, num_groups, num_nodes):
  """Per (layer, node): its experts ``[L*N, E/N]`` (group order) and the old slots
  as indices into them, or None if ``old`` does not keep each group on one node
  with equal group counts."""
  layers, slots = old.shape
  group_size = num_experts // num_groups
  per_node = slots // num_nodes
  slot_node = np.arange(slots) // per_node
  group_nodes = np.zeros((layers, num_groups, num_nodes), bool)
  group_nodes[np.arange(layers)[:, None], old // group_size, slot_node] = True
  if (group_nodes.sum(-1) != 1).any():
    return None
  node_of_group = np.argmax(group_nodes, axis=-1)                      # [L, G]
  if (_packing.replica_counts(node_of_group, num_nodes) != num_groups // num_nodes).any():
    return None
  members = _improved.node_members(node_of_group, group_size, num_nodes)
  local = np.empty((layers * num_nodes, num_experts), np.int64)            # logical -> index
  np.put_along_axis(local, members, np.arange(members.shape[1])[None].repeat(len(local), 0), 1)
  node_old = old.reshape(layers * num_nodes, per_node)
  return members, np.take_along_axis(local, node_old, axis=1)


def _migrate(w, old, fresh, num_groups, num_nodes, num_gpus, slack, expert_bytes):
  layers, slots = old.shape
  fresh_peak = _improved.layer_peak(w, fresh, num_gpus)
  target = fresh_peak * (1 + slack)
  aligned = _migration.align(old, fresh, num_nodes, num_gpus)
  domains = _node_domains(old, w.shape[1], num_groups, num_nodes)
  result = aligned
  if domains is not None:
    members, node_old = domains
    node_w = np.take_along_axis(np.repeat(w, num_nodes, axis=0), members, axis=1)
    node_new, reached = _migration.repair(node_w, node_old, num_gpus // num_nodes,
                                          np.repeat(target, num_nodes))
    repaired = np.take_along_axis(members, node_new, axis=1).reshape(layers, slots)
    ok = reached.reshape(layers, num_nodes).all(axis=1)
    cheaper = ok & (_migration.moved_replicas(old, repaired, num_gpus)
                    <= _migration.moved_replicas(old, aligned, num_gpus))
    result = np.where(cheaper[:, None], repaired, aligned)
  moved = _migration.moved_replicas(old, result, num_gpus)
  report = Migration(
      replicas_moved=moved,
      bytes_moved=moved * expert_bytes,
      from_scratch_moved=(old != fresh).sum(axis=1),
      peak=_improved.layer_peak(w, result, num_gpus),
      from_scratch_peak=fresh_peak,
      kept_previous=(result == old).all(axis=1))
  return result, report
