"""MLA prefill/training attention in the expanded form (FlashMLA's
``flash_attn_varlen_func`` with head dims 192/128).

In training and prefill every head has its own key ``[W_UK c_t ; k^R_t]`` (192
channels: 128 NoPE + 64 RoPE) and value ``W_UV c_t`` (128 channels); that is
ordinary multi-head attention with ``d_qk != d_v``, computed here with
``jax.nn.dot_product_attention`` (values zero-padded to the query width, which
it requires, and the padding sliced off). ``jax.nn.dot_product_attention``
computes logits in float32, so float64 inputs (for gradient checks and
references) take a plain float64 softmax instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _segments_from_cu_seqlens(cu_seqlens: jax.Array, total: int) -> jax.Array:
  """Packed-token segment ids: token ``i`` belongs to sequence ``n`` when
  ``cu_seqlens[n] <= i < cu_seqlens[n + 1]``; tokens past ``cu_seqlens[-1]``
  get -1 (padding)."""
  tokens = jnp.arange(total, dtype=jnp.int32)
  seg = jnp.sum(tokens[:, None] >= cu_seqlens[None, 1:], axis=1).astype(jnp.int32)
  return jnp.where(tokens < cu_seqlens[-1], seg, -1)


def _attention_float64(q, k, v, mask, scale: float, causal: bool) -> jax.Array:
  """Softmax attention computed in float64 (GQA by head groups)."""
  b, s_q, h_q, _ = q.shape
  s_k, h_kv = k.shape[1], k.shape[2]
  qg = q.reshape(b, s_q, h_kv, h_q // h_kv, -1)
  logits = jnp.einsum("btgjd,bsgd->bgjts", qg, k) * scale
  visible = jnp.ones((b, 1, 1, s_q, s_k), bool)
  if mask is not None:
    visible = visible & mask[:, :, None]
  if causal:
    visible = visible & jnp.tril(jnp.ones((s_q, s_k), bool))
  probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1, where=visible)
  out = jnp.einsum("bgjts,bsgd->btgjd", jnp.where(visible, probs, 0), v)
  return out.reshape(b, s_q, h_q, -1)


def _check(op: str, q, k, v) -> tuple[jax.Array, jax.Array, jax.Array]:
  q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"{op}: q, k, v must be [b, s, heads, dim]; got shapes {q.shape}, "
                     f"{k.shape}, {v.shape}")
  b, _, h_q, d_qk = q.shape
  if k.shape[0] != b or k.shape[3] != d_qk:
    raise ValueError(f"{op}: k must be [b={b}, s_k, h_kv, d_qk={d_qk}], got shape {k.shape}")
  if v.shape[:3] != k.shape[:3] or v.shape[3] > d_qk:
    raise ValueError(f"{op}: v must be [b, s_k, h_kv, d_v <= d_qk] matching k {k.shape}, got "
                     f"shape {v.shape}")
  if h_q % k.shape[2]:
    raise ValueError(f"{op}: h_q % h_kv must be 0, got q shape {q.shape} and k shape {k.shape}")
  if not (q.dtype == k.dtype == v.dtype) or not jnp.issubdtype(q.dtype, jnp.floating):
    raise ValueError(f"{op}: q, k, v must share a float dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  return q, k, v


def _check_segment_ids(op: str, segment_ids, q: jax.Array, k: jax.Array):
  if isinstance(segment_ids, (tuple, list)):
    q_seg, kv_seg = (jnp.asarray(s) for s in segment_ids)
  else:
    q_seg = kv_seg = jnp.asarray(segment_ids)
  for name, seg, x in (("q segment ids", q_seg, q), ("kv segment ids", kv_seg, k)):
    if seg.dtype != jnp.int32 or seg.shape != x.shape[:2]:
      raise ValueError(f"{op}: {name} must be int32 {x.shape[:2]}, got {seg.dtype} with shape "
                       f"{seg.shape}")
  return q_seg, kv_seg


def mla_prefill(q: jax.Array, k: jax.Array, v: jax.Array, *, softmax_scale: float,
                causal: bool = True, segment_ids=None,
                cu_seqlens: jax.Array | None = None) -> jax.Array:
  """Expanded-form MLA attention (training, prefill), differentiable.

  Args:
    q: ``[b, s_q, h_q, d_qk]`` (DeepSeek-V3: ``d_qk = 192``), or packed
      ``[t, h_q, d_qk]`` with ``cu_seqlens``.
    k: ``[b, s_k, h_kv, d_qk]`` (packed ``[t, h_kv, d_qk]``); ``h_q % h_kv == 0``.
    v: ``[b, s_k, h_kv, d_v]`` with ``d_v <= d_qk`` (DeepSeek-V3: 128).
    softmax_scale: required (``jaxinfra.rope.softmax_scale(192, cfg)``).
    causal: query ``i`` sees keys ``j <= i`` (needs ``s_q == s_k``).
    segment_ids: optional int32 ``[b, s]``, or a pair ``(q_ids [b, s_q],
      kv_ids [b, s_k])``: tokens attend only to keys with the same id
      (several sequences packed in one row).
    cu_seqlens: optional int32 ``[n + 1]`` cumulative lengths of the
      sequences packed in ``q``/``k``/``v`` ``[t, ...]`` (FlashMLA's varlen
      form; no batch dimension). Tokens at or past ``cu_seqlens[-1]`` are
      padding and get output 0. Exclusive with ``segment_ids``.

  Returns:
    ``[b, s_q, h_q, d_v]`` (packed: ``[t, h_q, d_v]``) in q's dtype. A query
    with no visible key gets 0.
  """
  op = "mla_prefill"
  if cu_seqlens is not None:
    if segment_ids is not None:
      raise ValueError(f"{op}: pass segment_ids or cu_seqlens, not both")
    cu_seqlens = jnp.asarray(cu_seqlens)
    if cu_seqlens.dtype != jnp.int32 or cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
      raise ValueError(f"{op}: cu_seqlens must be int32 [n + 1 >= 2], got {cu_seqlens.dtype} "
                       f"with shape {cu_seqlens.shape}")
    q, k, v = (jnp.asarray(x) for x in (q, k, v))
    if q.ndim != 3:
      raise ValueError(f"{op}: with cu_seqlens, q must be packed [t, h_q, d_qk], got shape "
                       f"{q.shape}")
    seg = _segments_from_cu_seqlens(cu_seqlens, q.shape[0])[None]
    out = mla_prefill(q[None], k[None], v[None], softmax_scale=softmax_scale, causal=causal,
                      segment_ids=seg)[0]
    return jnp.where((seg[0] >= 0)[:, None, None], out, 0).astype(out.dtype)
  q, k, v = _check(op, q, k, v)
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"{op}: causal attention needs s_q == s_k, got q shape {q.shape} and k "
                     f"shape {k.shape}")
  mask = None
  visible = None
  if segment_ids is not None:
    q_seg, kv_seg = _check_segment_ids(op, segment_ids, q, k)
    same = q_seg[:, :, None] == kv_seg[:, None, :]                        # [b, s_q, s_k]
    if causal:
      same = same & jnp.tril(jnp.ones(same.shape[1:], bool))
    visible = jnp.any(same, axis=-1)                                      # [b, s_q]
    mask = same[:, None]
  if q.dtype == jnp.float64:
    out = _attention_float64(q, k, v, mask, float(softmax_scale), causal)
  else:
    d_v = v.shape[-1]
    v_padded = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - d_v)))
    out = jax.nn.dot_product_attention(q, k, v_padded, mask=mask, scale=float(softmax_scale),
                                       is_causal=causal)[..., :d_v]
  if visible is not None:
    out = jnp.where(visible[:, :, None, None], out, 0)
  return out.astype(q.dtype)
