"""``MultiHeadLatentAttention``: DeepSeek-V3's attention layer as a Flax NNX module.

Structure (DeepSeek-V3 sizes in brackets, all configurable):

* queries: ``wq_a`` [7168 -> 1536], RMSNorm, ``wq_b`` [1536 -> 128 x 192];
  each head's 192 channels are 128 "NoPE" + 64 RoPE (``q_lora_rank=0``: one
  ``wq`` [7168 -> 128 x 192]);
* keys/values: ``wkv_a`` [7168 -> 512 + 64] gives the latent ``c`` (then
  RMSNorm) and one RoPE key shared by all heads; ``wkv_b`` [512 -> 128 x
  (128 + 128)] expands ``c`` into per-head NoPE keys and values;
* ``wo`` [128 x 128 -> 7168]; YaRN RoPE (``jaxinfra.rope``) on the 64 RoPE
  channels; softmax scale ``192 ** -0.5 * mscale ** 2``.

Two ways to run it:

* ``__call__`` (training, prefill): the expanded form, per-head 192-wide keys
  and 128-wide values, through :func:`jaxinfra.mla.mla_prefill`; optionally
  writes each token's ``[c ; rope(k_pe)]`` into a :class:`PagedLatentCache`.
* ``decode``: weight absorption, ``q_c = W_UK^T q_nope`` so the scores are
  ``[q_c ; q_pe] . [c ; k_pe]`` over 576 channels, and the 512-wide latent
  output is mapped back by ``W_UV``: :func:`jaxinfra.mla.mla_decode` over the
  paged cache. This needs ``kv_lora_rank == 512`` and ``qk_rope_head_dim == 64``
  (FlashMLA's 576/512 contract).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfra import rope as rope_lib
from jaxinfra.mla import _core
from jaxinfra.mla import cache as cache_lib
from jaxinfra.mla import decode as decode_lib
from jaxinfra.mla import prefill as prefill_lib


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Sizes of a :class:`MultiHeadLatentAttention` layer (defaults: DeepSeek-V3)."""

  dim: int = 7168
  n_heads: int = 128
  q_lora_rank: int = 1536          # 0: a single wq projection
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  norm_eps: float = 1e-6
  rope: rope_lib.YarnConfig = rope_lib.YarnConfig()
  interleaved_rope: bool = True    # DeepSeek's reference layout

  def __post_init__(self):
    sizes = dict(dim=self.dim, n_heads=self.n_heads, kv_lora_rank=self.kv_lora_rank,
                 qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                 v_head_dim=self.v_head_dim)
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad or self.q_lora_rank < 0:
      raise ValueError(f"MLAConfig: sizes must be positive (q_lora_rank >= 0), got {bad or sizes}")
    if self.rope.dim != self.qk_rope_head_dim:
      raise ValueError(f"MLAConfig: rope.dim ({self.rope.dim}) must equal qk_rope_head_dim "
                       f"({self.qk_rope_head_dim})")

  @property
  def qk_head_dim(self) -> int:
    return self.qk_nope_head_dim + self.qk_rope_head_dim

  @property
  def softmax_scale(self) -> float:
    return rope_lib.softmax_scale(self.qk_head_dim, self.rope)


class MultiHeadLatentAttention(nnx.Module):
  """DeepSeek-V3 multi-head latent attention (see the module docstring).

  Args:
    config: layer sizes.
    rngs: parameter initialization.
    dtype: computation dtype of the projections.
    param_dtype: parameter dtype.
    decode_impl: ``impl`` passed to ``mla_decode``.
    projection: optional factory ``projection(in_features, out_features) ->
      module`` (``[..., in] -> [..., out]``) for ``wq_a``, ``wq_b`` (or
      ``wq``), ``wkv_a`` and ``wo``, e.g. an FP8 layer from
      ``jaxinfra.gemm``; default ``nnx.Linear``. ``wkv_b`` is always an
      ``nnx.Linear`` (``[kv_lora, h * (nope + v)]``): decode absorbs its kernel.
  """

  def __init__(self, config: MLAConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
               param_dtype=jnp.float32, decode_impl: str = "auto",
               projection: Callable[[int, int], nnx.Module] | None = None):
    self.config = config
    self.decode_impl = decode_impl
    c, h = config, config.n_heads
    dense = lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)
    linear = projection or dense
    norm = lambda n: nnx.RMSNorm(n, epsilon=c.norm_eps, dtype=dtype, param_dtype=param_dtype,
                                 rngs=rngs)
    if c.q_lora_rank:
      self.wq_a = linear(c.dim, c.q_lora_rank)
      self.q_norm = norm(c.q_lora_rank)
      self.wq_b = linear(c.q_lora_rank, h * c.qk_head_dim)
    else:
      self.wq = linear(c.dim, h * c.qk_head_dim)
    self.wkv_a = linear(c.dim, c.kv_lora_rank + c.qk_rope_head_dim)
    self.kv_norm = norm(c.kv_lora_rank)
    self.wkv_b = dense(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim))
    self.wo = linear(h * c.v_head_dim, c.dim)

  # --- pieces shared by both forms ---

  def _check_x(self, op: str, x: jax.Array) -> None:
    if x.ndim != 3 or x.shape[-1] != self.config.dim:
      raise ValueError(f"MultiHeadLatentAttention.{op}: x must be [b, s, dim={self.config.dim}], "
                       f"got shape {x.shape}")

  def _rope(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    return rope_lib.apply_rope(x, positions, rope_lib.inverse_frequencies(self.config.rope),
                               interleaved=self.config.interleaved_rope)

  def _queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [b, s, dim]`` -> ``q_nope [b, s, h, nope]``, rotated ``q_pe [b, s, h, rope]``."""
    c = self.config
    q = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank else self.wq(x)
    q = q.reshape(*x.shape[:2], c.n_heads, c.qk_head_dim)
    q_nope, q_pe = q[..., :c.qk_nope_head_dim], q[..., c.qk_nope_head_dim:]
    return q_nope, self._rope(q_pe, positions[:, :, None])

  def _latents(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x [b, s, dim]`` -> normed latent ``c [b, s, kv_lora]``, rotated ``k_pe [b, s, rope]``."""
    c = self.config
    kv = self.wkv_a(x)
    latent, k_pe = kv[..., :c.kv_lora_rank], kv[..., c.kv_lora_rank:]
    return self.kv_norm(latent), self._rope(k_pe, positions)

  def _wkv_b(self) -> tuple[jax.Array, jax.Array]:
    """``W_UK [kv_lora, h, nope]`` and ``W_UV [kv_lora, h, v]`` from ``wkv_b``."""
    c = self.config
    w = self.wkv_b.kernel[...].reshape(c.kv_lora_rank, c.n_heads,
                                       c.qk_nope_head_dim + c.v_head_dim)
    return w[..., :c.qk_nope_head_dim], w[..., c.qk_nope_head_dim:]

  # --- training / prefill: expanded form ---

  def __call__(self, x: jax.Array, positions: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None,
               cache: cache_lib.PagedLatentCache | None = None,
               seq_ids: jax.Array | None = None, lengths: jax.Array | None = None):
    """Causal self-attention over ``x`` in the expanded form.

    Args:
      x: ``[b, s, dim]``.
      positions: int32 ``[b, s]`` RoPE positions; default ``0..s-1``.
      segment_ids: optional int32 ``[b, s]`` for packed sequences.
      cache: optional cache to write ``[c ; rope(k_pe)]`` of the tokens into
        (a fresh prefill: the layer attends within ``x`` only).
      seq_ids: int32 ``[b]`` cache slots of the rows (with ``cache``).
      lengths: optional int32 ``[b]`` valid tokens per row to cache (right
        padding is not cached); default ``s``.

    Returns:
      ``y [b, s, dim]``; with ``cache``, ``(y, cache, ok)`` where ``ok [b]``
      says which rows were cached (see ``PagedLatentCache.append``).
    """
    c = self.config
    self._check_x("__call__", x)
    b, s, _ = x.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    q_nope, q_pe = self._queries(x, positions)
    latent, k_pe = self._latents(x, positions)
    kv = self.wkv_b(latent).reshape(b, s, c.n_heads, c.qk_nope_head_dim + c.v_head_dim)
    k_nope, v = kv[..., :c.qk_nope_head_dim], kv[..., c.qk_nope_head_dim:]
    k = jnp.concatenate(
        [k_nope, jnp.broadcast_to(k_pe[:, :, None], (b, s, c.n_heads, c.qk_rope_head_dim))], -1)
    q = jnp.concatenate([q_nope, q_pe], axis=-1)
    out = prefill_lib.mla_prefill(q, k.astype(q.dtype), v.astype(q.dtype),
                                  softmax_scale=c.softmax_scale, causal=True,
                                  segment_ids=segment_ids)
    y = self.wo(out.reshape(b, s, c.n_heads * c.v_head_dim))
    if cache is None:
      return y
    if seq_ids is None:
      raise ValueError("MultiHeadLatentAttention: seq_ids is required with cache")
    cache, ok = cache.append(seq_ids, latent, k_pe, lengths)
    return y, cache, ok

  # --- decode: absorbed form over the paged latent cache ---

  def decode(self, x: jax.Array, cache: cache_lib.PagedLatentCache,
             seq_ids: jax.Array) -> tuple[jax.Array, cache_lib.PagedLatentCache, jax.Array]:
    """Appends ``s_q`` new tokens per row to the cache and attends them to
    everything cached (causal, bottom-right aligned: multi-token prediction).

    Args:
      x: ``[b, s_q, dim]``: hidden states of the new tokens, whose positions
        are the rows' cached lengths ``+ 0..s_q-1``.
      cache: the paged latent cache.
      seq_ids: int32 ``[b]`` cache slots; a negative id is a padding row.

    Returns:
      ``(y [b, s_q, dim], cache, ok [b])``. A row whose tokens could not be
      cached (``ok`` False) gets NaN in ``y`` (0 for padding rows), never an
      answer computed without its new tokens.
    """
    c = self.config
    if c.kv_lora_rank != _core.V_DIM or c.qk_rope_head_dim != _core.QK_DIM - _core.V_DIM:
      raise ValueError(f"MultiHeadLatentAttention.decode: needs kv_lora_rank={_core.V_DIM} and "
                       f"qk_rope_head_dim={_core.QK_DIM - _core.V_DIM} (FlashMLA's 576/512 "
                       f"layout), got {c.kv_lora_rank} and {c.qk_rope_head_dim}")
    self._check_x("decode", x)
    b, s_q, _ = x.shape
    _, cached = cache.lookup(seq_ids)
    positions = cached[:, None] + jnp.arange(s_q, dtype=jnp.int32)[None, :]
    q_nope, q_pe = self._queries(x, positions)
    latent, k_pe = self._latents(x, positions)
    cache, ok = cache.append(seq_ids, latent, k_pe)
    block_table, seqlens = cache.lookup(seq_ids)
    w_uk, w_uv = self._wkv_b()
    q_latent = jnp.einsum("bshd,chd->bshc", q_nope, w_uk.astype(q_nope.dtype),
                          precision=jax.lax.Precision.HIGHEST)
    q_dtype = jnp.bfloat16 if cache.kv_format == "fp8" else cache.pages.dtype
    q = jnp.concatenate([q_latent, q_pe.astype(q_latent.dtype)], axis=-1).astype(q_dtype)
    out, _ = decode_lib.mla_decode(q, cache.pages, block_table, seqlens,
                                   softmax_scale=c.softmax_scale, causal=True,
                                   kv_format=cache.kv_format, impl=self.decode_impl)
    o = jnp.einsum("bshc,chd->bshd", out.astype(q_nope.dtype), w_uv.astype(q_nope.dtype),
                   precision=jax.lax.Precision.HIGHEST)
    y = self.wo(o.reshape(b, s_q, c.n_heads * c.v_head_dim))
    fill = jnp.where(seq_ids < 0, 0.0, jnp.nan)[:, None, None]
    return jnp.where(ok[:, None, None], y, fill.astype(y.dtype)), cache, ok
