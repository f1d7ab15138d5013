"""Low-latency expert-parallel dispatch and combine (DeepEP's LL mode, decode).

Inside ``jax.shard_map`` over the EP axis (``R`` ranks, ``E/R`` local experts,
at most ``T`` tokens per rank). Every (token, expert) pair is its own row, no
per-rank deduplication (bandwidth traded for latency, as in DeepEP), and the
result is the *masked layout* a masked grouped GEMM consumes:

* ``recv_x [E/R, R*T, H]``: local expert ``e``'s first ``recv_count[e]``
  rows are its tokens, grouped by source rank (ascending) and in source order
  within a rank (deterministic, unlike DeepEP's atomics); the other rows are
  zero. FP8 (default): e4m3 values plus float32 scales ``[E/R, R*T, H/128]``
  (one per token per 128 channels, ``jaxinfra.quant.quantize_per_token``).
* ``low_latency_combine`` returns, for each token, the weighted sum of its
  experts' rows in top-k order, accumulated in float32.

The buffers are ``E/R * R*T = E*T`` rows per rank by design (DeepEP's LL
buffers scale the same way), so keep ``T`` at decode sizes. Rows are never
dropped (``T`` bounds what one rank can send to one expert). Not
differentiable (DeepEP's LL mode has no backward): use normal mode to train.
The exchange is the padded ``all_to_all`` on every platform.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra import _custom_call
from jaxinfra.moe import _validate
from jaxinfra.moe import normal as dispatch_lib
from jaxinfra.moe import layout
from jaxinfra.moe import permutation as permute_lib

_HINT = "Low-latency mode is inference-only (as DeepEP's); train with dispatch/combine."


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
  """What :func:`low_latency_combine` needs (a pytree).

  Attributes:
    send_map: ``[N, K]`` int32, the send-buffer row of each (token, expert) copy.
    send_sizes: ``[E]`` int32 rows sent to each global expert.
    recv_sizes: ``[E]`` int32 rows received per (source rank, local expert).
    pack_map: ``[E*T, 1]`` int32, received row -> masked-layout row.
    hop: static, the exchange.
    impl: static, the permute implementation.
  """
  send_map: jax.Array
  send_sizes: jax.Array
  recv_sizes: jax.Array
  pack_map: jax.Array
  hop: dispatch_lib.Hop = None
  impl: str = "auto"

  def tree_flatten(self):
    return ((self.send_map, self.send_sizes, self.recv_sizes, self.pack_map),
            (self.hop, self.impl))

  @classmethod
  def tree_unflatten(cls, aux, children):
    return cls(*children, *aux)


class LowLatencyDispatched(NamedTuple):
  """Result of :func:`low_latency_dispatch`.

  Attributes:
    recv_x: ``[E/R, R*T, H]`` float8_e4m3fn (``fp8=True``) or ``x``'s dtype.
    recv_scales: ``[E/R, R*T, H/128]`` float32 with ``fp8=True``, else None.
    recv_count: ``[E/R]`` int32 valid rows per local expert.
    num_invalid: int32, ids outside ``[-1, E)`` in ``topk_idx`` (treated as -1).
    handle: the :class:`LowLatencyHandle`.
  """
  recv_x: jax.Array
  recv_scales: jax.Array | None
  recv_count: jax.Array
  num_invalid: jax.Array
  handle: LowLatencyHandle


def _send(x: jax.Array, handle: LowLatencyHandle) -> jax.Array:
  """[N, ...] -> masked layout rows [E_l * R*T, ...]."""
  hop, impl = handle.hop, handle.impl
  rows = permute_lib.permute_rows(x, handle.send_map, hop.rows, impl)
  received = dispatch_lib.exchange(rows, hop, handle.send_sizes, handle.recv_sizes, "padded")
  return permute_lib.permute_rows(received, handle.pack_map, hop.rows, impl)


def low_latency_dispatch(x: jax.Array, topk_idx: jax.Array, *, axis_name: str, num_experts: int,
                         max_tokens_per_rank: int, fp8: bool = True,
                         impl: str = "auto") -> LowLatencyDispatched:
  """Sends every (token, expert) pair to the expert's rank, masked layout out.

  Args:
    x: ``[N, H]`` float tokens, ``N <= max_tokens_per_rank``.
    topk_idx: ``[N, K]`` integer global expert ids, -1 for none.
    axis_name: the EP mesh axis (or a tuple of axes, flattened).
    num_experts: ``E``, divisible by the EP size ``R``.
    max_tokens_per_rank: ``T``, the same on every rank.
    fp8: send e4m3 values plus 1x128 scales (``H % 128 == 0``); else ``x``'s dtype.
    impl: the local permute's implementation.

  Returns:
    :class:`LowLatencyDispatched`.
  """
  op = "low_latency_dispatch"
  x = _validate.array(op, "x", x, ndim=2, dims="[N, H]", kind="float")
  topk_idx = layout.check_topk_idx(op, topk_idx)
  _validate.same_rows(op, ("x", "topk_idx"), x, topk_idx)
  tokens = _validate.positive_int(op, "max_tokens_per_rank", max_tokens_per_rank)
  n, hidden = x.shape
  if n > tokens:
    raise ValueError(f"{op}: x has {n} tokens (shape {x.shape}), more than "
                     f"max_tokens_per_rank={tokens}")
  if fp8 and hidden % dispatch_lib.FP8_BLOCK:
    raise ValueError(f"{op}: fp8 dispatch needs H divisible by {dispatch_lib.FP8_BLOCK}, got x "
                     f"shape {x.shape}")
  ranks = dispatch_lib.axis_size(axis_name)
  per_rank = layout.experts_per_rank(op, num_experts, ranks)

  ids, num_invalid = layout.valid_ids(topk_idx, num_experts)
  hop = dispatch_lib.Hop(axis_name, ranks, per_rank, tokens)
  send_map, send_sizes, _, _ = permute_lib.permute_map(ids, num_experts, capacity=tokens)
  recv_sizes = dispatch_lib.exchange_sizes(send_sizes, hop)  # [R (source), E_l]
  # Received row (source s, local expert e, slot j) is valid when j < recv_sizes[s, e];
  # packing by local expert (stable) orders each expert's rows by (source, slot).
  slot = jnp.arange(tokens, dtype=jnp.int32)
  valid = slot[None, None, :] < recv_sizes.reshape(ranks, per_rank, 1)
  expert = jnp.broadcast_to(jnp.arange(per_rank, dtype=jnp.int32)[None, :, None], valid.shape)
  pack_group = jnp.where(valid, expert, -1).reshape(-1, 1)
  pack_map, recv_count, _, _ = permute_lib.permute_map(pack_group, per_rank,
                                                       capacity=ranks * tokens)
  handle = LowLatencyHandle(send_map, send_sizes, recv_sizes, pack_map, hop, impl)

  def run(x):
    payload = dispatch_lib.pack_fp8(x, impl) if fp8 else x
    return _send(payload, handle)

  rows = _custom_call.non_differentiable(run, op, _HINT)(x)
  scales = None
  if fp8:
    recv_x, scales = dispatch_lib.unpack_fp8(rows, hidden)
    scales = scales.reshape(per_rank, ranks * tokens, -1)
  else:
    recv_x = rows
  return LowLatencyDispatched(recv_x.reshape(per_rank, ranks * tokens, hidden), scales,
                              recv_count, num_invalid, handle)


def low_latency_combine(y: jax.Array, topk_idx: jax.Array, topk_weights: jax.Array,
                        handle: LowLatencyHandle) -> jax.Array:
  """Returns expert outputs to their tokens: the weighted sum in top-k order.

  Args:
    y: ``[E/R, R*T, H]`` float32 or bfloat16 expert outputs in the masked
      layout (rows beyond ``recv_count`` are ignored).
    topk_idx: ``[N, K]`` the ids given to :func:`low_latency_dispatch` (the
      handle carries the routing; this argument is checked for shape only,
      as in DeepEP's signature).
    topk_weights: ``[N, K]`` float weights.
    handle: from :func:`low_latency_dispatch`.

  Returns:
    ``[N, H]`` in ``y``'s dtype: ``sum_k w[n, k] * y[expert k's row of n]``
    over valid ids, accumulated in float32 in top-k order.
  """
  op = "low_latency_combine"
  y = _validate.array(op, "y", y, ndim=3, dims="[E/R, R*T, H]", kind="float")
  topk_idx, topk_weights = layout.check_routing(op, topk_idx, topk_weights)
  if not isinstance(handle, LowLatencyHandle):
    raise ValueError(f"{op}: handle must be the LowLatencyHandle from low_latency_dispatch")
  hop = handle.hop
  expected = (hop.groups, hop.peers * hop.capacity)
  if y.shape[:2] != expected:
    raise ValueError(f"{op}: y must have shape {expected} + (H,), got {y.shape}")
  if topk_idx.shape != handle.send_map.shape:
    raise ValueError(f"{op}: topk_idx must have the dispatched shape {handle.send_map.shape}, "
                     f"got {topk_idx.shape}")
  impl = handle.impl

  def run(y, weights):
    flat = y.reshape(-1, y.shape[2])
    received = permute_lib.unpermute_rows(flat, handle.pack_map, None, impl)
    back = dispatch_lib.exchange(received, hop, handle.recv_sizes, handle.send_sizes, "padded")
    return permute_lib.unpermute_rows(back, handle.send_map, weights, impl)

  weights = jnp.where(handle.send_map >= 0, topk_weights.astype(jnp.float32), np.float32(0))
  return _custom_call.non_differentiable(run, op, _HINT)(y, weights)
