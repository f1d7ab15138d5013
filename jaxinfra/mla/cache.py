"""A paged latent KV cache whose bookkeeping runs inside ``jit``.

``PagedLatentCache`` is an immutable pytree: every operation returns a new
cache (donate the old one to ``jit`` to update in place). It holds

* ``pages``: the page pool, ``[num_pages, page_size, 1, 576]`` (``"bf16"``
  format, in the cache's dtype) or uint8 ``[num_pages, page_size, 1, 656]``
  (``"fp8"``), exactly what :func:`jaxinfra.mla.mla_decode` reads;
* ``block_table``: int32 ``[max_seqs, max_blocks]``, sequence ``s``'s token
  ``t`` in page ``block_table[s, t // page_size]``; unused slots are -1;
* ``seqlens``: int32 ``[max_seqs]`` cached tokens per sequence slot;
* ``page_free``: bool ``[num_pages]``.

Sequence slots are identified by ``seq_ids`` in ``[0, max_seqs)``; a negative
id is a padding row (skipped). Appends never lose data: a sequence whose
tokens do not fit (pool exhausted, or more than ``max_blocks`` pages) is left
unchanged and reported in the returned ``ok`` mask.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxinfra.mla import _core
from jaxinfra.mla import kv_fp8

LATENT_DIM = kv_fp8.NOPE_DIM  # 512
ROPE_DIM = kv_fp8.ROPE_DIM    # 64


@dataclasses.dataclass(frozen=True)
class PagedLatentCache:
  """Paged storage of MLA latents ``[c_t ; k^R_t]`` (see the module docstring)."""

  pages: jax.Array
  block_table: jax.Array
  seqlens: jax.Array
  page_free: jax.Array
  kv_format: str = "bf16"

  @classmethod
  def create(cls, *, num_pages: int, max_seqs: int, max_blocks: int, page_size: int = 64,
             dtype=jnp.bfloat16, kv_format: str = "bf16") -> "PagedLatentCache":
    """An empty cache.

    Args:
      num_pages: pages in the pool.
      max_seqs: sequence slots (rows of the block table).
      max_blocks: pages one sequence may hold (so at most
        ``max_blocks * page_size`` tokens).
      page_size: tokens per page; ``mla_decode`` needs 64 for ``"bf16"``.
      dtype: element type of ``"bf16"`` pages (bfloat16, or float32 for
        reference computations); ignored for ``"fp8"``.
      kv_format: ``"bf16"`` (unquantized) or ``"fp8"`` (656-byte records).
    """
    if min(num_pages, max_seqs, max_blocks, page_size) < 1:
      raise ValueError(f"PagedLatentCache.create: sizes must be >= 1, got num_pages={num_pages}, "
                       f"max_seqs={max_seqs}, max_blocks={max_blocks}, page_size={page_size}")
    if kv_format not in _core.KV_FORMATS:
      raise ValueError(f"PagedLatentCache.create: kv_format must be one of {_core.KV_FORMATS}, "
                       f"got {kv_format!r}")
    if kv_format == "fp8":
      pages = jnp.zeros((num_pages, page_size, 1, kv_fp8.BYTES_PER_TOKEN), jnp.uint8)
    else:
      pages = jnp.zeros((num_pages, page_size, 1, _core.QK_DIM), dtype)
    return cls(pages=pages, block_table=jnp.full((max_seqs, max_blocks), -1, jnp.int32),
               seqlens=jnp.zeros((max_seqs,), jnp.int32),
               page_free=jnp.ones((num_pages,), bool), kv_format=kv_format)

  @property
  def page_size(self) -> int:
    return self.pages.shape[1]

  @property
  def max_seqs(self) -> int:
    return self.block_table.shape[0]

  @property
  def max_blocks(self) -> int:
    return self.block_table.shape[1]

  @property
  def num_pages(self) -> int:
    return self.pages.shape[0]

  def lookup(self, seq_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(block_table [n, max_blocks], seqlens [n])`` of the given sequences,
    the arguments :func:`jaxinfra.mla.mla_decode` takes. Negative or
    out-of-range ids give length 0."""
    seq_ids = self._check_ids("lookup", seq_ids)
    valid = (seq_ids >= 0) & (seq_ids < self.max_seqs)
    rows = jnp.clip(seq_ids, 0, self.max_seqs - 1)
    return (jnp.where(valid[:, None], self.block_table[rows], -1),
            jnp.where(valid, self.seqlens[rows], 0))

  def append(self, seq_ids: jax.Array, latents: jax.Array, k_rope: jax.Array,
             num_tokens: jax.Array | None = None) -> tuple["PagedLatentCache", jax.Array]:
    """Appends new tokens' latents and rotated RoPE keys, allocating pages.

    Args:
      seq_ids: int32 ``[n]`` sequence slots; a negative id skips its row.
        An id repeated in one call is applied only at its first row (the
        others are refused).
      latents: ``[n, t, 512]``: ``RMSNorm(W_DKV x)`` of the new tokens.
      k_rope: ``[n, t, 64]``: their keys' RoPE part, already rotated.
      num_tokens: int32 ``[n]`` tokens of each row to append (the first
        ``num_tokens[i]`` of ``t``); default all ``t``. Values are clipped to
        ``[0, t]``.

    Returns:
      ``(cache, ok)``: ``ok`` bool ``[n]`` is False for rows that were not
      appended: negative, out-of-range or repeated ids, sequences that would
      exceed ``max_blocks`` pages, and pool exhaustion. Rows are served in
      order: once the pages requested by rows ``0..i`` exceed the free pool,
      row ``i`` and every later row that needs a new page are refused (rows
      that fit in their last page are still served). A refused row leaves its
      sequence untouched.
    """
    seq_ids = self._check_ids("append", seq_ids)
    n = seq_ids.shape[0]
    latents, k_rope = jnp.asarray(latents), jnp.asarray(k_rope)
    if latents.ndim != 3 or latents.shape[0] != n or latents.shape[2] != LATENT_DIM:
      raise ValueError(f"PagedLatentCache.append: latents must be [n={n}, t, {LATENT_DIM}], got "
                       f"shape {latents.shape}")
    t = latents.shape[1]
    if k_rope.shape != (n, t, ROPE_DIM):
      raise ValueError(f"PagedLatentCache.append: k_rope must be [n={n}, t={t}, {ROPE_DIM}], got "
                       f"shape {k_rope.shape}")
    if num_tokens is None:
      num_tokens = jnp.full((n,), t, jnp.int32)
    num_tokens = jnp.asarray(num_tokens)
    if num_tokens.dtype != jnp.int32 or num_tokens.shape != (n,):
      raise ValueError(f"PagedLatentCache.append: num_tokens must be int32 [n={n}], got "
                       f"{num_tokens.dtype} with shape {num_tokens.shape}")
    num_tokens = jnp.clip(num_tokens, 0, t)
    return self._append(seq_ids, jnp.concatenate([latents, k_rope], axis=-1), num_tokens)

  def _append(self, seq_ids, entries, num_tokens):
    n, t, _ = entries.shape
    page = self.page_size
    rows = jnp.clip(seq_ids, 0, self.max_seqs - 1)
    first = jnp.argmax(seq_ids[None, :] == seq_ids[:, None], axis=1) == jnp.arange(n)
    valid = (seq_ids >= 0) & (seq_ids < self.max_seqs) & first
    old_len = jnp.where(valid, self.seqlens[rows], 0)
    new_len = old_len + num_tokens
    have = _core.ceil_div(old_len, page)
    need = _core.ceil_div(new_len, page)
    valid = valid & (need <= self.max_blocks)
    new_pages = jnp.where(valid, need - have, 0)
    ok = valid & ((new_pages == 0) | (jnp.cumsum(new_pages) <= jnp.sum(self.page_free)))
    new_pages = jnp.where(ok, new_pages, 0)
    # Allocation: row i takes the free pages of ranks [start_i, start_i + new_pages_i).
    start = jnp.cumsum(new_pages) - new_pages
    free_pages = jnp.nonzero(self.page_free, size=self.num_pages, fill_value=self.num_pages)[0]
    max_new = -(-(t + page - 1) // page)                     # static bound on new pages per row
    q = jnp.arange(max_new, dtype=jnp.int32)
    taking = q[None, :] < new_pages[:, None]                 # [n, max_new]
    got = free_pages[jnp.clip(start[:, None] + q[None, :], 0, self.num_pages - 1)]
    slot = jnp.where(taking, have[:, None] + q[None, :], self.max_blocks)  # dropped when not taking
    block_table = self.block_table.at[rows[:, None], slot].set(got, mode="drop")
    page_free = self.page_free.at[jnp.where(taking, got, self.num_pages)].set(False, mode="drop")
    # Token writes: row i's token u goes to position old_len + u.
    u = jnp.arange(t, dtype=jnp.int32)
    pos = old_len[:, None] + u[None, :]                      # [n, t]
    writing = ok[:, None] & (u[None, :] < num_tokens[:, None])
    page_of = block_table[rows[:, None], jnp.clip(pos // page, 0, self.max_blocks - 1)]
    page_of = jnp.where(writing, page_of, self.num_pages)    # dropped
    if self.kv_format == "fp8":
      records = kv_fp8.quantize_kv_fp8(entries)
    else:
      records = entries.astype(self.pages.dtype)
    pages = self.pages.at[page_of, pos % page, 0].set(records, mode="drop")
    seqlens = self.seqlens.at[jnp.where(ok, rows, self.max_seqs)].set(new_len, mode="drop")
    return dataclasses.replace(self, pages=pages, block_table=block_table, seqlens=seqlens,
                               page_free=page_free), ok

  def free(self, seq_ids: jax.Array) -> "PagedLatentCache":
    """Releases the pages of the given sequences and empties their slots.
    Negative or out-of-range ids are ignored; page contents are kept (they
    are unreachable until reallocated and overwritten)."""
    seq_ids = self._check_ids("free", seq_ids)
    valid = (seq_ids >= 0) & (seq_ids < self.max_seqs)
    rows = jnp.where(valid, seq_ids, self.max_seqs)
    table = self.block_table[jnp.clip(rows, 0, self.max_seqs - 1)]      # [n, max_blocks]
    held = (jnp.arange(self.max_blocks)[None, :]
            < _core.ceil_div(self.seqlens[jnp.clip(rows, 0, self.max_seqs - 1)], self.page_size)[:, None])
    held = held & valid[:, None] & (table >= 0) & (table < self.num_pages)
    page_free = self.page_free.at[jnp.where(held, table, self.num_pages)].set(True, mode="drop")
    return dataclasses.replace(
        self, page_free=page_free,
        block_table=self.block_table.at[rows].set(-1, mode="drop"),
        seqlens=self.seqlens.at[rows].set(0, mode="drop"))

  def _check_ids(self, op: str, seq_ids) -> jax.Array:
    seq_ids = jnp.asarray(seq_ids)
    if seq_ids.dtype != jnp.int32 or seq_ids.ndim != 1:
      raise ValueError(f"PagedLatentCache.{op}: seq_ids must be int32 [n], got {seq_ids.dtype} "
                       f"with shape {seq_ids.shape}")
    return seq_ids


jax.tree_util.register_dataclass(
    PagedLatentCache, data_fields=["pages", "block_table", "seqlens", "page_free"],
    meta_fields=["kv_format"])
