"""Expert-parallel dispatch and combine (DeepEP's normal mode) inside ``shard_map``.

Call these inside ``jax.shard_map`` over the EP mesh axis (or axes). Rank ``r``
of ``R`` hosts experts ``[r * E/R, (r+1) * E/R)``.

**Layout.** ``dispatch`` sends each token once to every rank hosting at least
one of its experts (deduplicated across that rank's experts). Rank ``r``
receives ``recv_x [R * capacity, H]``: block ``s`` (rows
``[s * capacity, (s+1) * capacity)``) holds the tokens from source rank ``s``
in source order, followed by zero rows. Everything is static-shape: a source
rank sends at most ``capacity`` tokens to each destination; further tokens
are dropped deterministically (the last ones in source order), counted in
``num_dropped``, and their combine result misses that rank's contribution.
``capacity = N`` (the default) never drops. ``recv_topk_idx`` holds the local
expert ids (``[0, E/R)``) of each received token, -1 for its experts on other
ranks and for padding rows; ``recv_topk_weights`` is 0 wherever the id is -1.

**Combine** sums, in float32 and in rank order, the rows each rank returns
for a token (unweighted: apply the top-k weights and reduce over local
experts before combining, e.g. with ``jaxinfra.moe.unpermute``), and
rounds to ``y``'s dtype. ``combine(dispatch(x)) = x * (ranks per token)``.

**Gradients.** Dispatch's VJP (with respect to ``x``) is combine and
combine's VJP is a dispatch with the same handle (``custom_vjp``); the
gradient with respect to ``topk_weights`` flows back to each weight's source.
FP8 dispatch (``fp8=True``) sends e4m3 values plus 1x128 float32 scales
(``jaxinfra.quant.quantize_per_token``); it is not differentiable unless
``dequantize=True``, which returns ``recv_x`` in ``x``'s dtype after the FP8
round trip and uses the bf16 combine as the backward (DeepSeek-V3's
training recipe: FP8 dispatch forward, BF16 gradients back).

**Two-level EP.** With ``axis_name=(node_axis, local_axis)`` a token first
crosses the node axis once per destination node (to the rank with the same
local index, rail-aligned), then fans out inside the node; combine reduces
inside the node first and crosses the node axis once per (token, node), as
DeepEP's internode kernels do. The received layout, ids, weights and drops
equal single-level EP over the flattened axes (``capacity`` per source rank);
combine differs only by float32 summation order. ``node_capacity`` (default
``N``, never drops) bounds the first hop.

**Backends.** ``"padded"``: ``jax.lax.all_to_all`` of fixed ``capacity``
blocks; runs everywhere, including XLA:CPU. ``"ragged"``:
``jax.lax.ragged_all_to_all`` moving only the filled rows into the same
layout (identical results); XLA:CPU does not implement it and it has not run
on a GPU yet, so ``"auto"`` picks ``"padded"`` everywhere for now.

**Bad input.** Static facts (ranks, dtypes, E divisible by R, H divisible by
128 with FP8, mismatched shapes) raise ``ValueError`` at trace time. Expert
ids outside ``[-1, E)`` are treated as -1 and counted in ``num_invalid``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfra import _custom_call
from jaxinfra import quant
from jaxinfra.moe import _validate
from jaxinfra.moe import layout
from jaxinfra.moe import permutation as permute_lib

BACKENDS = ("auto", "padded", "ragged")
# Platforms where the ragged_all_to_all backend has passed its tests; "auto"
# selects it there. Empty until it has run on a GPU.
RAGGED_VERIFIED_PLATFORMS: tuple[str, ...] = ()
FP8_BLOCK = 128


# --- static description of the exchange ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Hop:
  """One exchange over a mesh axis: ``peers`` blocks of ``groups`` x ``capacity`` rows."""
  axis: Any
  peers: int
  groups: int
  capacity: int

  @property
  def rows(self) -> int:
    return self.peers * self.groups * self.capacity


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class DispatchHandle:
  """What combine needs to invert a dispatch (a pytree; pass it around freely).

  Attributes:
    maps: per hop, the ``[rows_in, D]`` int32 row map of its send permute.
    send_sizes: per hop, ``[peers * groups]`` int32 rows sent per group.
    recv_sizes: per hop, ``[peers * groups]`` int32 rows received per group.
    hops: static, the exchanges.
    reorder: static, ``(local, nodes)`` for two-level EP's final block
      transpose, else None.
    num_tokens: static ``N``.
    backend: static, ``"padded"`` or ``"ragged"``.
    impl: static, the permute implementation.
  """
  maps: tuple
  send_sizes: tuple
  recv_sizes: tuple
  hops: tuple = ()
  reorder: tuple | None = None
  num_tokens: int = 0
  backend: str = "padded"
  impl: str = "auto"

  @property
  def num_recv_rows(self) -> int:
    return self.hops[-1].rows

  def tree_flatten(self):
    return ((self.maps, self.send_sizes, self.recv_sizes),
            (self.hops, self.reorder, self.num_tokens, self.backend, self.impl))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)


class Dispatched(NamedTuple):
  """Result of :func:`dispatch` on one rank (``R`` ranks, ``capacity`` C).

  Attributes:
    recv_x: ``[R*C, H]`` in ``x``'s dtype, or float8_e4m3fn with ``fp8=True``.
    recv_scales: ``[R*C, H/128]`` float32 with ``fp8=True`` (else None).
    recv_topk_idx: ``[R*C, K]`` int32 local expert ids or -1.
    recv_topk_weights: ``[R*C, K]`` float32 (float64 for float64 weights), 0
      where the id is -1.
    num_recv_tokens_per_expert: ``[E/R]`` int32 received tokens per local expert.
    num_recv_tokens_per_rank: ``[R]`` int32 rows received from each source rank.
    num_dropped: int32, (token, destination rank) pairs dropped by this rank
      (two-level EP: by the rank that forwards them inside the destination
      node; the sum over ranks equals single-level EP's).
    num_invalid: int32, ids outside ``[-1, E)`` in this rank's ``topk_idx``.
    handle: the :class:`DispatchHandle` for :func:`combine`.
  """
  recv_x: jax.Array
  recv_scales: jax.Array | None
  recv_topk_idx: jax.Array
  recv_topk_weights: jax.Array
  num_recv_tokens_per_expert: jax.Array
  num_recv_tokens_per_rank: jax.Array
  num_dropped: jax.Array
  num_invalid: jax.Array
  handle: DispatchHandle


def resolve_backend(op: str, backend: str) -> str:
  if backend not in BACKENDS:
    raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
  if backend != "auto":
    return backend
  return "ragged" if _custom_call.current_platform() in RAGGED_VERIFIED_PLATFORMS else "padded"


def axis_size(axis) -> int:
  return int(lax.axis_size(axis))


# --- moving rows ---------------------------------------------------------------------------------


def exchange(rows: jax.Array, hop: Hop, send_sizes: jax.Array, recv_sizes: jax.Array,
             backend: str) -> jax.Array:
  """Sends block ``p`` of ``rows [P*G*C, ...]`` to peer ``p``; block ``p`` of the
  result came from peer ``p``. Within a block, group ``g``'s rows start at
  ``g*C`` and only its first ``send_sizes`` rows carry data."""
  if backend == "padded":
    blocks = rows.reshape(hop.peers, hop.groups * hop.capacity, *rows.shape[1:])
    return lax.all_to_all(blocks, hop.axis, 0, 0, tiled=True).reshape(rows.shape)
  me = lax.axis_index(hop.axis)
  group = jnp.arange(hop.peers * hop.groups, dtype=jnp.int32)
  input_offsets = group * hop.capacity
  # Receiver coordinates: my slice for peer p's group g lands in p's block for me.
  output_offsets = (me * hop.groups + group % hop.groups) * hop.capacity
  return lax.ragged_all_to_all(rows, jnp.zeros_like(rows), input_offsets, send_sizes,
                               output_offsets.astype(jnp.int32), recv_sizes, axis_name=hop.axis)


def exchange_sizes(sizes: jax.Array, hop: Hop) -> jax.Array:
  """``[P*G]`` rows per group I send -> ``[P*G]`` rows per group I receive."""
  blocks = sizes.reshape(hop.peers, hop.groups)
  return lax.all_to_all(blocks, hop.axis, 0, 0, tiled=True).reshape(-1)


def _reorder(x: jax.Array, reorder, *, inverse: bool) -> jax.Array:
  if reorder is None:
    return x
  local, nodes = reorder
  shape = (nodes, local) if inverse else (local, nodes)
  blocks = x.reshape(*shape, -1, *x.shape[1:])
  return jnp.swapaxes(blocks, 0, 1).reshape(x.shape)


def forward_rows(x: jax.Array, handle: DispatchHandle) -> jax.Array:
  """The dispatch data path: ``[N, ...]`` -> ``[R*C, ...]`` (any dtype)."""
  for hop, row_map, sent, received in zip(handle.hops, handle.maps, handle.send_sizes,
                                          handle.recv_sizes):
    rows = permute_lib.permute_rows(x, row_map, hop.rows, handle.impl)
    x = exchange(rows, hop, sent, received, handle.backend)
  return _reorder(x, handle.reorder, inverse=False)


def backward_rows(y: jax.Array, handle: DispatchHandle) -> jax.Array:
  """The combine data path: ``[R*C, H]`` -> ``[N, H]``, float32 sums per hop."""
  y = _reorder(y, handle.reorder, inverse=True)
  for hop, row_map, sent, received in reversed(list(zip(handle.hops, handle.maps,
                                                        handle.send_sizes, handle.recv_sizes))):
    back = exchange(y, hop, received, sent, handle.backend)
    y = permute_lib.unpermute_rows(back, row_map, None, handle.impl)
  return y


def _adjoint_pair(apply, adjoint):
  """``apply(v, handle)`` as a ``custom_vjp`` whose VJP is ``adjoint(g, handle)``."""

  @jax.custom_vjp
  def linear(v: jax.Array, handle: DispatchHandle) -> jax.Array:
    return apply(v, handle)

  linear.defvjp(lambda v, handle: (apply(v, handle), handle),
                lambda handle, g: (adjoint(g, handle), None))
  return linear


# Dispatch's VJP is combine; combine's VJP is a (cached) dispatch.
_dispatch_linear = _adjoint_pair(forward_rows, backward_rows)
_combine_linear = _adjoint_pair(backward_rows, forward_rows)


# --- FP8 payload: e4m3 values and float32 scales travel as one byte row ------------------------


def pack_fp8(x: jax.Array, impl: str) -> jax.Array:
  """``x [N, H]`` -> ``uint8 [N, H + 4*H/128]``: e4m3 bytes, then the scales' bytes."""
  q, scales = quant.quantize_per_token(x, FP8_BLOCK, impl=impl)
  n = x.shape[0]
  return jnp.concatenate([lax.bitcast_convert_type(q, jnp.uint8),
                          lax.bitcast_convert_type(scales, jnp.uint8).reshape(n, -1)], axis=1)


def unpack_fp8(packed: jax.Array, hidden: int) -> tuple[jax.Array, jax.Array]:
  """Inverse of :func:`pack_fp8`: ``(e4m3 [..., H], float32 scales [..., H/128])``."""
  lead = packed.shape[:-1]
  q = lax.bitcast_convert_type(packed[..., :hidden], jnp.float8_e4m3fn)
  scale_bytes = packed[..., hidden:].reshape(*lead, hidden // FP8_BLOCK, 4)
  return q, lax.bitcast_convert_type(scale_bytes, jnp.float32)


def _fp8_straight_through(x: jax.Array, handle: DispatchHandle, impl: str) -> jax.Array:
  """FP8 on the wire, ``x``'s dtype out; the backward is the bf16/f32 combine."""

  @jax.custom_vjp
  def send(x, handle):
    q, scales = unpack_fp8(forward_rows(pack_fp8(x, impl), handle), x.shape[1])
    return quant.dequantize_per_token(q, scales, FP8_BLOCK, out_dtype=x.dtype)

  def fwd(x, handle):
    return send(x, handle), handle

  def bwd(handle, g):
    return backward_rows(g, handle).astype(x.dtype), None

  send.defvjp(fwd, bwd)
  return send(x, handle)


# --- the plan: who sends what where --------------------------------------------------------------


class _Plan(NamedTuple):
  handle: DispatchHandle
  num_dropped: jax.Array


def _hop_plan(group_ids, hop: Hop):
  row_map, sent, dropped, _ = permute_lib.permute_map(group_ids, hop.peers * hop.groups,
                                                      capacity=hop.capacity)
  return row_map, sent, exchange_sizes(sent, hop), dropped


def _single_level_plan(ids, axis, num_experts: int, capacity: int, backend: str,
                       impl: str) -> _Plan:
  ranks = axis_size(axis)
  in_rank = layout.token_in_rank(ids, num_experts // ranks, ranks)
  group = jnp.where(in_rank, jnp.arange(ranks, dtype=jnp.int32), -1)
  hop = Hop(axis, ranks, 1, capacity)
  row_map, sent, received, dropped = _hop_plan(group, hop)
  handle = DispatchHandle((row_map,), (sent,), (received,), (hop,), None, ids.shape[0], backend,
                          impl)
  return _Plan(handle, dropped)


def _two_level_plan(ids, axis, num_experts: int, capacity: int, node_capacity: int,
                    backend: str, impl: str) -> _Plan:
  node_axis, local_axis = axis
  nodes, local = axis_size(node_axis), axis_size(local_axis)
  per_rank = num_experts // (nodes * local)
  n = ids.shape[0]
  # Hop 1: once per destination node, to the rank with my local index.
  in_rank = layout.token_in_rank(ids, per_rank, nodes * local).reshape(n, nodes, local)
  ranks_in_node = jnp.sum(in_rank, axis=2, dtype=jnp.int32)
  node_group = jnp.where(ranks_in_node > 0, jnp.arange(nodes, dtype=jnp.int32), -1)
  hop1 = Hop(node_axis, nodes, 1, node_capacity)
  map1, sent1, recv1, _ = _hop_plan(node_group, hop1)
  lost1 = jnp.sum(jnp.where((node_group >= 0) & (map1 < 0), ranks_in_node, 0), dtype=jnp.int32)
  partial = DispatchHandle((map1,), (sent1,), (recv1,), (hop1,), None, n, backend, impl)
  forwarded = forward_rows(ids + 1, partial) - 1  # [nodes * node_capacity, K] global ids
  # Hop 2: fan out inside the node; group (l', m') keeps source node m' apart so
  # that each (source rank, destination rank) pair gets `capacity` rows.
  me_node = lax.axis_index(node_axis)
  rank = jnp.where(forwarded >= 0, forwarded // per_rank, -1)
  here = (forwarded >= 0) & (rank // local == me_node)
  local_rank = jnp.arange(local, dtype=jnp.int32)
  needed = jnp.any(here[:, :, None] & (rank[:, :, None] % local == local_rank), axis=1)
  source_node = jnp.arange(forwarded.shape[0], dtype=jnp.int32)[:, None] // node_capacity
  group2 = jnp.where(needed, local_rank * nodes + source_node, -1)
  hop2 = Hop(local_axis, local, nodes, capacity)
  map2, sent2, recv2, dropped2 = _hop_plan(group2, hop2)
  handle = DispatchHandle((map1, map2), (sent1, sent2), (recv1, recv2), (hop1, hop2),
                          (local, nodes), n, backend, impl)
  return _Plan(handle, lost1 + dropped2)


def _rank_index(axis, hierarchical: bool):
  return lax.axis_index(tuple(axis) if hierarchical else axis)


def _parse_axis(op: str, axis_name, hierarchical: bool | None) -> tuple[Any, bool]:
  if isinstance(axis_name, str):
    if hierarchical:
      raise ValueError(f"{op}: hierarchical=True needs axis_name=(node_axis, local_axis), got "
                       f"{axis_name!r}")
    return axis_name, False
  axis = tuple(axis_name)
  if not axis or not all(isinstance(a, str) for a in axis):
    raise ValueError(f"{op}: axis_name must be a mesh axis name or a tuple of names, got "
                     f"{axis_name!r}")
  two_level = hierarchical is None or hierarchical
  if two_level and len(axis) != 2:
    raise ValueError(f"{op}: two-level EP needs axis_name=(node_axis, local_axis), got "
                     f"{axis_name!r} (pass hierarchical=False for single-level EP over them)")
  return axis, two_level


# --- public API ----------------------------------------------------------------------------------


def dispatch(x: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array, *, axis_name,
             num_experts: int, capacity: int | None = None, fp8: bool = False,
             dequantize: bool = False, hierarchical: bool | None = None,
             node_capacity: int | None = None, backend: str = "auto",
             impl: str = "auto") -> Dispatched:
  """Sends each token to the ranks hosting its experts (inside ``shard_map``).

  Args:
    x: ``[N, H]`` this rank's tokens (float; bf16 in DeepSeek-V3).
    topk_idx: ``[N, K]`` integer global expert ids, -1 for none.
    topk_weights: ``[N, K]`` float top-k weights (sent as float32, float64 kept).
    axis_name: the EP mesh axis, or ``(node_axis, local_axis)`` for two-level EP.
    num_experts: ``E``, divisible by the EP size ``R``.
    capacity: rows each rank accepts from each source rank (default ``N``:
      never drops).
    fp8: send e4m3 values plus 1x128 float32 scales (``H % 128 == 0``).
    dequantize: with ``fp8``, return ``recv_x`` dequantized to ``x``'s dtype
      (differentiable; backward is the bf16 combine).
    hierarchical: with a tuple ``axis_name``: True/None two-level EP, False
      single-level EP over the flattened axes.
    node_capacity: two-level only: rows per (source rank, destination node)
      on the first hop (default ``N``: never drops).
    backend: ``"auto"``, ``"padded"`` or ``"ragged"`` (see the module docstring).
    impl: the local permute's implementation: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    :class:`Dispatched`.
  """
  op = "dispatch"
  x = _validate.array(op, "x", x, ndim=2, dims="[N, H]", kind="float")
  topk_idx, topk_weights = layout.check_routing(op, topk_idx, topk_weights)
  _validate.same_rows(op, ("x", "topk_idx"), x, topk_idx)
  axis, two_level = _parse_axis(op, axis_name, hierarchical)
  ranks = axis_size(axis)
  per_rank = layout.experts_per_rank(op, num_experts, ranks)
  n, hidden = x.shape
  capacity = _validate.positive_int(op, "capacity", n if capacity is None else capacity)
  node_capacity = _validate.positive_int(op, "node_capacity",
                                         n if node_capacity is None else node_capacity)
  if fp8 and hidden % FP8_BLOCK:
    raise ValueError(f"{op}: fp8 dispatch needs H divisible by {FP8_BLOCK}, got x shape {x.shape}")
  if dequantize and not fp8:
    raise ValueError(f"{op}: dequantize=True only applies with fp8=True")
  backend = resolve_backend(op, backend)

  ids, num_invalid = layout.valid_ids(topk_idx, num_experts)
  if two_level:
    plan = _two_level_plan(ids, axis, num_experts, capacity, node_capacity, backend, impl)
  else:
    plan = _single_level_plan(ids, axis, num_experts, capacity, backend, impl)
  handle = plan.handle

  scales = None
  if not fp8:
    recv_x = _dispatch_linear(x, handle)
  elif dequantize:
    recv_x = _fp8_straight_through(x, handle, impl)
  else:
    recv_x, scales = unpack_fp8(forward_rows(pack_fp8(x, impl), handle), hidden)

  me = _rank_index(axis, two_level)
  recv_ids = forward_rows(ids + 1, handle) - 1
  mine = (recv_ids >= 0) & (recv_ids // per_rank == me)
  recv_local = jnp.where(mine, recv_ids - me * per_rank, -1).astype(jnp.int32)
  recv_weights = forward_rows(topk_weights.astype(_validate.accum_dtype(topk_weights.dtype)),
                              handle)
  recv_weights = jnp.where(mine, recv_weights, 0)
  per_expert = jnp.bincount(jnp.where(mine, recv_local, per_rank).reshape(-1),
                            length=per_rank + 1)[:per_rank].astype(jnp.int32)
  per_source = handle.recv_sizes[-1]
  if handle.reorder is not None:
    local, nodes = handle.reorder
    per_source = per_source.reshape(local, nodes).T.reshape(-1)
  return Dispatched(recv_x, scales, recv_local, recv_weights, per_expert, per_source,
                    plan.num_dropped, num_invalid, handle)


def combine(y: jax.Array, handle: DispatchHandle) -> jax.Array:
  """Returns each token's rows from every rank it was sent to, summed.

  Args:
    y: ``[R*C, H]`` float32 or bfloat16, in ``recv_x``'s row order (padding
      rows are ignored).
    handle: from :func:`dispatch`.

  Returns:
    ``[N, H]`` in ``y``'s dtype: the unweighted sum over the token's
    destination ranks, accumulated in float32 (float64 for float64 ``y``) in rank order (two-level: inside
    the node first, then across nodes). Tokens with no valid expert get 0.
  """
  op = "combine"
  y = _validate.array(op, "y", y, ndim=2, dims="[R*C, H]", kind="float")
  if not isinstance(handle, DispatchHandle):
    raise ValueError(f"{op}: handle must be the DispatchHandle from dispatch, got "
                     f"{type(handle).__name__}")
  if y.shape[0] != handle.num_recv_rows:
    raise ValueError(f"{op}: y must have {handle.num_recv_rows} rows (dispatch's recv_x), got "
                     f"shape {y.shape}")
  return _combine_linear(y, handle)


def cached_dispatch(x: jax.Array, handle: DispatchHandle) -> jax.Array:
  """Dispatches ``x [N, H]`` along an existing handle (DeepEP's cached mode).

  Returns ``[R*C, H]`` in ``x``'s dtype, the rows :func:`dispatch` would send;
  this is combine's VJP.
  """
  op = "cached_dispatch"
  x = _validate.array(op, "x", x, ndim=2, dims="[N, H]", kind="float")
  if x.shape[0] != handle.num_tokens:
    raise ValueError(f"{op}: x must have {handle.num_tokens} rows (the dispatched tokens), got "
                     f"shape {x.shape}")
  return _dispatch_linear(x, handle)
