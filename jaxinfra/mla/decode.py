"""MLA decode over a paged latent cache: FlashMLA's ``flash_mla_with_kvcache``.

Absorbed MLA is multi-query attention with one 576-wide KV head per KV group:
scores ``q . k`` over all 576 channels, values the first 512 channels of the
same cache rows. See ``jaxinfra.mla`` for the conventions shared by all ops.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra import _custom_call
from jaxinfra.mla import _core
from jaxinfra.mla import kv_fp8
from jaxinfra.mla import schedule

MLA_DECODE = _custom_call.define("mla_decode", verified=("cpu",))

_NOT_DIFFERENTIABLE_HINT = (
    "mla_decode and mla_decode_sparse are inference ops; train with mla_prefill (the expanded "
    "form) or jax.lax.stop_gradient their inputs.")


# --- the pure-JAX path ---------------------------------------------------------------------------


def _decode_xla(dims: _core.DecodeDims, q, kv_cache, block_table, lengths, *,
                softmax_scale: float, causal: bool, kv_format: str):
  """Single-pass masked softmax over each request's gathered pages (float32)."""
  tokens = _core.gather_tokens(dims, kv_cache, block_table, lengths, kv_format, q.dtype)
  keys = jnp.arange(dims.capacity, dtype=jnp.int32)
  visible = keys[None, None, :] < _core.row_lengths(lengths, dims.s_q, causal)[:, :, None]
  scores = _core.grouped_scores(q, tokens, visible, softmax_scale)
  return _core.softmax_partial(scores, tokens[..., :_core.V_DIM], "bsgjt,btgc->bsgjc")


# --- the custom call ---------------------------------------------------------------------------


def _decode_ffi(dims: _core.DecodeDims, q, kv_cache, block_table, lengths, tile_metadata,
                num_splits, *, softmax_scale: float, causal: bool):
  """``jaxinfra_mla_decode``; see ffi/mla.cc for the contract."""
  parts, rows = tile_metadata.shape[0], dims.rows_per_kv
  results = (
      jax.ShapeDtypeStruct((dims.batch, dims.s_q, dims.h_q, _core.V_DIM), q.dtype),
      jax.ShapeDtypeStruct((dims.batch, dims.h_q, dims.s_q), jnp.float32),
      jax.ShapeDtypeStruct((dims.batch + parts, dims.h_kv, rows, _core.V_DIM), jnp.float32),
      jax.ShapeDtypeStruct((dims.batch + parts, dims.h_kv, rows), jnp.float32),
  )
  out, lse, _, _ = jax.ffi.ffi_call(MLA_DECODE.target, results, vmap_method="sequential")(
      q, kv_cache, block_table, lengths, tile_metadata, num_splits,
      softmax_scale=np.float32(softmax_scale), causal=bool(causal))
  return out, lse


# --- public API ----------------------------------------------------------------------------------


def mla_decode(q: jax.Array, kv_cache: jax.Array, block_table: jax.Array,
               cache_seqlens: jax.Array, *, softmax_scale: float, causal: bool = False,
               head_dim_v: int = 512, kv_format: str = "bf16",
               metadata: schedule.MLAMetadata | None = None, num_sms: int | None = None,
               impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """MLA decode attention over a paged latent cache (FlashMLA's dense decode).

  For request ``r``, query token ``i`` and head ``h`` (KV head
  ``g = h // (h_q / h_kv)``), with keys ``k_t = cache row t`` of ``r``::

    out[r, i, h] = sum_t softmax_t(softmax_scale * q[r, i, h] . k_t) * k_t[:512]
    lse[r, h, i] = log sum_t exp(softmax_scale * q[r, i, h] . k_t)

  Args:
    q: ``[b, s_q, h_q, 576]`` bfloat16 (float32 also accepted: the CPU custom
      call and the ``xla`` path compute in float32 either way): absorbed
      queries ``[W_UK^T q_nope ; rope(q_pe)]``.
    kv_cache: ``[num_blocks, 64, h_kv, 576]`` in q's dtype (page size 64;
      V is the first 512 channels of the same rows), or with
      ``kv_format="fp8"`` uint8 ``[num_blocks, page, 1, 656]`` records from
      :func:`jaxinfra.mla.quantize_kv_fp8` (any page size).
    block_table: int32 ``[b, max_blocks]``: request ``r``'s token ``t`` is row
      ``t % page`` of page ``block_table[r, t // page]``.
    cache_seqlens: int32 ``[b]``: tokens per request.
    softmax_scale: required. DeepSeek uses the *unabsorbed* head width:
      ``1/sqrt(192) * mscale**2`` with YaRN's ``mscale = 0.1 * ln(40) + 1``
      (``jaxinfra.rope.softmax_scale(192, cfg)``), not FlashMLA's default
      ``1/sqrt(576)``.
    causal: with ``s_q > 1`` (multi-token prediction), bottom-right aligned:
      query ``i`` sees the first ``seqlen - (s_q - 1 - i)`` keys. Ignored for
      ``s_q == 1``.
    head_dim_v: must be 512.
    kv_format: ``"bf16"`` (unquantized, q's dtype) or ``"fp8"``.
    metadata: the step's :func:`jaxinfra.mla.get_mla_metadata` for these
      ``cache_seqlens`` and ``(s_q * h_q // h_kv, h_kv)``; computed here when
      omitted. The custom call checks it against the lengths and raises on a
      mismatch; the ``xla`` path does not split and ignores it.
    num_sms: SM count for the schedule when ``metadata`` is omitted.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    ``(out, lse)``: ``out [b, s_q, h_q, 512]`` in q's dtype and ``lse
    [b, h_q, s_q]`` float32, natural log. A query row with no visible key
    (``seqlen == 0``, or a causal row before the first key) gets out 0 and lse
    ``+inf``.

  Data-dependent input: only the pages holding a request's first ``seqlen``
  tokens are read (slots past that, and entries of those pages past
  ``seqlen``, never affect the result: NaN there is harmless). A request whose
  ``seqlen`` is negative or exceeds ``max_blocks * page``, or one of whose
  needed block ids is outside ``[0, num_blocks)``, gets NaN ``out`` and NaN
  ``lse``; other requests are unaffected and nothing is read out of bounds.

  Not differentiable (raises ``TypeError`` under ``jax.grad``).
  """
  op = "mla_decode"
  dims, (q, kv_cache, block_table, cache_seqlens) = _core.check_decode(
      op, q, kv_cache, block_table, cache_seqlens, kv_format=kv_format, head_dim_v=head_dim_v)
  # Bad requests are cut to length 0 before either implementation sees them
  # (so a kernel never receives an out-of-range page) and poisoned after.
  lengths, bad = _core.sanitize(dims, block_table, cache_seqlens)
  args = (q, kv_cache, block_table, lengths)
  if impl != "xla" and not _custom_call.is_disabled(MLA_DECODE):
    args += _check_metadata(op, dims, metadata, lengths, num_sms)
  scale, causal = float(softmax_scale), bool(causal) and dims.s_q > 1

  def xla(q, kv_cache, block_table, lengths, *unused_metadata):
    lse, out = _decode_xla(dims, q, kv_cache, block_table, lengths, softmax_scale=scale,
                           causal=causal, kv_format=kv_format)
    return _core.finalize(dims, lse, out, jnp.zeros((dims.batch,), bool), q.dtype)

  def ffi(q, kv_cache, block_table, lengths, tile_metadata, num_splits):
    return _decode_ffi(dims, q, kv_cache, block_table, lengths, tile_metadata, num_splits,
                       softmax_scale=scale, causal=causal)

  fn = _custom_call.select(MLA_DECODE, impl, ffi=ffi, xla=xla)
  out, lse = _custom_call.non_differentiable(fn, op, _NOT_DIFFERENTIABLE_HINT)(*args)
  out = jnp.where(bad[:, None, None, None], jnp.nan, out).astype(q.dtype)
  return out, jnp.where(bad[:, None, None], jnp.nan, lse)


def _check_metadata(op: str, dims: _core.DecodeDims, metadata, lengths,
                    num_sms) -> tuple[jax.Array, jax.Array]:
  if metadata is None:
    return tuple(schedule.get_mla_metadata(lengths, dims.rows_per_kv, dims.h_kv, num_sms=num_sms))
  tile_metadata, num_splits = (jnp.asarray(m) for m in metadata)
  if (tile_metadata.dtype != jnp.int32 or tile_metadata.ndim != 2
      or tile_metadata.shape[1] != schedule.METADATA_WIDTH or tile_metadata.shape[0] == 0):
    raise ValueError(f"{op}: metadata.tile_scheduler_metadata must be int32 [num_sm_parts, "
                     f"{schedule.METADATA_WIDTH}], got {tile_metadata.dtype} with shape "
                     f"{tile_metadata.shape}")
  if num_splits.dtype != jnp.int32 or num_splits.shape != (dims.batch + 1,):
    raise ValueError(f"{op}: metadata.num_splits must be int32 [b + 1 = {dims.batch + 1}], got "
                     f"{num_splits.dtype} with shape {num_splits.shape}")
  return tile_metadata, num_splits


def mla_decode_sparse(q: jax.Array, kv_cache: jax.Array, indices: jax.Array, *,
                      softmax_scale: float, topk_length: jax.Array | None = None,
                      attn_sink: jax.Array | None = None,
                      head_dim_v: int = 512) -> tuple[jax.Array, jax.Array]:
  """Token-sparse decode over the FP8 cache (DeepSeek-V3.2 sparse attention).

  Each query token attends to its own ``topk`` cache tokens, named by global
  index ``block * page + offset`` (no block table).

  Args:
    q: ``[b, s_q, h_q, 576]`` bfloat16 (or float32).
    kv_cache: uint8 ``[num_blocks, page, 1, 656]`` (any page size).
    indices: int32 ``[b, s_q, topk]``. ``-1`` marks an unused entry; so does
      any index outside ``[0, num_blocks * page)`` (never read). Repeated
      indices are attended as often as they appear.
    softmax_scale: required (see :func:`mla_decode`).
    topk_length: optional int32 ``[b]``: only the first ``topk_length[r]``
      indices of request ``r``'s rows are used (values outside ``[0, topk]``
      act as clipped to it).
    attn_sink: optional float32 ``[h_q]``: FlashMLA's attention sink. The
      output is scaled by ``exp(lse) / (exp(lse) + exp(sink))`` and ``lse``
      is returned unchanged; ``sink = +inf`` gives out 0, ``-inf`` no change.
    head_dim_v: must be 512.

  Returns:
    ``(out [b, s_q, h_q, 512]`` in q's dtype, ``lse [b, h_q, s_q]`` float32):
    a row with no valid index gets out 0 and lse ``+inf``.

  Pure JAX (there is no custom call yet); not differentiable.
  """
  op = "mla_decode_sparse"
  if head_dim_v != _core.V_DIM:
    raise ValueError(f"{op}: head_dim_v must be {_core.V_DIM}, got {head_dim_v}")
  q = _core.check_query(op, q)
  kv_cache = _core.check_cache(op, kv_cache, q, "fp8")
  b, s_q, h_q, _ = q.shape
  indices = jnp.asarray(indices)
  if indices.dtype != jnp.int32 or indices.ndim != 3 or indices.shape[:2] != (b, s_q):
    raise ValueError(f"{op}: indices must be int32 [b={b}, s_q={s_q}, topk], got "
                     f"{indices.dtype} with shape {indices.shape}")
  topk = indices.shape[2]
  valid = (indices >= 0) & (indices < kv_cache.shape[0] * kv_cache.shape[1])
  if topk_length is not None:
    topk_length = jnp.asarray(topk_length)
    if topk_length.dtype != jnp.int32 or topk_length.shape != (b,):
      raise ValueError(f"{op}: topk_length must be int32 [b={b}], got {topk_length.dtype} with "
                       f"shape {topk_length.shape}")
    valid = valid & (jnp.arange(topk, dtype=jnp.int32) < topk_length[:, None, None])
  if attn_sink is None:
    attn_sink = jnp.full((h_q,), -jnp.inf, jnp.float32)  # exactly no effect
  attn_sink = jnp.asarray(attn_sink)
  if attn_sink.dtype != jnp.float32 or attn_sink.shape != (h_q,):
    raise ValueError(f"{op}: attn_sink must be float32 [h_q={h_q}], got {attn_sink.dtype} "
                     f"with shape {attn_sink.shape}")
  scale = float(softmax_scale)

  def sparse(q, kv_cache, indices, valid, attn_sink):
    flat = kv_cache.reshape(-1, kv_fp8.BYTES_PER_TOKEN)
    picked = flat[jnp.clip(indices, 0, flat.shape[0] - 1)]                  # [b, s, k, 656]
    tokens = jnp.where(valid[..., None], kv_fp8.dequantize_kv_fp8(picked, q.dtype), 0)
    scores = jnp.einsum("bshd,bskd->bshk", q, tokens, precision=jax.lax.Precision.HIGHEST,
                        preferred_element_type=jnp.float32) * np.float32(scale)
    scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
    lse, out = _core.softmax_partial(scores, tokens[..., :_core.V_DIM], "bshk,bskc->bshc")
    # exp(lse) / (exp(lse) + exp(sink)) = sigmoid(lse - sink); empty rows stay 0.
    keep = jnp.where(lse == -jnp.inf, 0.0, jax.nn.sigmoid(lse - attn_sink[None, None, :]))
    out = out * keep[..., None]
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    return out.astype(q.dtype), jnp.transpose(lse, (0, 2, 1))

  fn = _custom_call.non_differentiable(sparse, op, _NOT_DIFFERENTIABLE_HINT)
  return fn(q, kv_cache, indices, valid, attn_sink)
