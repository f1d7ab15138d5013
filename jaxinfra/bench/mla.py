"""``jaxinfra bench mla``: MLA decode on FlashMLA's dense-decode configurations.

Full size (GPU): b=128, s_q in {1, 2}, seqlen in {4096, 8192, 16384, 32768},
h_q in {16, 32, 64, 128} (tensor parallelism 8/4/2/1 of DeepSeek's 128
heads), h_kv=1, fixed and variable lengths (FlashMLA's ``N(seqlen, seqlen/2)``,
at least s_q), causal on and off; a bf16 cache of 64-token pages in random
order. The same run measures two ceilings on the same device: a large
copy-class elementwise op (read + write, ``x -> -x`` over 512 MiB of bf16 on
GPU, 8 MiB on CPU) for bandwidth and a large bf16 ``jnp.dot`` (8192^3 on GPU,
512^3 on CPU) for compute; every decode row reports its fraction of both
(``of_copy``, ``of_matmul``) and its speedup over the ``xla`` path. Small size (CPU): four cases that cover every value of s_q, h_q,
varlen and causal at b=4 and seqlen 256 to 1024.

Metrics are FlashMLA's: ``FLOPs = h_q * s_q * sum(lengths) * 2 * (576 + 512)``
and ``bytes = b * (s_q * h_q * 576 * 2 + s_q * h_q * 512 * 2) +
sum(lengths) * h_kv * 576 * 2`` (FlashMLA writes ``b * mean_len``), whatever the
causal mask skips. The split-KV schedule is computed once per case, as a
serving step computes it once for all layers, and is not timed.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra import mla
from jaxinfra.bench import _harness

PAGE = 64
SOFTMAX_SCALE = 192 ** -0.5

# (b, s_q, seqlen, h_q, varlen, causal)
_FULL = [(128, s_q, seqlen, h_q, varlen, causal)
         for s_q, seqlen, h_q, varlen, causal in itertools.product(
             (1, 2), (4096, 8192, 16384, 32768), (16, 32, 64, 128), (False, True), (False, True))]
_SMALL = [(4, 1, 1024, 16, False, False), (4, 2, 512, 64, True, True),
          (4, 1, 256, 128, True, False), (4, 2, 256, 32, False, True)]


def _lengths(b: int, s_q: int, seqlen: int, varlen: bool) -> np.ndarray:
  if not varlen:
    return np.full(b, seqlen, np.int32)
  rng = np.random.default_rng(seqlen + b)
  return np.maximum(rng.normal(seqlen, seqlen / 2, b), s_q).astype(np.int32)


def _case(b: int, s_q: int, seqlen: int, h_q: int, varlen: bool):
  """Queries, a paged cache in permuted pages, the block table and lengths."""
  lengths = _lengths(b, s_q, seqlen, varlen)
  max_blocks = math.ceil(int(lengths.max()) / PAGE)
  k_q, k_kv, k_perm = jax.random.split(jax.random.key(seqlen * 131 + h_q), 3)
  q = (jax.random.normal(k_q, (b, s_q, h_q, 576), jnp.float32) / 10).astype(jnp.bfloat16)
  kv = (jax.random.normal(k_kv, (b * max_blocks, PAGE, 1, 576), jnp.float32) / 10
        ).astype(jnp.bfloat16)
  table = jax.random.permutation(k_perm, b * max_blocks).astype(jnp.int32).reshape(b, max_blocks)
  return q, kv, table, jnp.asarray(lengths)


def flops_and_bytes(b: int, s_q: int, h_q: int, h_kv: int, total_len: int) -> tuple[int, int]:
  """FlashMLA's formulas, with ``b * mean_len = total_len``."""
  flops = h_q * s_q * total_len * 2 * (576 + 512)
  moved = b * (s_q * h_q * 576 * 2 + s_q * h_q * 512 * 2) + total_len * h_kv * 576 * 2
  return flops, moved


def _ceilings(ctx: _harness.BenchContext) -> tuple[float, float]:
  """(GB/s of a large copy-class op, TFLOPS of a large bf16 matmul), also added as rows."""
  elements = (1 << 28) if ctx.full else (1 << 22)
  x = jnp.ones((elements,), jnp.bfloat16)
  seconds = ctx.time(jax.jit(jnp.negative), x)
  copy_gbs = 2 * x.nbytes / seconds / 1e9
  ctx.add(impl="ceiling: copy (x -> -x)", ms=seconds * 1e3, gb_per_s=copy_gbs)
  n = 8192 if ctx.full else 512
  a = jnp.ones((n, n), jnp.bfloat16)
  seconds = ctx.time(jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32)),
                     a, a)
  matmul_tflops = 2 * n ** 3 / seconds / 1e12
  ctx.add(impl="ceiling: bf16 matmul", ms=seconds * 1e3, tflops=matmul_tflops)
  return copy_gbs, matmul_tflops


@_harness.register("mla", "MLA decode over a paged latent cache (FlashMLA's configurations)")
def run(ctx: _harness.BenchContext) -> None:
  impls = _harness.available_impls(mla.MLA_DECODE)
  copy_gbs, matmul_tflops = _ceilings(ctx)
  for b, s_q, seqlen, h_q, varlen, causal in ctx.track(_FULL if ctx.full else _SMALL,
                                                       "mla_decode"):
    q, kv, table, lengths = _case(b, s_q, seqlen, h_q, varlen)
    metadata = jax.jit(mla.get_mla_metadata, static_argnums=(1, 2))(lengths, s_q * h_q, 1)
    total = int(jnp.sum(lengths))
    flops, moved = flops_and_bytes(b, s_q, h_q, 1, total)
    times = {}
    for impl in impls:
      fn = jax.jit(lambda q, kv, t, n, m, impl=impl: mla.mla_decode(
          q, kv, t, n, softmax_scale=SOFTMAX_SCALE, causal=causal, metadata=m, impl=impl))
      seconds = times[impl] = ctx.time(fn, q, kv, table, lengths, metadata)
      ctx.add(b=b, s_q=s_q, seqlen=seqlen, mean_len=total / b, h_q=h_q, varlen=varlen,
              causal=causal, impl=impl, ms=seconds * 1e3, tflops=flops / seconds / 1e12,
              gb_per_s=moved / seconds / 1e9,
              of_copy=moved / seconds / 1e9 / copy_gbs,
              of_matmul=flops / seconds / 1e12 / matmul_tflops,
              vs_xla=times["xla"] / seconds if "xla" in times else float("nan"))
