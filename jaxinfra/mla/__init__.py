"""Multi-head latent attention (MLA) for JAX: FlashMLA's contract.

DeepSeek-V2/V3 cache one 576-wide row per token, ``[c_t ; k^R_t]`` (the
RMS-normed 512-wide latent and the rotated 64-wide RoPE key, shared by every
head). With the key up-projection absorbed into the query, decode is
multi-query attention of ``h_q`` heads over those rows: scores over all 576
channels, values the first 512 ("V = K[..., :512]").

Ops:

* :func:`mla_decode`: decode over a paged cache (bf16 pages of 64 tokens, or
  the 656-byte FP8 records of :func:`quantize_kv_fp8`), FlashMLA's
  ``flash_mla_with_kvcache``. Custom call ``jaxinfra_mla_decode`` (CPU handler
  today; the Hopper kernel registers under the same contract, see
  ``ffi/mla.cc``) and a pure-JAX ``xla`` path.
* :func:`mla_decode_sparse`: DeepSeek-V3.2 token-sparse decode over the FP8
  cache (pure JAX).
* :func:`get_mla_metadata`, :func:`split_kv_reference`: the split-KV schedule
  and a pure-JAX execution of it (reference for the kernel's combine step).
* :class:`PagedLatentCache`: page allocation and latent appends inside ``jit``.
* :func:`mla_prefill`: the expanded (non-absorbed) attention of training and
  prefill, differentiable.
* :class:`MultiHeadLatentAttention`: the Flax NNX module (DeepSeek-V3 layout).

Conventions shared by the decode ops:

* ``out [b, s_q, h_q, 512]`` in q's dtype; ``lse [b, h_q, s_q]`` float32,
  natural log. A query row with no visible key gets out 0 and lse ``+inf``.
* ``softmax_scale`` is required: DeepSeek-V3 uses ``192 ** -0.5 * mscale**2``
  (``jaxinfra.rope.softmax_scale``), not ``576 ** -0.5``.
* ``causal`` with ``s_q > 1`` is bottom-right aligned.
* Pages past a request's length are never read; a request with an impossible
  length or page id gets NaN results, never an out-of-bounds read.
"""

from jaxinfra.mla.cache import PagedLatentCache
from jaxinfra.mla.decode import MLA_DECODE, mla_decode, mla_decode_sparse
from jaxinfra.mla.kv_fp8 import BYTES_PER_TOKEN, dequantize_kv_fp8, quantize_kv_fp8, unpack_kv_fp8
from jaxinfra.mla.prefill import mla_prefill
from jaxinfra.mla.schedule import (MLAMetadata, get_mla_metadata, merge_partials, num_sm_parts,
                                   split_kv_reference)

__all__ = [
    "BYTES_PER_TOKEN", "MLA_DECODE", "MLAMetadata", "MultiHeadLatentAttention", "MLAConfig",
    "PagedLatentCache", "dequantize_kv_fp8", "get_mla_metadata", "merge_partials", "mla_decode",
    "mla_decode_sparse", "mla_prefill", "num_sm_parts", "quantize_kv_fp8", "split_kv_reference",
    "unpack_kv_fp8",
]


def __getattr__(name: str):
  # The NNX module imports flax, which is slow to import; load it on first use.
  if name in ("MultiHeadLatentAttention", "MLAConfig"):
    from jaxinfra.mla import attention  # pylint: disable=g-import-not-at-top
    return getattr(attention, name)
  raise AttributeError(f"module 'jaxinfra.mla' has no attribute {name!r}")
