"""The Hopper CUDA kernels (csrc/gemm/sm90, csrc/mla/sm90) behind impl="ffi" on a
GPU, against the ``xla`` path and independent float64 references, with the
issues' tolerances: DeepGEMM's calc_diff < 1e-3 against the float64 product of
the unquantized inputs, FlashMLA's abs/rel/cos tolerances for MLA decode.

Every test is marked ``gpu`` (skipped without a GPU). These kernels have never
run: this file was written with them, without a GPU (docs/gpu-kernels.md).
On a GPU machine the rest of the suite also reaches them, since tests that
loop over impl="ffi" run on the default (GPU) backend.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _mla_reference as ref
from jaxinfra import _custom_call, gemm, mla, quant
from jaxinfra.testing.numerics import calc_diff

pytestmark = pytest.mark.gpu

SCALE = 192 ** -0.5


def _require_cuda_handler(call):
  if "cuda" not in _custom_call.available_platforms(call):
    pytest.skip(f"no CUDA handler for {call.op} in this build / on this device")


def _normal(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


_per_token = jax.jit(functools.partial(quant.quantize_per_token, impl="xla"))
_per_block = jax.jit(functools.partial(quant.quantize_per_block, impl="xla"))


# --- FP8 GEMMs -----------------------------------------------------------------------------------

# (m, n, k): n values make the heuristic pick every instantiated block_n
# (64 .. 160, including 112/144/160 tiles that straddle two weight-scale
# blocks); k covers one block, many blocks and a partial last block.
DENSE = [(1, 64, 128), (64, 2112, 7168), (100, 576, 512), (128, 7168, 2048),
         (256, 7168, 1536), (333, 1000, 1040), (4096, 4096, 7168), (4096, 2112, 7168),
         (17, 8, 40)]


@pytest.mark.parametrize("m, n, k", DENSE)
@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32])
def test_dense_fp8_gemm(m, n, k, out_dtype):
  _require_cuda_handler(gemm.FP8_GEMM)
  x, w = _normal(m + n, (m, k)), _normal(k, (n, k), 0.1)
  xq, xs = _per_token(x)
  wq, ws = _per_block(w)
  exact = x.astype(np.float64) @ w.astype(np.float64).T
  got = np.asarray(gemm.fp8_gemm(xq, xs, wq, ws, out_dtype=out_dtype, impl="ffi"), np.float64)
  want = np.asarray(gemm.fp8_gemm(xq, xs, wq, ws, out_dtype=out_dtype, impl="xla"), np.float64)
  assert calc_diff(got, exact) < 1e-3
  assert calc_diff(got, want) < 1e-5


def test_dense_fp8_gemm_accumulates_into_c():
  _require_cuda_handler(gemm.FP8_GEMM)
  m, n, k = 200, 300, 520
  x, w, c = _normal(1, (m, k)), _normal(2, (n, k), 0.1), _normal(3, (m, n))
  xq, xs = _per_token(x)
  wq, ws = _per_block(w)
  got = gemm.fp8_gemm(xq, xs, wq, ws, c=jnp.asarray(c), out_dtype=jnp.float32, impl="ffi")
  want = gemm.fp8_gemm(xq, xs, wq, ws, c=jnp.asarray(c), out_dtype=jnp.float32, impl="xla")
  assert calc_diff(got, want) < 1e-6


@pytest.mark.parametrize("tokens, n, k", [(4096, 7168, 2048), (300, 96, 200), (1024, 576, 1000)])
def test_dense_with_per_token_b_scales_and_c(tokens, n, k):
  # The wgrad recipe: dW = dy^T x with 1 x 128 scales along the token axis on both sides.
  _require_cuda_handler(gemm.FP8_GEMM)
  dy, x, c = _normal(1, (tokens, n)), _normal(2, (tokens, k)), _normal(3, (n, k))
  aq, as_ = _per_token(jnp.asarray(dy.T))
  bq, bs = _per_token(jnp.asarray(x.T))
  got = gemm.fp8_gemm(aq, as_, bq, bs, out_dtype=jnp.float32, c=jnp.asarray(c), impl="ffi")
  want = gemm.fp8_gemm(aq, as_, bq, bs, out_dtype=jnp.float32, c=jnp.asarray(c), impl="xla")
  exact = c + dy.T.astype(np.float64) @ x.astype(np.float64)
  assert calc_diff(got, exact) < 1e-3
  assert calc_diff(got, want) < 1e-6


@pytest.mark.parametrize("group_k, m, n", [([1024, 0, 2048, 512, 128], 512, 768),
                                           ([128, 100, 256], 64, 130)])
def test_k_grouped(group_k, m, n):
  _require_cuda_handler(gemm.K_GROUPED_FP8_GEMM)
  k_total = 128 * (sum(g for g in group_k if g > 0) // 128 + 1)
  a, b = _normal(4, (m, k_total)), _normal(5, (n, k_total))
  aq, as_ = _per_token(jnp.asarray(a))
  bq, bs = _per_token(jnp.asarray(b))
  c = _normal(6, (len(group_k), m, n))
  sizes = jnp.asarray(group_k, jnp.int32)
  got = np.asarray(gemm.k_grouped_fp8_gemm(aq, as_, bq, bs, sizes, c=jnp.asarray(c), impl="ffi"))
  want = np.asarray(gemm.k_grouped_fp8_gemm(aq, as_, bq, bs, sizes, c=jnp.asarray(c),
                                            impl="xla"))
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))  # NaN from the first bad group
  finite = ~np.isnan(want)
  assert calc_diff(got[finite], want[finite]) < 1e-6


@pytest.mark.parametrize("groups, per_group, n, k", [(4, 1000, 4096, 7168), (8, 300, 7168, 2048),
                                                     (3, 77, 576, 512)])
def test_contiguous_with_padding_blocks(groups, per_group, n, k):
  _require_cuda_handler(gemm.GROUPED_FP8_GEMM_CONTIGUOUS)
  sizes = np.random.default_rng(groups).integers(0, 2 * per_group, groups).astype(np.int32)
  sizes[0] = 0  # an empty group
  rows = int(sum(-(-s // 128) * 128 for s in sizes)) + 128  # a trailing all-padding block
  layout = gemm.align_groups(jnp.asarray(sizes), rows)
  x = _normal(5, (rows, k))
  w = _normal(6, (groups, n, k), 0.1)
  xq, xs = _per_token(jax.jit(gemm.to_padded)(jnp.asarray(x), layout))
  wq, ws = _per_block(w)
  padding = np.asarray(layout.m_indices) < 0
  for layout_arg in (dict(group_ends=layout.group_ends), dict(m_indices=layout.m_indices)):
    got = np.asarray(gemm.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, out_dtype=jnp.float32,
                                                      impl="ffi", **layout_arg))
    want = np.asarray(gemm.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, out_dtype=jnp.float32,
                                                       impl="xla", **layout_arg))
    assert np.all(got[padding] == 0)
    assert calc_diff(got, want) < 1e-5


def test_contiguous_groups_not_aligned_to_the_block_use_the_fixup_rows():
  _require_cuda_handler(gemm.GROUPED_FP8_GEMM_CONTIGUOUS)
  groups, m, n, k = 5, 700, 320, 384
  x, w = _normal(7, (m, k)), _normal(8, (groups, n, k), 0.1)
  xq, xs = _per_token(x)
  wq, ws = _per_block(w)
  m_indices = np.random.default_rng(9).integers(-1, groups, m).astype(np.int32)  # unsorted
  ends = jnp.asarray([90, 90, 300, 301, 650], jnp.int32)
  for layout_arg in (dict(m_indices=jnp.asarray(m_indices)),
                     dict(group_ends=ends, alignment=1), dict(group_ends=ends, alignment=64)):
    got = gemm.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, out_dtype=jnp.float32, impl="ffi",
                                           **layout_arg)
    want = gemm.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, out_dtype=jnp.float32, impl="xla",
                                            **layout_arg)
    assert calc_diff(got, want) < 1e-5, layout_arg


@pytest.mark.parametrize("groups, m_max, n, k", [(1, 1024, 4096, 7168), (4, 256, 7168, 2048),
                                                 (6, 100, 576, 512)])
def test_masked_rows_are_zero(groups, m_max, n, k):
  _require_cuda_handler(gemm.GROUPED_FP8_GEMM_MASKED)
  a, w = _normal(10, (groups, m_max, k)), _normal(11, (groups, n, k), 0.1)
  aq, as_ = _per_token(a)
  wq, ws = _per_block(w)
  masked_m = np.random.default_rng(12).integers(0, m_max + 1, groups).astype(np.int32)
  masked_m[0] = m_max + 5  # clamped to m_max
  if groups > 1:
    masked_m[1] = -1       # clamped to 0
  got = np.asarray(gemm.grouped_fp8_gemm_masked(aq, as_, wq, ws, jnp.asarray(masked_m),
                                                out_dtype=jnp.float32, impl="ffi"))
  exact = np.einsum("gmk,gnk->gmn", a.astype(np.float64), w.astype(np.float64))
  valid = np.arange(m_max)[None, :] < np.clip(masked_m, 0, m_max)[:, None]
  assert np.all(got[~valid] == 0)
  assert calc_diff(got[valid], exact[valid]) < 1e-3


# --- MLA decode ----------------------------------------------------------------------------------

# (b, s_q, s_k, h_q, h_kv, varlen, causal): DeepSeek's serving case (h_q * s_q
# = 128, h_kv = 1), the memory-bound small-h_q case, long and empty requests.
MLA_CASES = [
    (1, 1, 20, 1, 1, False, False),
    (4, 1, 8192, 16, 1, True, False),
    (2, 2, 8192, 128, 1, False, True),
    (64, 1, 1000, 128, 1, True, False),
    (3, 2, 140, 64, 2, True, True),
    (6, 4, 333, 9, 1, True, True),
]


@pytest.mark.parametrize("case", MLA_CASES, ids=str)
def test_mla_decode_matches_reference_and_xla(case):
  _require_cuda_handler(mla.MLA_DECODE)
  b, s_q, s_k, h_q, h_kv, varlen, causal = case
  rng = np.random.default_rng(hash(case) % 2**32)
  seqlens = ref.lengths_for(rng, b, s_k, s_q, varlen)
  if b > 2:
    seqlens[1] = 0  # an empty request: out 0, lse +inf
  kv, table = ref.paged_cache(rng, seqlens, h_kv=h_kv)  # NaN-poisoned, permuted pages
  q = ref.queries(rng, b, s_q, h_q)
  want_out, want_lse = ref.decode(q, kv, table, seqlens, SCALE, causal)
  def run(impl):
    fn = functools.partial(mla.mla_decode, softmax_scale=SCALE, causal=causal, impl=impl)
    return jax.jit(fn)(q, kv, table, seqlens)

  out, lse = run("ffi")
  ref.check_decode(out, lse, want_out, want_lse)
  xla_out, xla_lse = run("xla")
  ref.check_decode(out, lse, np.asarray(xla_out, np.float64), np.asarray(xla_lse, np.float64))


@pytest.mark.parametrize("page", [64, 61])
@pytest.mark.parametrize("h_q, s_q", [(128, 1), (16, 2)])
def test_mla_decode_fp8_cache(page, h_q, s_q):
  _require_cuda_handler(mla.MLA_DECODE)
  rng = np.random.default_rng(page + h_q)
  seqlens = np.array([1000, 7, 0, 4100], np.int32)
  dense, table = ref.paged_cache(rng, seqlens, h_kv=1, page=page, dtype=np.float32)
  records = np.array(jax.jit(mla.quantize_kv_fp8)(np.nan_to_num(dense)))
  records[np.isnan(dense[..., 0])] = 0xFF  # poison unused rows: NaN values and NaN scales
  q = ref.queries(rng, len(seqlens), s_q, h_q)
  want_out, want_lse = ref.decode(q, records, table, seqlens, SCALE, True,
                                  tokens_of=ref.dequantize_fp8)
  fn = functools.partial(mla.mla_decode, softmax_scale=SCALE, causal=True, kv_format="fp8",
                         impl="ffi")
  out, lse = jax.jit(fn)(q, records, table, seqlens)
  ref.check_decode(out, lse, want_out, want_lse)
