"""``ExpertPlacement``: a placement as a pytree of arrays that jitted programs use.

Physical expert slots ``[P]`` (per layer) are sharded contiguously over the
expert-parallel (EP) mesh axis of size ``num_gpus``: device ``d`` holds slots
``[d * P/M, (d+1) * P/M)``. A MoE layer that takes a placement

1. keeps its expert weights physical, ``w_phys = placement.physical_weights(w)``
   (``[P, ...]``, sharded with ``placement.sharding(mesh, "ep")``), or gathers
   them from logical weights inside ``jit``;
2. maps each token's logical top-k experts to physical slots with
   ``placement.route(topk_idx, token_ids)`` (replicas of an expert share its
   tokens round-robin by token id); the destination device of a slot is
   ``placement.device_of(slot)`` and its index on that device
   ``slot % placement.slots_per_gpu``;
3. computes per-logical-expert token counts (``jaxinfra.eplb.expert_counts``)
   for a :class:`LoadTracker`, from which the next placement is computed;
4. moves to a new placement with :func:`relayout` (inside ``jit``, an
   ``all_to_all`` over the EP axis) instead of re-reading logical weights.

The arrays may be stacked over layers (``phy2log [L, P]`` etc.); ``placement[l]``
selects one layer (also with a traced ``l``, e.g. inside ``lax.scan``).
Placements built on the host from concrete arrays are checked for consistency;
placements passed through ``jit`` are trusted.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra.eplb import _packing
from jaxinfra.eplb import policy as policy_lib


def _host_values(*arrays) -> list[np.ndarray] | None:
  """The arrays as NumPy, or None when any is traced (inside ``jit``)."""
  try:
    return [np.asarray(a) for a in arrays]
  except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
    return None


@jax.tree_util.register_pytree_node_class
class ExpertPlacement:
  """Where every physical expert slot lives and which expert it holds.

  Attributes:
    phy2log: ``[P]`` or ``[L, P]`` int32, the logical expert of each slot.
    log2phy: ``[E, R]`` or ``[L, E, R]`` int32, the slots of each expert, -1
      padded (``R`` >= the largest replica count).
    logcnt: ``[E]`` or ``[L, E]`` int32, replicas per expert (>= 1).
    num_gpus: size of the EP mesh axis the slots are sharded over (static).
  """

  def __init__(self, phy2log: Any, log2phy: Any, logcnt: Any, *, num_gpus: int):
    if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, np.integer)) or num_gpus < 1:
      raise ValueError(f"ExpertPlacement: num_gpus must be a positive int, got {num_gpus!r}")
    phy2log, log2phy, logcnt = (jnp.asarray(a) if not isinstance(a, (np.ndarray, jax.Array))
                                else a for a in (phy2log, log2phy, logcnt))
    lead = phy2log.shape[:-1]
    if phy2log.ndim not in (1, 2):
      raise ValueError(f"ExpertPlacement: phy2log must be [P] or [L, P], got shape "
                       f"{phy2log.shape}")
    if log2phy.ndim != phy2log.ndim + 1 or log2phy.shape[:-2] != lead:
      raise ValueError(f"ExpertPlacement: log2phy must be [..., E, R] with the leading shape "
                       f"{lead} of phy2log, got shape {log2phy.shape}")
    if logcnt.shape != log2phy.shape[:-1]:
      raise ValueError(f"ExpertPlacement: logcnt must have shape {log2phy.shape[:-1]} "
                       f"(log2phy's [..., E]), got shape {logcnt.shape}")
    for name, a in (("phy2log", phy2log), ("log2phy", log2phy), ("logcnt", logcnt)):
      if not jnp.issubdtype(a.dtype, jnp.integer):
        raise ValueError(f"ExpertPlacement: {name} must be integers, got dtype {a.dtype} "
                         f"(shape {a.shape})")
    if phy2log.shape[-1] % num_gpus:
      raise ValueError(f"ExpertPlacement: the number of slots (phy2log.shape[-1] = "
                       f"{phy2log.shape[-1]}) must be divisible by num_gpus ({num_gpus})")
    if phy2log.shape[-1] < log2phy.shape[-2]:
      raise ValueError(f"ExpertPlacement: fewer slots ({phy2log.shape[-1]}) than experts "
                       f"({log2phy.shape[-2]})")
    self.phy2log = jnp.asarray(phy2log, jnp.int32)
    self.log2phy = jnp.asarray(log2phy, jnp.int32)
    self.logcnt = jnp.asarray(logcnt, jnp.int32)
    self.num_gpus = int(num_gpus)
    values = _host_values(phy2log, log2phy, logcnt)
    if values is not None:
      self._check_consistent(*values)

  def _check_consistent(self, p2l, l2p, cnt) -> None:
    p2l, l2p, cnt = (a.reshape((-1,) + a.shape[a.ndim - k:]) for a, k in
                     ((p2l, 1), (l2p, 2), (cnt, 1)))
    experts, slots = self.num_experts, self.num_slots
    if p2l.min() < 0 or p2l.max() >= experts:
      raise ValueError(f"ExpertPlacement: phy2log (shape {self.phy2log.shape}) has expert ids "
                       f"outside [0, {experts})")
    want = _packing.replica_counts(p2l, experts)
    if (cnt != want).any() or (cnt < 1).any():
      raise ValueError("ExpertPlacement: logcnt does not count phy2log's replicas of every "
                       "expert (every expert needs at least one)")
    width = l2p.shape[-1]
    if width < cnt.max():
      raise ValueError(f"ExpertPlacement: log2phy has {width} columns, fewer than the largest "
                       f"replica count {cnt.max()}")
    valid = np.arange(width) < cnt[..., None]
    if (np.where(valid, l2p, -1) != l2p).any() or (l2p[valid] >= slots).any():
      raise ValueError("ExpertPlacement: log2phy must list slots in [0, P) for the first "
                       "logcnt columns and -1 after them")
    layer = np.broadcast_to(np.arange(len(p2l))[:, None, None], l2p.shape)
    expert = np.broadcast_to(np.arange(experts)[None, :, None], l2p.shape)
    if (p2l[layer[valid], l2p[valid]] != expert[valid]).any():
      raise ValueError("ExpertPlacement: log2phy and phy2log disagree")
    seen = np.sort(np.where(valid, l2p, -1).reshape(len(p2l), -1), axis=1)[:, -slots:]
    if (seen != np.arange(slots)).any():
      raise ValueError("ExpertPlacement: log2phy must list every slot exactly once")

  # --- pytree -----------------------------------------------------------------------------------

  def tree_flatten(self):
    return (self.phy2log, self.log2phy, self.logcnt), (self.num_gpus,)

  @classmethod
  def tree_unflatten(cls, aux, children):
    obj = object.__new__(cls)
    obj.phy2log, obj.log2phy, obj.logcnt = children
    (obj.num_gpus,) = aux
    return obj

  def __getitem__(self, layer) -> "ExpertPlacement":
    if self.num_layers is None:
      raise ValueError("ExpertPlacement: this placement has no layer axis to index")
    return jax.tree_util.tree_map(lambda a: a[layer], self)

  def __repr__(self) -> str:
    layers = "" if self.num_layers is None else f"layers={self.num_layers}, "
    return (f"ExpertPlacement({layers}experts={self.num_experts}, slots={self.num_slots}, "
            f"num_gpus={self.num_gpus}, max_replicas={self.max_replicas})")

  # --- construction -----------------------------------------------------------------------------

  @classmethod
  def from_arrays(cls, phy2log: Any, log2phy: Any, logcnt: Any, *, num_gpus: int,
                  max_replicas: int | None = None) -> "ExpertPlacement":
    """From :func:`rebalance_experts`'s arrays; ``max_replicas`` pads ``log2phy``
    to a fixed width so that placements with different replica counts have the
    same shapes (and ``jit`` does not recompile)."""
    log2phy = np.asarray(log2phy)
    if max_replicas is not None:
      if max_replicas < log2phy.shape[-1]:
        raise ValueError(f"ExpertPlacement: max_replicas ({max_replicas}) is below the "
                         f"largest replica count ({log2phy.shape[-1]})")
      pad = [(0, 0)] * (log2phy.ndim - 1) + [(0, max_replicas - log2phy.shape[-1])]
      log2phy = np.pad(log2phy, pad, constant_values=-1)
    return cls(np.asarray(phy2log), log2phy, np.asarray(logcnt), num_gpus=num_gpus)

  @classmethod
  def create(cls, weight: Any, num_replicas: int, num_groups: int, num_nodes: int,
             num_gpus: int, *, policy: str = "auto",
             max_replicas: int | None = None) -> "ExpertPlacement":
    """:func:`rebalance_experts` on loads ``weight [L, E]`` (or ``[E]`` for one
    unstacked layer), as a placement."""
    w = np.asarray(weight)
    single = w.ndim == 1
    result = policy_lib.rebalance_experts(w[None] if single else w, num_replicas, num_groups,
                                          num_nodes, num_gpus, policy=policy)
    arrays = [a[0] for a in result] if single else list(result)
    return cls.from_arrays(*arrays, num_gpus=num_gpus, max_replicas=max_replicas)

  @classmethod
  def unreplicated(cls, num_experts: int, num_gpus: int, *,
                   num_layers: int | None = None) -> "ExpertPlacement":
    """Expert ``e`` alone in slot ``e`` (plain expert parallelism, ``P == E``)."""
    phy2log = np.arange(num_experts)
    log2phy, logcnt = phy2log[:, None], np.ones(num_experts, np.int32)
    if num_layers is not None:
      phy2log, log2phy, logcnt = (np.broadcast_to(a, (num_layers,) + a.shape)
                                  for a in (phy2log, log2phy, logcnt))
    return cls(phy2log, log2phy, logcnt, num_gpus=num_gpus)

  # --- shapes -----------------------------------------------------------------------------------

  @property
  def num_layers(self) -> int | None:
    return self.phy2log.shape[0] if self.phy2log.ndim == 2 else None

  @property
  def num_experts(self) -> int:
    return self.logcnt.shape[-1]

  @property
  def num_slots(self) -> int:
    return self.phy2log.shape[-1]

  @property
  def slots_per_gpu(self) -> int:
    return self.num_slots // self.num_gpus

  @property
  def max_replicas(self) -> int:
    return self.log2phy.shape[-1]

  # --- use --------------------------------------------------------------------------------------

  def physical_weights(self, w_logical: Any) -> Any:
    """Physical expert weights from logical ones (a jittable gather).

    Args:
      w_logical: ``[E, ...]`` (or ``[L, E, ...]`` for a stacked placement), or a
        pytree of such arrays.

    Returns:
      ``[P, ...]`` (or ``[L, P, ...]``): slot ``p`` holds ``w_logical[phy2log[p]]``.
    """
    def gather(w):
      w = jnp.asarray(w)
      lead = self.phy2log.ndim - 1
      if w.ndim <= lead or w.shape[:lead] != self.phy2log.shape[:lead] or \
          w.shape[lead] != self.num_experts:
        raise ValueError(f"ExpertPlacement.physical_weights: w_logical must have shape "
                         f"{self.phy2log.shape[:lead] + (self.num_experts,)} + (...), got "
                         f"shape {w.shape}")
      if lead == 0:
        return jnp.take(w, self.phy2log, axis=0)
      idx = self.phy2log.reshape(self.phy2log.shape + (1,) * (w.ndim - 2))
      return jnp.take_along_axis(w, idx, axis=1)
    return jax.tree_util.tree_map(gather, w_logical)

  def partition_spec(self, axis: str | tuple[str, ...] = "ep") -> P:
    """PartitionSpec of physical weights ``[P, ...]`` (``[L, P, ...]`` when
    stacked): slots sharded over ``axis``, everything else replicated."""
    return P(axis) if self.num_layers is None else P(None, axis)

  def sharding(self, mesh: jax.sharding.Mesh,
               axis: str | tuple[str, ...] = "ep") -> NamedSharding:
    """:meth:`partition_spec` on ``mesh``; the axis size must be ``num_gpus``."""
    _check_axis(mesh, axis, self.num_gpus, "ExpertPlacement.sharding")
    return NamedSharding(mesh, self.partition_spec(axis))

  def route(self, topk_idx: Any, token_ids: Any) -> jax.Array:
    """Physical slots for logical top-k choices, spreading tokens over replicas.

    Token ``t``'s choice of expert ``e`` goes to replica
    ``token_ids[t] mod logcnt[e]`` of ``e`` (consecutive token ids cycle through
    the replicas, so each replica gets ``1 / logcnt[e]`` of the tokens).

    Args:
      topk_idx: ``[..., K]`` integer logical expert ids; negative ids (DeepEP's
        convention for masked choices) and ids ``>= E`` map to -1.
      token_ids: integers broadcastable to ``topk_idx.shape[:-1]`` (e.g. the
        global token index).

    Returns:
      ``[..., K]`` int32 physical slots in ``[0, P)``, or -1.
    """
    if self.num_layers is not None:
      raise ValueError(f"ExpertPlacement.route: needs a single-layer placement (index it: "
                       f"placement[layer]); this one has {self.num_layers} layers")
    topk_idx, token_ids = jnp.asarray(topk_idx), jnp.asarray(token_ids)
    if topk_idx.ndim < 1 or not jnp.issubdtype(topk_idx.dtype, jnp.integer):
      raise ValueError(f"ExpertPlacement.route: topk_idx must be an integer array [..., K], "
                       f"got shape {topk_idx.shape} dtype {topk_idx.dtype}")
    if not jnp.issubdtype(token_ids.dtype, jnp.integer):
      raise ValueError(f"ExpertPlacement.route: token_ids must be integers, got dtype "
                       f"{token_ids.dtype} (shape {token_ids.shape})")
    try:
      np.broadcast_shapes(token_ids.shape, topk_idx.shape[:-1])
    except ValueError:
      raise ValueError(f"ExpertPlacement.route: token_ids (shape {token_ids.shape}) must "
                       f"broadcast to topk_idx.shape[:-1] = {topk_idx.shape[:-1]}") from None
    valid = (topk_idx >= 0) & (topk_idx < self.num_experts)
    e = jnp.where(valid, topk_idx, 0).astype(jnp.int32)
    count = self.logcnt[e]
    replica = jnp.remainder(token_ids[..., None].astype(jnp.int32), count)
    slot = self.log2phy[e, replica]
    return jnp.where(valid, slot, -1).astype(jnp.int32)

  def device_of(self, slot: Any) -> jax.Array:
    """EP rank holding physical ``slot`` (-1 stays -1)."""
    slot = jnp.asarray(slot)
    return jnp.where(slot >= 0, slot // self.slots_per_gpu, -1)


def _check_axis(mesh, axis, num_gpus, where) -> None:
  names = axis if isinstance(axis, tuple) else (axis,)
  missing = [a for a in names if a not in mesh.shape]
  if missing:
    raise ValueError(f"{where}: mesh has no axis {missing[0]!r} (axes: {tuple(mesh.shape)})")
  size = int(np.prod([mesh.shape[a] for a in names]))
  if size != num_gpus:
    raise ValueError(f"{where}: the placement is for num_gpus={num_gpus} but mesh axis "
                     f"{axis!r} has size {size}")


# --- relayout -----------------------------------------------------------------------------------


def _schedule(old: ExpertPlacement, new: ExpertPlacement, capacity: int):
  """Where every new slot comes from; the same on every device.

  Returns ``[M, k]`` arrays over (device, local new slot) and a scalar:
  ``local`` (an old slot on the same device holds the expert), ``local_idx``
  (that slot), ``remote``, ``src_dev`` and ``src_slot`` (the old replica to fetch,
  replica ``p mod logcnt`` of the expert for new slot ``p``), ``rank`` (how many
  earlier slots of the device fetch from the same source: the position in the
  transfer), and ``rounds`` (all_to_all rounds of ``capacity`` slots needed).
  """
  m, k = old.num_gpus, old.slots_per_gpu
  new_e = new.phy2log.reshape(m, k)                                     # [M, k]
  old_e = old.phy2log.reshape(m, k)
  match = new_e[:, :, None] == old_e[:, None, :]                        # [M, k, k]
  local = match.any(-1)
  local_idx = jnp.argmax(match, axis=-1)
  slot = jnp.arange(m * k).reshape(m, k)
  replica = jnp.remainder(slot, old.logcnt[new_e])
  src = old.log2phy[new_e, replica]                                     # [M, k] old slot
  src_dev, src_slot = src // k, src % k
  remote = ~local
  same_src = (src_dev[:, :, None] == src_dev[:, None, :]) & remote[:, None, :]
  earlier = jnp.tril(jnp.ones((k, k), bool), -1)
  rank = (same_src & earlier[None]).sum(-1)                             # [M, k]
  rounds = jnp.where(remote, rank // capacity + 1, 0).max()
  return local, local_idx, remote, src_dev, src_slot, rank, rounds


def _relayout_layer(w_local, old: ExpertPlacement, new: ExpertPlacement, axis_name,
                    capacity: int):
  """One layer inside ``shard_map``: ``w_local [k, ...]`` -> ``[k, ...]``."""
  m, k = old.num_gpus, old.slots_per_gpu
  me = lax.axis_index(axis_name)
  local, local_idx, remote, src_dev, src_slot, rank, rounds = _schedule(old, new, capacity)
  del local  # remote slots are overwritten below
  out = w_local[local_idx[me]]                                          # local copies

  def one_round(t, out):
    # As sender: rows of the send buffer are destinations, columns positions.
    mine = remote & (src_dev == me) & (rank // capacity == t)           # [M(dest), k]
    dest = jnp.where(mine, jnp.arange(m)[:, None], m)                   # out of range: dropped
    send_idx = jnp.zeros((m, capacity), jnp.int32).at[dest, rank % capacity].set(
        src_slot.astype(jnp.int32), mode="drop")
    recv = lax.all_to_all(w_local[send_idx], axis_name, 0, 0, tiled=True)  # [M(src), C, ...]
    # As receiver.
    take = remote[me] & (rank[me] // capacity == t)
    got = recv[src_dev[me], rank[me] % capacity]                         # [k, ...]
    mask = take.reshape((k,) + (1,) * (out.ndim - 1))
    return jnp.where(mask, got, out)

  return lax.fori_loop(0, rounds, one_round, out)


def relayout_shard(w_local: Any, old: ExpertPlacement, new: ExpertPlacement, *,
                   axis_name: str | tuple[str, ...], capacity: int | None = None) -> Any:
  """:func:`relayout` for code already inside ``shard_map`` over the EP axis.

  Args:
    w_local: this device's ``[P/M, ...]`` (or ``[L, P/M, ...]``) slots of the
      physical weights in ``old``'s layout, or a pytree of such arrays.
    old, new: placements (replicated, identical on every device).
    axis_name: the EP mesh axis (size ``num_gpus``).
    capacity: replicas one device sends to one other device per round; the
      default ``P/M`` needs a single round. Smaller values send less padding
      (``M * capacity`` slots per device per round) but may need more rounds
      (``lax.fori_loop``; the count depends on the placements, every device
      agrees on it).

  Returns:
    The same structure in ``new``'s layout.
  """
  _check_pair(old, new, "relayout_shard")
  k = old.slots_per_gpu
  capacity = k if capacity is None else capacity
  if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or \
      not 1 <= capacity <= k:
    raise ValueError(f"relayout_shard: capacity must be an int in [1, {k}], got {capacity!r}")
  stacked = old.num_layers is not None

  def move(w):
    want = (old.num_layers, k) if stacked else (k,)
    if w.shape[:len(want)] != want:
      raise ValueError(f"relayout_shard: w_local must have shape {want} + (...) (the local "
                       f"slots), got shape {w.shape}")
    if not stacked:
      return _relayout_layer(w, old, new, axis_name, int(capacity))
    return lax.map(lambda args: _relayout_layer(args[0], args[1], args[2], axis_name,
                                                int(capacity)), (w, old, new))
  return jax.tree_util.tree_map(move, w_local)


def _check_pair(old: ExpertPlacement, new: ExpertPlacement, where: str) -> None:
  for name, p in (("old", old), ("new", new)):
    if not isinstance(p, ExpertPlacement):
      raise ValueError(f"{where}: {name} must be an ExpertPlacement, got {type(p).__name__}")
  if (old.phy2log.shape, old.num_experts, old.num_gpus) != (
      new.phy2log.shape, new.num_experts, new.num_gpus):
    raise ValueError(f"{where}: old and new placements differ in shape: phy2log "
                     f"{old.phy2log.shape} vs {new.phy2log.shape}, experts {old.num_experts} "
                     f"vs {new.num_experts}, num_gpus {old.num_gpus} vs {new.num_gpus}")


def relayout(w_physical: Any, old: ExpertPlacement, new: ExpertPlacement, *,
             mesh: jax.sharding.Mesh, axis: str | tuple[str, ...] = "ep",
             capacity: int | None = None) -> Any:
  """Moves physical expert weights from placement ``old`` to ``new``.

  Jittable; runs ``shard_map`` over ``mesh`` with the slots sharded over
  ``axis``. Each new slot is copied from a slot of the same expert on the same
  device when there is one, else fetched from a replica of the expert on
  another device with ``lax.all_to_all`` (see :func:`relayout_shard`). The
  result equals ``new.physical_weights(w_logical)`` when ``w_physical ==
  old.physical_weights(w_logical)``.

  Args:
    w_physical: ``[P, ...]`` (``[L, P, ...]`` for stacked placements), or a
      pytree of such arrays, in ``old``'s layout.
    old, new: placements with the same shapes and ``num_gpus`` equal to the
      size of ``axis``.
    mesh: the mesh; ``axis`` its EP axis (name or tuple of names).
    capacity: see :func:`relayout_shard`.

  Returns:
    ``w_physical`` in ``new``'s layout, sharded like ``old.partition_spec(axis)``.

  ``w_physical`` is put on ``old.sharding(mesh, axis)`` first (a no-op when it
  is already sharded that way).
  """
  _check_pair(old, new, "relayout")
  _check_axis(mesh, axis, old.num_gpus, "relayout")
  spec = old.partition_spec(axis)
  for leaf in jax.tree_util.tree_leaves(w_physical):
    want = old.phy2log.shape
    if leaf.shape[:len(want)] != want:
      raise ValueError(f"relayout: w_physical must have shape {want} + (...), got shape "
                       f"{leaf.shape}")
  return _relayout_jit(w_physical, old, new, mesh, axis, capacity)


@functools.partial(jax.jit, static_argnums=(3, 4, 5))
def _relayout_jit(w_physical, old, new, mesh, axis, capacity):
  spec = old.partition_spec(axis)
  sharding = NamedSharding(mesh, spec)
  w_physical = jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), w_physical)
  fn = jax.shard_map(functools.partial(relayout_shard, axis_name=axis, capacity=capacity),
                     mesh=mesh, in_specs=(spec, P(), P()), out_specs=spec)
  return fn(w_physical, old, new)
