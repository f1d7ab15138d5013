"""Shared pieces of the MLA decode paths: argument checks, input sanitizing,
page gathering and the masked-softmax partials that every reference uses."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra.mla import kv_fp8

QK_DIM = kv_fp8.QK_DIM        # 576 = 512 latent + 64 RoPE
V_DIM = kv_fp8.NOPE_DIM       # 512: V is the first 512 channels of the same rows
DENSE_PAGE_SIZE = 64          # FlashMLA's only page size for the unquantized cache
KV_FORMATS = ("bf16", "fp8")
Q_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class DecodeDims:
  """Static sizes of a decode call."""
  batch: int
  s_q: int
  h_q: int
  h_kv: int
  num_blocks: int
  page_size: int
  max_blocks: int

  @property
  def heads_per_kv(self) -> int:
    return self.h_q // self.h_kv

  @property
  def rows_per_kv(self) -> int:
    """Query rows per KV head: FlashMLA's ``q_seq_per_hk = s_q * h_q / h_kv``."""
    return self.s_q * self.heads_per_kv

  @property
  def capacity(self) -> int:
    """Tokens a block-table row can address."""
    return self.max_blocks * self.page_size


def _fail(op: str, what: str, x) -> None:
  raise ValueError(f"{op}: {what}, got {x.dtype} with shape {x.shape}")


def check_query(op: str, q) -> jax.Array:
  q = jnp.asarray(q)
  if q.ndim != 4 or q.shape[-1] != QK_DIM or 0 in q.shape:
    _fail(op, f"q must be [b, s_q, h_q, {QK_DIM}] with b, s_q, h_q >= 1", q)
  if q.dtype not in Q_DTYPES:
    _fail(op, "q must be bfloat16 (or float32)", q)
  return q


def check_cache(op: str, kv_cache, q: jax.Array, kv_format: str) -> jax.Array:
  """Checks a paged cache: ``[num_blocks, 64, h_kv, 576]`` in q's dtype, or
  ``[num_blocks, page, 1, 656]`` uint8 for ``kv_format="fp8"``."""
  if kv_format not in KV_FORMATS:
    raise ValueError(f"{op}: kv_format must be one of {KV_FORMATS}, got {kv_format!r}")
  kv_cache = jnp.asarray(kv_cache)
  if kv_format == "fp8":
    if (kv_cache.dtype != jnp.uint8 or kv_cache.ndim != 4 or kv_cache.shape[2] != 1
        or kv_cache.shape[3] != kv_fp8.BYTES_PER_TOKEN or 0 in kv_cache.shape):
      _fail(op, f"kv_cache must be uint8 [num_blocks, page, 1, {kv_fp8.BYTES_PER_TOKEN}] for "
                f"kv_format='fp8'", kv_cache)
    return kv_cache
  if kv_cache.ndim != 4 or kv_cache.shape[3] != QK_DIM or 0 in kv_cache.shape:
    _fail(op, f"kv_cache must be [num_blocks, {DENSE_PAGE_SIZE}, h_kv, {QK_DIM}]", kv_cache)
  if kv_cache.shape[1] != DENSE_PAGE_SIZE:
    _fail(op, f"kv_cache page size (dimension 1) must be {DENSE_PAGE_SIZE} for the bf16 cache",
          kv_cache)
  if kv_cache.dtype != q.dtype:
    _fail(op, f"kv_cache must have q's dtype {q.dtype}", kv_cache)
  if q.shape[2] % kv_cache.shape[2]:
    raise ValueError(f"{op}: h_q % h_kv must be 0, got q shape {q.shape} and kv_cache shape "
                     f"{kv_cache.shape}")
  return kv_cache


def check_decode(op: str, q, kv_cache, block_table, cache_seqlens, *, kv_format: str,
                 head_dim_v: int) -> tuple[DecodeDims, tuple[jax.Array, ...]]:
  """Validates a paged decode call's static facts; returns its sizes and arrays."""
  if head_dim_v != V_DIM:
    raise ValueError(f"{op}: head_dim_v must be {V_DIM}, got {head_dim_v}")
  q = check_query(op, q)
  kv_cache = check_cache(op, kv_cache, q, kv_format)
  block_table, cache_seqlens = jnp.asarray(block_table), jnp.asarray(cache_seqlens)
  b = q.shape[0]
  if (block_table.dtype != jnp.int32 or block_table.ndim != 2 or block_table.shape[0] != b
      or block_table.shape[1] == 0):
    _fail(op, f"block_table must be int32 [b={b}, max_blocks >= 1]", block_table)
  if cache_seqlens.dtype != jnp.int32 or cache_seqlens.shape != (b,):
    _fail(op, f"cache_seqlens must be int32 [b={b}]", cache_seqlens)
  dims = DecodeDims(batch=b, s_q=q.shape[1], h_q=q.shape[2], h_kv=kv_cache.shape[2],
                    num_blocks=kv_cache.shape[0], page_size=kv_cache.shape[1],
                    max_blocks=block_table.shape[1])
  if dims.capacity > _INT32_MAX or dims.num_blocks * dims.page_size > _INT32_MAX:
    raise ValueError(f"{op}: token indices must fit int32; block_table shape {block_table.shape} "
                     f"and kv_cache shape {kv_cache.shape} address more")
  return dims, (q, kv_cache, block_table, cache_seqlens)


def ceil_div(a: jax.Array, b: int) -> jax.Array:
  """Overflow-free ``ceil(a / b)`` for int32 ``a >= 0``."""
  return a // b + (a % b != 0).astype(a.dtype)


def sanitize(dims: DecodeDims, block_table: jax.Array,
             cache_seqlens: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Finds requests whose lengths or pages are out of range.

  A request is *bad* when its length is negative or exceeds the block table's
  capacity (``max_blocks * page``), or when one of the pages holding its first
  ``seqlen`` tokens (block-table slots ``< ceil(seqlen / page)``) is not in
  ``[0, num_blocks)``. Slots past that are unused and may hold anything.

  Returns:
    ``(seqlens, bad)``: int32 ``[b]`` lengths with bad requests set to 0, and
    bool ``[b]``. Decode gives bad requests NaN outputs and NaN lse.
  """
  bad = (cache_seqlens < 0) | (cache_seqlens > dims.capacity)
  lengths = jnp.where(bad, 0, cache_seqlens)
  used = jnp.arange(dims.max_blocks, dtype=jnp.int32) < ceil_div(lengths, dims.page_size)[:, None]
  out_of_range = (block_table < 0) | (block_table >= dims.num_blocks)
  bad = bad | jnp.any(used & out_of_range, axis=1)
  return jnp.where(bad, 0, cache_seqlens), bad


def gather_tokens(dims: DecodeDims, kv_cache: jax.Array, block_table: jax.Array,
                  lengths: jax.Array, kv_format: str, dtype) -> jax.Array:
  """Each request's tokens in order: ``[b, max_blocks * page, h_kv, 576]`` in ``dtype``
  (q's dtype; FP8 records dequantize exactly into bfloat16 and float32).

  Pages come from clipped block-table entries; every slot at or past a
  request's (sanitized) length is replaced by 0 with ``where``, so whatever
  those slots hold (NaN poison, another request's data) cannot reach a result.
  """
  pages = kv_cache[jnp.clip(block_table, 0, dims.num_blocks - 1)]
  tokens = pages.reshape(dims.batch, dims.capacity, dims.h_kv, -1)
  if kv_format == "fp8":
    tokens = kv_fp8.dequantize_kv_fp8(tokens, out_dtype=dtype)
  live = jnp.arange(dims.capacity, dtype=jnp.int32)[None, :] < lengths[:, None]
  return jnp.where(live[:, :, None, None], tokens.astype(dtype), 0)


def row_lengths(lengths: jax.Array, s_q: int, causal: bool) -> jax.Array:
  """Keys visible to each query token, ``[b, s_q]``.

  Causal masking is bottom-right aligned (multi-token prediction): query
  ``i`` of ``s_q`` sees the first ``seqlen - (s_q - 1 - i)`` keys.
  """
  if not causal or s_q == 1:
    return jnp.broadcast_to(lengths[:, None], (lengths.shape[0], s_q))
  behind = (s_q - 1 - jnp.arange(s_q, dtype=jnp.int32))[None, :]
  return jnp.maximum(lengths[:, None] - behind, 0)


def grouped_scores(q: jax.Array, tokens: jax.Array, visible: jax.Array,
                   softmax_scale: float) -> jax.Array:
  """Scaled scores, ``-inf`` where not visible.

  Args:
    q: ``[b, s_q, h_q, 576]``.
    tokens: ``[b, t, h_kv, 576]`` in q's dtype (products are exact in float32,
      sums are float32).
    visible: bool ``[b, s_q, t]``.

  Returns:
    float32 ``[b, s_q, h_kv, h_q / h_kv, t]`` (FlashMLA's row order: query
    token major, head within the KV group minor).
  """
  b, s_q, h_q, d = q.shape
  h_kv = tokens.shape[2]
  qg = q.reshape(b, s_q, h_kv, h_q // h_kv, d)
  scores = jnp.einsum("bsgjd,btgd->bsgjt", qg, tokens, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
  scores = scores * np.float32(softmax_scale)
  return jnp.where(visible[:, :, None, None, :], scores, -jnp.inf)


def softmax_partial(scores: jax.Array, values: jax.Array,
                    subscripts: str) -> tuple[jax.Array, jax.Array]:
  """Softmax over the last axis of ``scores`` and the weighted sum of ``values``.

  Args:
    scores: float32, ``-inf`` for masked keys.
    values: contracted (in float32) with the softmax by ``subscripts``.
    subscripts: ``einsum`` spec ``"scores,values->out"``.

  Returns:
    ``(lse, out)``: natural-log sum of exps (``-inf`` when every key is
    masked) and the normalized output (0 then).
  """
  top = jnp.max(scores, axis=-1)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  p = jnp.exp(scores - top[..., None])
  total = jnp.sum(p, axis=-1)
  out = jnp.einsum(subscripts, p, values.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  live = total > 0
  lse = jnp.where(live, top + jnp.log(jnp.where(live, total, 1.0)), -jnp.inf)
  return lse, out / jnp.where(live, total, 1.0)[..., None]


def merge_partials(lse: jax.Array, out: jax.Array,
                   groups: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The split-KV combine: merges partial softmaxes by their log-sum-exps.

  ``lse_merged = log(sum_i exp(lse_i))`` and
  ``out_merged = sum_i exp(lse_i - lse_merged) * out_i``; a partial with
  ``lse = -inf`` (no keys) contributes nothing, and a group with no keys at all
  gets ``lse = -inf`` and output 0.

  Args:
    lse: ``[..., n]`` float32 partial log-sum-exps.
    out: ``[..., n, d]`` float32 normalized partial outputs.
    groups: optional bool ``[..., n, k]``: partial ``i`` belongs to group
      ``j``. Without it all ``n`` partials merge into one.

  Returns:
    ``(lse [..., k], out [..., k, d])``, or ``(lse [...], out [..., d])``
    without ``groups``.
  """
  lse, out = jnp.asarray(lse), jnp.asarray(out)
  if out.shape[:-1] != lse.shape or (groups is not None and jnp.shape(groups)[:-1] != lse.shape):
    raise ValueError(f"merge_partials: need lse [..., n], out [..., n, d] and groups "
                     f"[..., n, k]; got shapes {lse.shape}, {out.shape} and "
                     f"{None if groups is None else jnp.shape(groups)}")
  if groups is None:
    merged = merge_partials(lse, out, jnp.ones((*lse.shape, 1), bool))
    return merged[0][..., 0], merged[1][..., 0, :]
  member = jnp.where(groups, lse[..., None], -jnp.inf)              # [..., n, k]
  top = jnp.max(member, axis=-2)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(member - top[..., None, :])                     # 0 outside a group
  total = jnp.sum(weights, axis=-2)
  live = total > 0
  merged_lse = jnp.where(live, top + jnp.log(jnp.where(live, total, 1.0)), -jnp.inf)
  merged = jnp.einsum("...nk,...nd->...kd", weights, out, precision=jax.lax.Precision.HIGHEST)
  return merged_lse, merged / jnp.where(live, total, 1.0)[..., None]


def finalize(dims: DecodeDims, lse: jax.Array, out: jax.Array, bad: jax.Array,
             out_dtype) -> tuple[jax.Array, jax.Array]:
  """Grouped ``lse [b, s_q, h_kv, j]``, ``out [b, s_q, h_kv, j, 512]`` ->
  FlashMLA's ``out [b, s_q, h_q, 512]`` (out_dtype) and ``lse [b, h_q, s_q]``:
  empty rows get lse ``+inf``, bad requests NaN in both."""
  b, s_q, h_q = dims.batch, dims.s_q, dims.h_q
  lse = jnp.where(lse == -jnp.inf, jnp.inf, lse).reshape(b, s_q, h_q)
  out = out.reshape(b, s_q, h_q, V_DIM)
  lse = jnp.where(bad[:, None, None], jnp.nan, lse)
  out = jnp.where(bad[:, None, None, None], jnp.nan, out)
  return out.astype(out_dtype), jnp.transpose(lse, (0, 2, 1))
