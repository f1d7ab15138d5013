"""FlashMLA's split-KV schedule (``get_mla_metadata``) and a pure-JAX execution
of it (``split_kv_reference``): the reference for the GPU kernel's scheduler,
main kernel and combine kernel.

The decode kernel runs ``num_sm_parts`` persistent CTAs ("SM parts"). Each
request's keys are cut into 64-key *tiles*; a request costs ``tiles + 5``
(5 tiles of fixed overhead, FlashMLA's SM90 constant; an empty request still
costs one tile). The scheduler walks the requests in order, giving each part a
payload of ``ceil(total_cost / num_sm_parts) + 5``: a part takes whole requests
while they fit, then the first ``payload_left - 5`` tiles of the next one (a
*split*), and the next part continues that request where it stopped.

Outputs (FlashMLA's "old API" tensors):

* ``tile_scheduler_metadata [num_sm_parts, 8]`` int32, one row per part:
  ``begin_req, end_req`` (inclusive), ``begin_tile, end_tile`` (the tile range
  in ``begin_req`` resp. ``end_req``; end exclusive), ``begin_split_idx`` (the
  split number of ``begin_req`` this part computes), ``is_first_req_split``,
  ``is_last_req_split``, 0. A part whose ``begin_req > end_req`` is idle.
* ``num_splits [b + 1]`` int32: exclusive prefix sum of splits per request.
  Request ``r``'s split ``k`` writes its partial result to workspace slot
  ``num_splits[r] + k``; a request with one split writes ``out`` directly.

The workspace the kernel needs is ``o_accum [b + num_sm_parts, h_kv,
s_q * h_q / h_kv, 512]`` and ``lse_accum [b + num_sm_parts, h_kv,
s_q * h_q / h_kv]`` float32 (``num_splits[b] <= b + num_sm_parts``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxinfra import _custom_call
from jaxinfra.mla import _core

TILE = 64                   # keys per scheduler tile (the kernel's KV block)
FIXED_OVERHEAD_TILES = 5    # FlashMLA's fixed_overhead_num_blocks on SM90
METADATA_WIDTH = 8
DEFAULT_NUM_SMS = 132       # H800/H100 SXM: reproduce the Hopper schedule off-GPU
_M_BLOCK = 64               # query rows per CTA in the dense kernel


class MLAMetadata(NamedTuple):
  """Split-KV schedule of one decode step (shared by every layer of the step)."""
  tile_scheduler_metadata: jax.Array  # [num_sm_parts, 8] int32
  num_splits: jax.Array               # [b + 1] int32


def default_num_sms() -> int:
  """SM count of the default device (CUDA), else 132 (an H800/H100)."""
  if _custom_call.current_platform() == "cuda":
    count = getattr(jax.devices()[0], "core_count", None)
    if count:
      return int(count)
  return DEFAULT_NUM_SMS


def num_sm_parts(num_q_tokens_per_head_k: int, num_heads_k: int,
                 num_sms: int | None = None) -> int:
  """FlashMLA's dense-decode part count:
  ``max(num_sms // h_kv // ceil(s_q * h_q / h_kv / 64), 1)``."""
  if num_q_tokens_per_head_k < 1 or num_heads_k < 1:
    raise ValueError(f"num_sm_parts: num_q_tokens_per_head_k and num_heads_k must be >= 1, got "
                     f"{num_q_tokens_per_head_k} and {num_heads_k}")
  num_sms = default_num_sms() if num_sms is None else int(num_sms)
  if num_sms < 1:
    raise ValueError(f"num_sm_parts: num_sms must be >= 1, got {num_sms}")
  return max(num_sms // num_heads_k // math.ceil(num_q_tokens_per_head_k / _M_BLOCK), 1)


def num_tiles(cache_seqlens: jax.Array) -> jax.Array:
  """Tiles per request: ``max(1, ceil(max(seqlen, 0) / 64))``, int32 ``[b]``."""
  return jnp.maximum(_core.ceil_div(jnp.maximum(cache_seqlens, 0), TILE), 1)


@functools.partial(jax.jit, static_argnums=1)
def _schedule(tiles: jax.Array, parts: int) -> MLAMetadata:
  """The greedy walk of FlashMLA's ``get_mla_metadata_kernel``, in ``lax`` loops."""
  b = tiles.shape[0]
  # Loop-carried values derive from `tiles` so that inside shard_map they vary
  # over the same mesh axes as the values the loop bodies compute from it.
  zero = tiles[0] - tiles[0]
  fixed = jnp.int32(FIXED_OVERHEAD_TILES)
  total = jnp.sum(tiles + fixed)
  payload = (total + parts - 1) // parts + fixed

  def take(state):
    """One step inside a part: the whole current request, or a split of it."""
    req, tile, split, cum, splits, left, _ = state
    rest = tiles[req] - tile
    whole = left >= rest + fixed
    partial = ~whole & (left - fixed > 0)
    cum_next = cum + split + 1
    splits = splits.at[req + 1].set(jnp.where(whole, cum_next, splits[req + 1]))
    return (jnp.where(whole, req + 1, req),
            jnp.where(whole, 0, jnp.where(partial, tile + left - fixed, tile)),
            jnp.where(whole, 0, jnp.where(partial, split + 1, split)),
            jnp.where(whole, cum_next, cum), splits,
            jnp.where(whole, left - rest - fixed, 0), ~whole)

  def part(i, carry):
    req, tile, split, cum, splits, meta = carry
    begin_req, begin_tile, begin_split = req, tile, split
    req, tile, split, cum, splits, _, _ = lax.while_loop(
        lambda s: (s[0] < b) & ~s[6], take, (req, tile, split, cum, splits, payload, zero != 0))
    end_req = jnp.where(tile > 0, req, req - 1)
    end_tile = jnp.where(tile > 0, tile, tiles[jnp.clip(req - 1, 0, b - 1)])
    first_split = begin_tile != 0
    last_split = end_tile != tiles[jnp.clip(end_req, 0, b - 1)]
    one_req = begin_req == end_req
    first_split, last_split = (jnp.where(one_req, first_split | last_split, first_split),
                               jnp.where(one_req, first_split | last_split, last_split))
    row = jnp.stack([begin_req, end_req, begin_tile, end_tile, begin_split,
                     first_split.astype(jnp.int32), last_split.astype(jnp.int32), zero])
    return req, tile, split, cum, splits, meta.at[i].set(row)

  init = (zero, zero, zero, zero, jnp.zeros((b + 1,), jnp.int32) + zero,
          jnp.zeros((parts, METADATA_WIDTH), jnp.int32) + zero)
  *_, splits, meta = lax.fori_loop(0, parts, part, init)
  return MLAMetadata(meta, splits)


def get_mla_metadata(cache_seqlens: jax.Array, num_q_tokens_per_head_k: int, num_heads_k: int,
                     *, num_sms: int | None = None) -> MLAMetadata:
  """FlashMLA's split-KV schedule for a decode step, computed on device.

  Runs inside ``jit`` (``lax`` loops over parts and requests, no host
  transfer); compute it once per step and pass it to every layer's
  :func:`jaxinfra.mla.mla_decode`.

  Args:
    cache_seqlens: int32 ``[b]``. Negative lengths count as 0.
    num_q_tokens_per_head_k: ``s_q * h_q // h_kv``.
    num_heads_k: ``h_kv``.
    num_sms: SMs to schedule for; default: the CUDA device's count, or 132.

  Returns:
    :class:`MLAMetadata` with ``tile_scheduler_metadata`` int32
    ``[num_sm_parts, 8]`` and ``num_splits`` int32 ``[b + 1]``, where
    ``num_sm_parts = num_sm_parts(num_q_tokens_per_head_k, num_heads_k, num_sms)``.
  """
  cache_seqlens = jnp.asarray(cache_seqlens)
  if cache_seqlens.dtype != jnp.int32 or cache_seqlens.ndim != 1 or cache_seqlens.shape[0] == 0:
    raise ValueError(f"get_mla_metadata: cache_seqlens must be int32 [b >= 1], got "
                     f"{cache_seqlens.dtype} with shape {cache_seqlens.shape}")
  parts = num_sm_parts(num_q_tokens_per_head_k, num_heads_k, num_sms)
  return _schedule(num_tiles(cache_seqlens), parts)


def split_of_tile(metadata: MLAMetadata, tiles: jax.Array, max_tiles: int) -> jax.Array:
  """Which split of its request each tile belongs to, int32 ``[b, max_tiles]``.

  Split ``k > 0`` of request ``r`` starts where a part begins inside ``r``
  (``begin_req == r``, ``begin_tile > 0``, ``begin_split_idx == k``); a
  tile's split is the largest such ``k`` at or before it (idle parts repeat
  their successor's start and change nothing). Tiles past ``tiles[r]`` get -1.
  """
  meta = metadata.tile_scheduler_metadata
  b = tiles.shape[0]
  tile_idx = jnp.arange(max_tiles, dtype=jnp.int32)
  starts_here = ((meta[None, None, :, 0] == jnp.arange(b, dtype=jnp.int32)[:, None, None])
                 & (meta[None, None, :, 2] <= tile_idx[None, :, None]))
  split = jnp.max(jnp.where(starts_here, meta[None, None, :, 4], 0), axis=-1)
  return jnp.where(tile_idx[None, :] < tiles[:, None], split, -1)


def split_kv_reference(q: jax.Array, kv_cache: jax.Array, block_table: jax.Array,
                       cache_seqlens: jax.Array, metadata: MLAMetadata, *,
                       softmax_scale: float, causal: bool = False,
                       kv_format: str = "bf16") -> tuple[jax.Array, ...]:
  """Decode executed the way the split-KV kernels execute it, in pure JAX.

  1. Per 64-key tile: a masked softmax partial (lse, normalized output).
  2. Per split (the tiles one SM part computes for one request): the tile
     partials merged by :func:`merge_partials`; a request with several splits
     stores them at workspace slots ``num_splits[r] + k``.
  3. Combine: each request's split partials merged again.

  Same arguments and conventions as :func:`jaxinfra.mla.mla_decode`, plus
  ``metadata`` from :func:`get_mla_metadata` for the sanitized lengths (bad
  requests count as length 0). Memory is ``O(b * s_q * h_q * tiles * 512)``;
  this is a reference for tests, not a fast path.

  Returns:
    ``(out, lse, o_accum, lse_accum)``: ``out [b, s_q, h_q, 512]`` in q's
    dtype and ``lse [b, h_q, s_q]`` as from ``mla_decode``; ``o_accum
    [b + num_sm_parts, h_kv, s_q * h_q / h_kv, 512]`` and ``lse_accum
    [b + num_sm_parts, h_kv, s_q * h_q / h_kv]`` float32 hold the normalized
    partial outputs and natural-log partial lse of split requests (slots of
    unsplit requests and unused slots are 0).
  """
  op = "split_kv_reference"
  dims, (q, kv_cache, block_table, cache_seqlens) = _core.check_decode(
      op, q, kv_cache, block_table, cache_seqlens, kv_format=kv_format, head_dim_v=_core.V_DIM)
  meta, splits = metadata
  parts = meta.shape[0]
  if meta.shape != (parts, METADATA_WIDTH) or splits.shape != (dims.batch + 1,):
    raise ValueError(f"{op}: metadata must be ([num_sm_parts, 8], [b + 1]), got "
                     f"{meta.shape} and {splits.shape}")
  lengths, bad = _core.sanitize(dims, block_table, cache_seqlens)
  tokens = _core.gather_tokens(dims, kv_cache, block_table, lengths, kv_format, q.dtype)
  n_tiles = -(-dims.capacity // TILE)
  pad = n_tiles * TILE - dims.capacity
  tokens = jnp.pad(tokens, ((0, 0), (0, pad), (0, 0), (0, 0)))
  keys = jnp.arange(n_tiles * TILE, dtype=jnp.int32)
  visible = keys[None, None, :] < _core.row_lengths(lengths, dims.s_q, causal)[:, :, None]
  scores = _core.grouped_scores(q, tokens, visible, softmax_scale)       # [b, s, g, j, t]
  scores = scores.reshape(*scores.shape[:-1], n_tiles, TILE)
  values = tokens[..., :_core.V_DIM].reshape(dims.batch, n_tiles, TILE, dims.h_kv, _core.V_DIM)
  # 1. tile partials: [b, s, g, j, tiles] and [b, s, g, j, tiles, 512]
  tile_lse, tile_out = _core.softmax_partial(scores, values, "bsgjnk,bnkgc->bsgjnc")
  # 2. tiles -> splits
  tiles = num_tiles(lengths)
  split = split_of_tile(metadata, tiles, n_tiles)                         # [b, tiles]
  groups = split[:, :, None] == jnp.arange(parts, dtype=jnp.int32)        # [b, tiles, parts]
  groups = jnp.broadcast_to(groups[:, None, None, None], (*tile_lse.shape, parts))
  split_lse, split_out = _core.merge_partials(tile_lse, tile_out, groups)  # [..., parts(, 512)]
  # 3. combine
  lse, out = _core.merge_partials(split_lse, split_out)
  out, lse_final = _core.finalize(dims, lse, out, bad, q.dtype)
  o_accum, lse_accum = _workspace(dims, parts, splits, split_lse, split_out)
  return out, lse_final, o_accum, lse_accum


def _workspace(dims: _core.DecodeDims, parts: int, splits: jax.Array, split_lse: jax.Array,
               split_out: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Scatters split partials of split requests to slots ``num_splits[r] + k``."""
  b, rows = dims.batch, dims.rows_per_kv
  n_split = splits[1:] - splits[:-1]
  k = jnp.arange(parts, dtype=jnp.int32)
  slot = jnp.where((n_split[:, None] > 1) & (k[None, :] < n_split[:, None]),
                   splits[:-1, None] + k[None, :], b + parts)             # out of range: dropped
  # [b, s, g, j, parts] -> [b, parts, g, s * j]
  lse = jnp.transpose(split_lse, (0, 4, 2, 1, 3)).reshape(b, parts, dims.h_kv, rows)
  out = jnp.transpose(split_out, (0, 4, 2, 1, 3, 5)).reshape(b, parts, dims.h_kv, rows, -1)
  o_accum = jnp.zeros((b + parts, dims.h_kv, rows, _core.V_DIM), jnp.float32)
  lse_accum = jnp.zeros((b + parts, dims.h_kv, rows), jnp.float32)
  return (o_accum.at[slot].set(out, mode="drop"), lse_accum.at[slot].set(lse, mode="drop"))


# Re-exported: the combine step of the split-KV kernels.
merge_partials = _core.merge_partials

__all__ = ["MLAMetadata", "get_mla_metadata", "num_sm_parts", "num_tiles", "split_of_tile",
           "split_kv_reference", "merge_partials", "default_num_sms", "TILE",
           "FIXED_OVERHEAD_TILES"]
