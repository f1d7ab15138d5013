"""Serving DeepSeek-V3: prefill into paged latent caches, then absorbed-MLA decode steps.

Every layer keeps its tokens' 576-wide latents ``[c ; rope(k_pe)]`` in a
:class:`jaxinfra.mla.PagedLatentCache` (FlashMLA's layout: 64-token pages,
bf16/float32 or the 656-byte FP8 records). :class:`DecodeCache` holds one
cache per dense layer and one cache whose leaves are stacked over the MoE
layers (scanned with the stacked blocks). Each cache carries its block table
and per-sequence lengths; every layer makes the same allocation decisions, so
the tables are equal across layers and ``cache.lengths`` is any layer's.

* :func:`prefill`: the expanded (training) form of MLA through
  ``mla_prefill`` over the prompt, writing each layer's latents (a fresh
  sequence per row), and the logits of every prompt position.
* :func:`decode_step`: ``s_q`` new tokens per row (1 for plain decoding) at
  positions ``cached length + 0..s_q-1``: absorbed-form MLA through
  ``mla_decode`` over the paged cache, the MoE layers (with the model's
  ``moe_mode``: build the model with ``mesh``, ``ep_axis`` and
  ``moe_mode="low_latency"`` for DeepEP's low-latency dispatch), logits.

Positions, block tables and cached lengths live in the cache (not separate
arguments): a row's next position is its cached length. A row whose tokens
could not be cached (pool exhausted, too many pages, bad id; ``ok`` False)
gets NaN logits, never an answer computed without its tokens; padding rows
(``seq_id < 0``) are skipped.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxinfra.mla import PagedLatentCache

from models.deepseek_v3 import model as model_lib
from models.deepseek_v3.config import Config


class DecodeCache(NamedTuple):
  """Latent caches of every layer.

  Attributes:
    dense: one :class:`PagedLatentCache` per dense layer (a tuple).
    moe: one :class:`PagedLatentCache` whose leaves are stacked over the MoE
      layers (``pages [n_moe, num_pages, page, 1, 576]``, ...).
  """
  dense: tuple
  moe: PagedLatentCache | None

  @property
  def lengths(self) -> jax.Array:
    """int32 ``[max_seqs]`` cached tokens per sequence slot."""
    return self.dense[0].seqlens if self.dense else self.moe.seqlens[0]

  def free(self, seq_ids: jax.Array) -> "DecodeCache":
    """Releases the pages of ``seq_ids`` (int32 ``[n]``) in every layer."""
    dense = tuple(c.free(seq_ids) for c in self.dense)
    moe = None if self.moe is None else jax.vmap(lambda c: c.free(seq_ids))(self.moe)
    return DecodeCache(dense, moe)


def init_cache(config: Config, *, num_pages: int, max_seqs: int, max_blocks: int,
               dtype=jnp.bfloat16, kv_format: str = "bf16") -> DecodeCache:
  """Empty caches for every layer of ``config`` (``PagedLatentCache.create``'s arguments).

  Raises ``ValueError`` when the config's latent layout is not FlashMLA's
  (``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64), which ``mla_decode`` needs.
  """
  if not config.supports_paged_decode:
    raise ValueError(f"init_cache: paged MLA decode needs kv_lora_rank=512 and "
                     f"qk_rope_head_dim=64, got {config.kv_lora_rank} and "
                     f"{config.qk_rope_head_dim}")
  make = lambda: PagedLatentCache.create(num_pages=num_pages, max_seqs=max_seqs,
                                         max_blocks=max_blocks, dtype=dtype, kv_format=kv_format)
  dense = tuple(make() for _ in range(config.n_dense_layers))
  moe = None
  if config.n_moe_layers:
    one = make()
    moe = jax.tree_util.tree_map(
        lambda a: jnp.broadcast_to(a, (config.n_moe_layers,) + a.shape), one)
  return DecodeCache(dense, moe)


def _check(op: str, model, tokens, seq_ids, cache) -> tuple[jax.Array, jax.Array]:
  tokens = model.check_tokens(op, tokens)
  seq_ids = jnp.asarray(seq_ids)
  if seq_ids.dtype != jnp.int32 or seq_ids.shape != tokens.shape[:1]:
    raise ValueError(f"{op}: seq_ids must be int32 [B={tokens.shape[0]}], got {seq_ids.dtype} "
                     f"with shape {seq_ids.shape}")
  if not isinstance(cache, DecodeCache) or len(cache.dense) != model.config.n_dense_layers:
    raise ValueError(f"{op}: cache must be a DecodeCache from init_cache(config) with "
                     f"{model.config.n_dense_layers} dense-layer caches")
  return tokens, seq_ids


def _finish(model, x, oks, seq_ids) -> tuple[jax.Array, jax.Array]:
  ok = jnp.all(jnp.stack(oks), axis=0)
  logits = model.logits(x)
  failed = ~ok & (seq_ids >= 0)
  return jnp.where(failed[:, None, None], jnp.nan, logits), ok


def prefill(model: model_lib.DeepSeekV3, tokens: jax.Array, cache: DecodeCache,
            seq_ids: jax.Array, lengths: jax.Array | None = None
            ) -> tuple[jax.Array, DecodeCache, jax.Array]:
  """Runs the prompts and caches their latents (fresh sequences).

  Args:
    model: the model (any ``linear`` kind; MoE layers use their own call).
    tokens: int32 ``[B, S]`` prompts, right-padded.
    cache: from :func:`init_cache`; the rows' slots must be empty.
    seq_ids: int32 ``[B]`` sequence slots (negative: padding row).
    lengths: int32 ``[B]`` prompt lengths (tokens past them are not
      cached); default ``S``.

  Returns:
    ``(logits [B, S, V] float32, cache, ok [B] bool)``; rows not cached get
    NaN logits.
  """
  tokens, seq_ids = _check("prefill", model, tokens, seq_ids, cache)
  positions = model_lib.default_positions(tokens)
  x = model.embed(tokens)
  dense, oks = [], []
  for block, c in zip(model.dense_layers, cache.dense):
    x, _, c, ok = block.prefill(x, positions, c, seq_ids, lengths)
    dense.append(c)
    oks.append(ok)
  moe = cache.moe
  if model.moe_layers is not None:
    def layer(block, x, c):
      x, _, c, ok = block.prefill(x, positions, c, seq_ids, lengths)
      return x, (c, ok)
    x, (moe, ok) = model_lib.scan_blocks(model.moe_layers, x, layer, cache.moe)
    oks.extend(list(ok))
  logits, ok = _finish(model, x, oks, seq_ids)
  return logits, DecodeCache(tuple(dense), moe), ok


def decode_step(model: model_lib.DeepSeekV3, tokens: jax.Array, cache: DecodeCache,
                seq_ids: jax.Array) -> tuple[jax.Array, DecodeCache, jax.Array]:
  """Appends ``tokens`` to their sequences and returns their logits.

  Args:
    model: the model; needs ``config.supports_paged_decode``.
    tokens: int32 ``[B, s_q]`` new tokens (``s_q = 1`` for plain decoding),
      at positions ``cache.lengths[seq_ids] + 0..s_q-1``.
    cache: the caches (after :func:`prefill` or earlier steps).
    seq_ids: int32 ``[B]`` sequence slots (negative: padding row).

  Returns:
    ``(logits [B, s_q, V] float32, cache, ok [B] bool)``; rows not cached
    get NaN logits.
  """
  tokens, seq_ids = _check("decode_step", model, tokens, seq_ids, cache)
  x = model.embed(tokens)
  dense, oks = [], []
  for block, c in zip(model.dense_layers, cache.dense):
    x, _, c, ok = block.decode(x, c, seq_ids)
    dense.append(c)
    oks.append(ok)
  moe = cache.moe
  if model.moe_layers is not None:
    def layer(block, x, c):
      x, _, c, ok = block.decode(x, c, seq_ids)
      return x, (c, ok)
    x, (moe, ok) = model_lib.scan_blocks(model.moe_layers, x, layer, cache.moe)
    oks.extend(list(ok))
  logits, ok = _finish(model, x, oks, seq_ids)
  return logits, DecodeCache(tuple(dense), moe), ok


__all__ = ["DecodeCache", "decode_step", "init_cache", "prefill"]
