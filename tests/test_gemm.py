"""jaxinfra.gemm's FP8 GEMMs: both implementations against the float64 product of
the unquantized inputs (DeepGEMM's calc_diff < 1e-3) and elementwise against an
independent float64 NumPy model of the quantized arithmetic; the custom call
against the xla path (calc_diff < 1e-6); data-dependent layout rules; the
kernel-layout helpers; jit, vmap, shard_map; argument validation."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfra import gemm, quant
from jaxinfra.testing.numerics import calc_diff

IMPLS = ("ffi", "xla")


def normal(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


_per_token = jax.jit(functools.partial(quant.quantize_per_token, impl="ffi"))
_per_block = jax.jit(functools.partial(quant.quantize_per_block, impl="ffi"))


def per_token(x):
  return tuple(np.asarray(v) for v in _per_token(x))


def per_block(w):
  return tuple(np.asarray(v) for v in _per_block(w))


# --- an independent float64 model of the quantized arithmetic -----------------------------------


def expand_token_scales(s, k):
  """[..., rows, KB] -> [..., rows, k]."""
  return np.repeat(np.asarray(s, np.float64), 128, axis=-1)[..., :k]


def expand_block_scales(s, n, k):
  """[..., NB, KB] -> [..., n, k]."""
  s = np.repeat(np.repeat(np.asarray(s, np.float64), 128, axis=-2), 128, axis=-1)
  return s[..., :n, :k]


def dequant(q, scales):
  return np.asarray(q).astype(np.float64) * scales


def assert_matches_model(got, want, scale_rows=None):
  """Elementwise agreement to float32 accumulation error: |got - want| is bounded
  by a few ulps of the sum of absolute products (the accumulation's error scale)."""
  got = np.asarray(got, np.float64)
  bound = 1e-5 * (scale_rows if scale_rows is not None else np.abs(want)) + 1e-30
  assert np.all(np.abs(got - want) <= bound), np.max(np.abs(got - want) / bound)


def magnitude(a_deq, b_deq):
  """Sum of |products| per output element: the scale of float32 rounding error."""
  return np.abs(a_deq) @ np.abs(b_deq).T


# --- dense ---------------------------------------------------------------------------------------

DENSE_SHAPES = [(64, 256, 512), (200, 300, 520), (1, 129, 1000), (130, 1, 128), (17, 8, 40)]


@pytest.mark.parametrize("m, n, k", DENSE_SHAPES)
def test_fp8_gemm_against_fp32_and_the_quantized_model(m, n, k):
  x, w = normal(m + n, (m, k)), normal(k, (n, k), 0.1)
  xq, xs = per_token(x)
  wq, ws = per_block(w)
  exact = x.astype(np.float64) @ w.astype(np.float64).T
  a_deq, b_deq = dequant(xq, expand_token_scales(xs, k)), dequant(wq, expand_block_scales(ws, n, k))
  model = a_deq @ b_deq.T
  got = {}
  for impl in IMPLS:
    for out_dtype in (jnp.float32, jnp.bfloat16):
      d = jax.jit(functools.partial(gemm.fp8_gemm, out_dtype=out_dtype, impl=impl))(xq, xs, wq, ws)
      assert d.shape == (m, n) and d.dtype == out_dtype
      assert calc_diff(d, exact) < 1e-3
      got[impl, np.dtype(out_dtype).name] = np.asarray(d)
    assert_matches_model(got[impl, "float32"], model, magnitude(a_deq, b_deq))
    # bfloat16 output is the float32 result rounded once.
    np.testing.assert_array_equal(got[impl, "bfloat16"],
                                  got[impl, "float32"].astype(jnp.bfloat16))
  assert calc_diff(got["ffi", "float32"], got["xla", "float32"]) < 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_gemm_accumulates_into_c_and_takes_per_token_b_scales(impl):
  # The wgrad recipe: dW = dy^T x with 1 x 128 scales along the token axis on both sides.
  tokens, n, k = 300, 96, 200
  dy, x = normal(1, (tokens, n)), normal(2, (tokens, k))
  aq, as_ = per_token(dy.T)
  bq, bs = per_token(x.T)
  c = normal(3, (n, k))
  d = gemm.fp8_gemm(aq, as_, bq, bs, out_dtype=jnp.float32, c=c, impl=impl)
  exact = c + dy.T.astype(np.float64) @ x.astype(np.float64)
  assert calc_diff(d, exact) < 1e-3
  a_deq = dequant(aq, expand_token_scales(as_, tokens))
  b_deq = dequant(bq, expand_token_scales(bs, tokens))
  assert_matches_model(np.asarray(d) - c, a_deq @ b_deq.T, magnitude(a_deq, b_deq) + np.abs(c))
  other = gemm.fp8_gemm(aq, as_, bq, bs, out_dtype=jnp.float32, c=c,
                        impl="xla" if impl == "ffi" else "ffi")
  assert calc_diff(d, other) < 1e-6


def test_scales_are_applied_per_k_block():
  # Each K block of a row has its own scale: blocks of 1s with scales 1, 2, 4, ...
  k = 128 * 4
  a = np.ones((2, k), np.float32).astype(ml_dtypes.float8_e4m3fn)
  a_scales = np.array([[1, 2, 4, 8], [0.5, 0.25, 0, 1]], np.float32)
  b = np.ones((3, k), np.float32).astype(ml_dtypes.float8_e4m3fn)
  b_scales = np.array([[1, 10, 100, 1000]], np.float32)
  want = 128 * (a_scales * b_scales).sum(axis=1, keepdims=True) * np.ones((1, 3))
  for impl in IMPLS:
    d = gemm.fp8_gemm(a, a_scales, b, b_scales, out_dtype=jnp.float32, impl=impl)
    np.testing.assert_array_equal(d, want)


def test_k_padding_to_16_for_the_kernel_layout_does_not_change_results():
  m, n, k = 5, 7, 37   # k % 16 != 0: the custom call gets k padded to 48
  x, w = normal(1, (m, k)), normal(2, (n, k))
  xq, xs = per_token(x)
  wq, ws = per_block(w)
  assert gemm._layout.pad_k(jnp.asarray(xq)).shape == (m, 48)
  d = {impl: gemm.fp8_gemm(xq, xs, wq, ws, out_dtype=jnp.float32, impl=impl) for impl in IMPLS}
  assert calc_diff(d["ffi"], d["xla"]) < 1e-6
  assert calc_diff(d["ffi"], x.astype(np.float64) @ w.T) < 1e-3


# --- grouped, contiguous -------------------------------------------------------------------------


def grouped_problem(sizes, rows=400, n=200, k=300, seed=0):
  """x [rows, k] whose first sum(sizes) rows are grouped by expert, w [G, n, k],
  and the float64 product of each grouped row with its expert's weights."""
  sizes = np.asarray(sizes)
  x, w = normal(seed, (rows, k)), normal(seed + 1, (len(sizes), n, k), 0.1)
  exact = np.zeros((rows, n))
  start = 0
  for g, size in enumerate(sizes):
    exact[start:start + size] = x[start:start + size].astype(np.float64) @ w[g].astype(np.float64).T
    start += size
  return x, w, exact


_to_padded = jax.jit(gemm.to_padded)
_from_padded = jax.jit(gemm.from_padded)


# One shape for every case (rows past sum(sizes) belong to no group), so the
# cases share compilations.
@pytest.mark.parametrize("sizes", [[100, 0, 250, 37], [128, 128, 0, 0], [1, 2, 3, 300]])
def test_grouped_contiguous_both_layouts(sizes):
  x, w, exact = grouped_problem(sizes)
  layout = gemm.align_groups(jnp.asarray(sizes, jnp.int32), x.shape[0])
  xq, xs = per_token(_to_padded(jnp.asarray(x), layout))
  wq, ws = per_block(w)
  padding = np.asarray(layout.m_indices) < 0
  results = []
  for impl in IMPLS:
    for layout_arg in (dict(group_ends=layout.group_ends), dict(m_indices=layout.m_indices)):
      d = gemm.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, out_dtype=jnp.float32, impl=impl,
                                           **layout_arg)
      assert d.shape == (layout.padded_rows, w.shape[1])
      assert np.all(np.asarray(d)[padding] == 0)
      assert calc_diff(_from_padded(d, layout), exact) < 1e-3
      results.append(np.asarray(d))
  assert all(calc_diff(r, results[0]) < 1e-6 for r in results)
  bf16 = gemm.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, group_ends=layout.group_ends)
  assert bf16.dtype == jnp.bfloat16


def contiguous_model(xq, xs, wq, ws, owner):
  """float64 rows: row r uses expert owner[r], zero when owner[r] < 0."""
  k, n = xq.shape[1], wq.shape[1]
  a_deq = dequant(xq, expand_token_scales(xs, k))
  b_deq = dequant(wq, expand_block_scales(ws, n, k))
  out = np.zeros((xq.shape[0], n))
  for r, g in enumerate(owner):
    if g >= 0:
      out[r] = b_deq[g] @ a_deq[r]
  return out


def test_m_indices_are_per_row_and_bad_values_give_zero_rows():
  groups, m, n, k = 3, 40, 24, 160
  x, w = normal(1, (m, k)), normal(2, (groups, n, k))
  x[5] = np.nan   # a padding row with garbage must still come out zero
  xq, xs = per_token(x)
  wq, ws = per_block(w)
  m_indices = np.random.default_rng(3).integers(-1, groups, m).astype(np.int32)  # unsorted
  m_indices[5] = -1
  m_indices[[7, 9, 11]] = [3, 1000, -7]   # outside [0, G): padding (device data only)
  owner = np.where((m_indices >= 0) & (m_indices < groups), m_indices, -1)
  model = contiguous_model(xq, xs, wq, ws, owner)
  for impl in IMPLS:
    d = np.asarray(gemm.grouped_fp8_gemm_contiguous(
        xq, xs, wq, ws, m_indices=jnp.asarray(m_indices), out_dtype=jnp.float32, impl=impl))
    assert np.all(d[owner < 0] == 0) and not np.isnan(d).any()
    np.testing.assert_allclose(d, model, rtol=1e-5, atol=1e-4)


def test_group_ends_are_clamped_and_made_non_decreasing():
  groups, m, n, k = 4, 300, 16, 128
  x, w = normal(1, (m, k)), normal(2, (groups, n, k))
  xq, xs = per_token(x)
  wq, ws = per_block(w)
  cases = {
      # (group_ends, alignment) -> owner of each row, written out by the rule
      (100, 50, 250, 1000): ([0] * 100 + [-1] * 28 + [2] * 122 + [-1] * 6 + [3] * 44),
      (-5, 0, 130, 400): ([2] * 130 + [-1] * 126 + [3] * 44),
      (10, 20, 30, 40): ([0] * 10 + [-1] * 118 + [-1] * 172),
  }
  for ends, owner in cases.items():
    owner = np.array(owner)
    assert owner.shape == (m,)
    model = contiguous_model(xq, xs, wq, ws, owner)
    for impl in IMPLS:
      d = gemm.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, group_ends=jnp.asarray(ends),
                                           out_dtype=jnp.float32, impl=impl)
      np.testing.assert_allclose(d, model, rtol=1e-5, atol=1e-4, err_msg=str(ends))
  # alignment=1: plain ragged rows, no padding between groups.
  ends = jnp.asarray([100, 100, 250, 300])
  owner = np.repeat([0, 1, 2, 3], [100, 0, 150, 50])
  for impl in IMPLS:
    d = gemm.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, group_ends=ends, alignment=1,
                                         out_dtype=jnp.float32, impl=impl)
    np.testing.assert_allclose(d, contiguous_model(xq, xs, wq, ws, owner), rtol=1e-5, atol=1e-4)


# --- grouped, masked -----------------------------------------------------------------------------


def masked_problem(groups=4, m_max=64, n=130, k=300, seed=0):
  a, w = normal(seed, (groups, m_max, k)), normal(seed + 1, (groups, n, k), 0.1)
  aq, as_ = per_token(a)
  wq, ws = per_block(w)
  exact = np.einsum("gmk,gnk->gmn", a.astype(np.float64), w.astype(np.float64))
  return (aq, as_, wq, ws), exact


def test_grouped_masked_against_fp32():
  operands, exact = masked_problem()
  masked_m = np.array([64, 10, 0, 33], np.int32)
  valid = np.arange(64)[None, :] < masked_m[:, None]
  got = {}
  for impl in IMPLS:
    d = np.asarray(gemm.grouped_fp8_gemm_masked(*operands, masked_m, out_dtype=jnp.float32,
                                                impl=impl))
    assert d.shape == exact.shape
    assert calc_diff(d[valid], exact[valid]) < 1e-3
    assert np.all(d[~valid] == 0)
    got[impl] = d
  assert calc_diff(got["ffi"], got["xla"]) < 1e-6


def test_masked_m_on_device_is_clamped_and_rows_past_it_are_zero_even_if_garbage():
  (aq, as_, wq, ws), _ = masked_problem(groups=3, m_max=16, n=8, k=128)
  aq = np.array(aq)
  aq[0, 5:] = np.uint8(0x7F).view(ml_dtypes.float8_e4m3fn)   # NaN past masked_m
  masked_m = jnp.asarray([5, -3, 99], jnp.int32)              # -> 5, 0, 16
  full = gemm.grouped_fp8_gemm_masked(aq, as_, wq, ws, jnp.asarray([16, 16, 16]),
                                      out_dtype=jnp.float32, impl="xla")
  for impl in IMPLS:
    d = np.asarray(gemm.grouped_fp8_gemm_masked(aq, as_, wq, ws, masked_m,
                                                out_dtype=jnp.float32, impl=impl))
    assert not np.isnan(d).any()
    np.testing.assert_array_equal(d[0, 5:], 0)
    np.testing.assert_array_equal(d[1], 0)
    np.testing.assert_allclose(d[0, :5], np.asarray(full)[0, :5], rtol=1e-6)
    np.testing.assert_allclose(d[2], np.asarray(full)[2], rtol=1e-6)


# --- k-grouped -----------------------------------------------------------------------------------


def k_grouped_problem(group_k, m=96, n=130, k_total=None, seed=0):
  k_total = k_total or int(np.sum(group_k))
  a, b = normal(seed, (m, k_total)), normal(seed + 1, (n, k_total))
  aq, as_ = per_token(a)
  bq, bs = per_token(b)
  return (aq, as_, bq, bs), a.astype(np.float64), b.astype(np.float64)


def test_k_grouped_against_fp32_with_and_without_c():
  group_k = np.array([128, 384, 0, 256])
  operands, a, b = k_grouped_problem(group_k, k_total=896)   # 128 trailing columns ignored
  starts = np.concatenate([[0], np.cumsum(group_k)[:-1]])
  exact = np.stack([a[:, s:s + g] @ b[:, s:s + g].T for s, g in zip(starts, group_k)])
  c = normal(5, exact.shape)
  got = {}
  for impl in IMPLS:
    d = np.asarray(gemm.k_grouped_fp8_gemm(*operands, jnp.asarray(group_k), impl=impl))
    assert d.dtype == np.float32 and d.shape == (4, 96, 130)
    for g in (0, 1, 3):
      assert calc_diff(d[g], exact[g]) < 1e-3
    np.testing.assert_array_equal(d[2], 0)
    dc = np.asarray(gemm.k_grouped_fp8_gemm(*operands, jnp.asarray(group_k), c=c, impl=impl))
    np.testing.assert_allclose(dc, c + d, rtol=1e-5, atol=1e-4)
    got[impl] = dc
  assert calc_diff(got["ffi"], got["xla"]) < 1e-6


def test_k_grouped_bad_device_group_k_gives_nan_from_the_first_bad_group_on():
  operands, a, b = k_grouped_problem([512], m=8, n=4)
  first = a[:, :128] @ b[:, :128].T
  for group_k in ([128, 100, 128], [128, -128, 128], [128, 512, 0], [128, 256, 256]):
    expect_valid = {0: True, 1: False, 2: False}
    if group_k == [128, 256, 256]:
      expect_valid = {0: True, 1: True, 2: False}    # 128 + 256 + 256 > 512
    for impl in IMPLS:
      d = np.asarray(gemm.k_grouped_fp8_gemm(*operands, jnp.asarray(group_k), impl=impl))
      for g, valid in expect_valid.items():
        assert np.isnan(d[g]).all() != valid, (group_k, impl, g)
      assert calc_diff(d[0], first) < 1e-3


# --- layouts -------------------------------------------------------------------------------------


def test_mn_major_tma_aligned_scales():
  assert [gemm.tma_aligned_size(m) for m in (1, 4, 5, 130)] == [4, 4, 8, 132]
  assert gemm.tma_aligned_size(5, element_bytes=1) == 16
  s = normal(0, (2, 130, 3))
  t = np.asarray(gemm.to_mn_major_scales(jnp.asarray(s)))
  assert t.shape == (2, 3, 132)
  np.testing.assert_array_equal(t[:, :, :130], s.transpose(0, 2, 1))
  np.testing.assert_array_equal(t[:, :, 130:], 0)
  np.testing.assert_array_equal(gemm.from_mn_major_scales(t, 130), s)
  # Element (row, kb) at kb * align(rows, 4) + row, as csrc/gemm/gemm.h says.
  flat = t[1].reshape(-1)
  assert flat[2 * 132 + 77] == s[1, 77, 2]


def test_align_groups_layout():
  sizes = np.array([3, 0, 130, 1])
  m = int(sizes.sum()) + 2   # two rows past the last group
  layout = gemm.align_groups(jnp.asarray(sizes), m)
  assert layout.padded_rows == gemm.padded_rows(m, 4) == 768   # align(136 + 4 * 127, 128)
  np.testing.assert_array_equal(layout.group_k, [128, 0, 256, 128])
  np.testing.assert_array_equal(layout.group_ends, [3, 128, 258, 385])
  m_indices = np.full(768, -1)
  m_indices[0:3], m_indices[128:258], m_indices[384:385] = 0, 2, 3
  np.testing.assert_array_equal(layout.m_indices, m_indices)
  want_map = [0, 1, 2] + list(range(128, 258)) + [384] + [768, 768]
  np.testing.assert_array_equal(layout.row_map, want_map)
  x = normal(0, (m, 5))
  padded = np.asarray(_to_padded(jnp.asarray(x), layout))
  np.testing.assert_array_equal(padded[m_indices < 0], 0)
  back = np.asarray(_from_padded(jnp.asarray(padded), layout))
  np.testing.assert_array_equal(back[:-2], x[:-2])
  np.testing.assert_array_equal(back[-2:], 0)
  # Every group starts at a multiple of 128; group_ends reproduce m_indices.
  rows = jax.jit(gemm._layout.rows_of_group_ends, static_argnums=(1, 2))(layout.group_ends, 768,
                                                                          128)
  np.testing.assert_array_equal(rows, m_indices)


def test_align_groups_clamps_bad_sizes():
  layout = gemm.align_groups(jnp.asarray([-4, 5, 10]), 8)   # 5 + 10 > 8 rows
  np.testing.assert_array_equal(layout.group_k, [0, 128, 128])
  np.testing.assert_array_equal(layout.group_ends, [0, 5, 131])
  np.testing.assert_array_equal(layout.row_map, [0, 1, 2, 3, 4, 128, 129, 130])


# --- transformations -----------------------------------------------------------------------------


def test_vmap_over_the_masked_layout():
  batch = 3
  a = normal(0, (batch, 2, 16, 200))
  w = normal(1, (batch, 2, 40, 200))
  aq, as_ = per_token(a)
  wq, ws = per_block(w)
  masked_m = np.array([[16, 3], [0, 7], [9, 16]], np.int32)
  per_slice = np.stack([np.asarray(gemm.grouped_fp8_gemm_masked(
      aq[i], as_[i], wq[i], ws[i], masked_m[i], out_dtype=jnp.float32, impl="ffi"))
                        for i in range(batch)])
  for impl in IMPLS:
    fn = functools.partial(gemm.grouped_fp8_gemm_masked, out_dtype=jnp.float32, impl=impl)
    got = np.asarray(jax.jit(jax.vmap(fn))(aq, as_, wq, ws, masked_m))
    assert calc_diff(got, per_slice) < 1e-6
    np.testing.assert_array_equal(got == 0, per_slice == 0)
  # Shared weights (in_axes None) and a vmapped dense GEMM with c.
  fn = functools.partial(gemm.fp8_gemm, out_dtype=jnp.float32, impl="ffi")
  c = normal(2, (batch, 16, 40))
  got = jax.vmap(lambda a_, s_, c_: fn(a_, s_, wq[0, 0], ws[0, 0], c=c_))(aq[:, 0], as_[:, 0], c)
  want = np.stack([np.asarray(fn(aq[i, 0], as_[i, 0], wq[0, 0], ws[0, 0], c=c[i]))
                   for i in range(batch)])
  assert calc_diff(got, want) < 1e-6


def mesh8():
  assert len(jax.devices()) == 8
  return jax.make_mesh((8,), ("e",), axis_types=(jax.sharding.AxisType.Explicit,))


def sharded(mesh, *arrays):
  return [jax.device_put(a, jax.NamedSharding(mesh, P("e"))) for a in arrays]


# The xla path under shard_map is slow to compile on CPU; the custom call runs by default.
@pytest.mark.parametrize("impl", ["ffi", pytest.param("xla", marks=pytest.mark.slow)])
def test_shard_map_with_experts_sharded_over_8_devices(impl):
  mesh = mesh8()
  # Masked: 16 experts, 2 per device.
  operands, exact = masked_problem(groups=16, m_max=32, n=64, k=256)
  masked_m = np.random.default_rng(0).integers(0, 33, 16).astype(np.int32)
  fn = jax.jit(jax.shard_map(
      functools.partial(gemm.grouped_fp8_gemm_masked, out_dtype=jnp.float32, impl=impl),
      mesh=mesh, in_specs=P("e"), out_specs=P("e")))
  d = fn(*sharded(mesh, *operands, masked_m))
  assert len(d.sharding.device_set) == 8
  valid = np.arange(32)[None, :] < masked_m[:, None]
  assert calc_diff(np.asarray(d)[valid], exact[valid]) < 1e-3
  assert np.all(np.asarray(d)[~valid] == 0)

  # Contiguous: each device holds its 2 experts' rows in its own 128-aligned layout.
  sizes = np.random.default_rng(1).integers(0, 60, (8, 2))
  rows = 256
  starts = np.stack([np.zeros(8, int), np.full(8, 128)], axis=1)
  ends = (starts + sizes).astype(np.int32)
  x, w = normal(3, (8, rows, 256)), normal(4, (16, 64, 256), 0.1)
  xq, xs = per_token(x.reshape(8 * rows, 256))
  wq, ws = per_block(w)
  fn = jax.jit(jax.shard_map(
      lambda a, s, b, bs, e: gemm.grouped_fp8_gemm_contiguous(
          a, s, b, bs, group_ends=e[0], out_dtype=jnp.float32, impl=impl),
      mesh=mesh, in_specs=P("e"), out_specs=P("e")))
  d = np.asarray(fn(*sharded(mesh, xq, xs, wq, ws, ends))).reshape(8, rows, 64)
  for dev in range(8):
    exact = np.zeros((rows, 64))
    for g in range(2):
      r = slice(starts[dev, g], ends[dev, g])
      exact[r] = x[dev, r].astype(np.float64) @ w[2 * dev + g].astype(np.float64).T
    assert calc_diff(d[dev], exact) < 1e-3
    assert np.all(d[dev][exact == 0] == 0)

  # Dense, data parallel: tokens sharded, the weights replicated on every device.
  xq, xs = per_token(normal(7, (64, 256)))
  wq, ws = per_block(normal(8, (48, 256)))
  fn = jax.jit(jax.shard_map(
      functools.partial(gemm.fp8_gemm, out_dtype=jnp.float32, impl=impl), mesh=mesh,
      in_specs=(P("e"), P("e"), P(), P()), out_specs=P("e")))
  d = fn(*sharded(mesh, xq, xs), wq, ws)
  assert calc_diff(d, gemm.fp8_gemm(xq, xs, wq, ws, out_dtype=jnp.float32, impl="xla")) < 1e-6

  # k-grouped: per device, its 2 experts' weight gradients from its own tokens.
  group_k = np.tile([128, 256], (8, 1)).astype(np.int32)
  a, b = normal(5, (8, 32, 384)), normal(6, (8, 48, 384))
  aq, as_ = per_token(a)
  bq, bs = per_token(b)
  fn = jax.jit(jax.shard_map(
      lambda a_, s_, b_, t_, g_: gemm.k_grouped_fp8_gemm(a_[0], s_[0], b_[0], t_[0], g_[0],
                                                         impl=impl)[None],
      mesh=mesh, in_specs=P("e"), out_specs=P("e")))
  d = np.asarray(fn(*sharded(mesh, aq, as_, bq, bs, group_k)))
  assert d.shape == (8, 2, 32, 48)
  for dev in range(8):
    a64, b64 = a[dev].astype(np.float64), b[dev].astype(np.float64)
    assert calc_diff(d[dev, 0], a64[:, :128] @ b64[:, :128].T) < 1e-3
    assert calc_diff(d[dev, 1], a64[:, 128:] @ b64[:, 128:].T) < 1e-3


# --- dispatch, differentiation, validation -------------------------------------------------------


def lowered_text(fn, *args, platform="cpu"):
  traced = jax.jit(lambda *a: fn(*a)).trace(*args)
  return traced.lower(lowering_platforms=(platform,)).as_text()


def test_auto_uses_the_custom_calls_on_cpu_only_and_the_kill_switch(monkeypatch):
  xq, xs = per_token(normal(0, (4, 256)))
  wq, ws = per_block(normal(1, (2, 8, 256)))
  calls = {
      "jaxinfra_fp8_gemm": (gemm.fp8_gemm, (xq, xs, wq[0], ws[0])),
      "jaxinfra_grouped_fp8_gemm_masked": (
          gemm.grouped_fp8_gemm_masked, (xq.reshape(2, 2, 256), xs.reshape(2, 2, 2), wq, ws,
                                         np.array([1, 2], np.int32))),
      "jaxinfra_grouped_fp8_gemm_contiguous": (
          lambda *a: gemm.grouped_fp8_gemm_contiguous(*a[:4], m_indices=a[4]),
          (xq, xs, wq, ws, np.array([0, 1, 1, -1], np.int32))),
      "jaxinfra_k_grouped_fp8_gemm": (
          gemm.k_grouped_fp8_gemm, (xq, xs, xq, xs, np.array([128, 128], np.int32))),
  }
  for target, (fn, args) in calls.items():
    assert target in lowered_text(fn, *args)
    assert target not in lowered_text(fn, *args, platform="cuda")   # not verified on a GPU
  monkeypatch.setenv("JAXINFRA_DISABLE_CUSTOM_CALLS", "fp8_gemm")
  assert "jaxinfra_fp8_gemm" not in lowered_text(gemm.fp8_gemm, xq, xs, wq[0], ws[0])


def test_gemms_are_not_differentiable():
  xq, xs = per_token(normal(0, (4, 256)))
  wq, ws = per_block(normal(1, (8, 256)))
  for impl in IMPLS:
    with pytest.raises(TypeError, match="fp8_gemm is not differentiable"):
      jax.grad(lambda s: gemm.fp8_gemm(xq, s, wq, ws, out_dtype=jnp.float32,
                                       impl=impl).sum())(xs)


def test_handler_rejects_a_mismatched_contract():
  # Called directly with scales in the wrong layout, the handler returns an
  # error instead of reading past the buffer.
  xq, xs = per_token(normal(0, (4, 256)))
  wq, ws = per_block(normal(1, (8, 256)))
  call = jax.ffi.ffi_call("jaxinfra_fp8_gemm", jax.ShapeDtypeStruct((4, 8), jnp.float32),
                          vmap_method="broadcast_all")
  with pytest.raises(Exception, match=r"sfa must be float32 \[2, 4\], got float32 \[4, 2\]"):
    jax.block_until_ready(call(xq, xs, wq, ws, b_per_token=False))


E4M3 = ml_dtypes.float8_e4m3fn
A = np.ones((4, 256), E4M3)
SA = np.ones((4, 2), np.float32)
B = np.ones((8, 256), E4M3)
SB = np.ones((1, 2), np.float32)
BG = np.ones((2, 8, 256), E4M3)
SBG = np.ones((2, 1, 2), np.float32)


@pytest.mark.parametrize("call, match", [
    (lambda: gemm.fp8_gemm(A.astype(np.float32), SA, B, SB), r"a must be float8_e4m3fn of shape \[m, k\].*float32.*\(4, 256\)"),
    (lambda: gemm.fp8_gemm(A, SA[:, :1], B, SB), r"a_scales must be float32 of shape \(4, 2\).*\(4, 1\)"),
    (lambda: gemm.fp8_gemm(A, SA, B[:, :128], SB), r"a and b's k must agree, got a_k=256, b_k=128"),
    (lambda: gemm.fp8_gemm(A, SA, B, np.ones((2, 2), np.float32)), r"b_scales must be float32 of shape \(1, 2\)"),
    (lambda: gemm.fp8_gemm(A, SA, B, SB, out_dtype=jnp.float16), r"out_dtype must be bfloat16 or float32"),
    (lambda: gemm.fp8_gemm(A, SA, B, SB, c=np.zeros((4, 8), np.float32)), r"with c, out_dtype must be float32"),
    (lambda: gemm.fp8_gemm(A, SA, B, SB, c=np.zeros((4, 9), np.float32), out_dtype=jnp.float32), r"c must be float32 of shape \(4, 8\)"),
    (lambda: gemm.fp8_gemm(A, SA, B, SB, impl="cuda"), r"impl must be one of"),
    (lambda: gemm.grouped_fp8_gemm_contiguous(A, SA, BG, SBG), r"exactly one of group_ends"),
    (lambda: gemm.grouped_fp8_gemm_contiguous(A, SA, BG, SBG, group_ends=[2, 1]), r"group_ends must be non-decreasing within \[0, 4\], got \[2, 1\]"),
    (lambda: gemm.grouped_fp8_gemm_contiguous(A, SA, BG, SBG, group_ends=[2, 5]), r"group_ends must be non-decreasing"),
    (lambda: gemm.grouped_fp8_gemm_contiguous(A, SA, BG, SBG, group_ends=[2]), r"group_ends must be an integer array of shape \(2,\)"),
    (lambda: gemm.grouped_fp8_gemm_contiguous(A, SA, BG, SBG, m_indices=[0, 1, 2, -1]), r"m_indices must be in \[-1, 2\)"),
    (lambda: gemm.grouped_fp8_gemm_contiguous(A, SA, BG, SBG, m_indices=np.zeros(4)), r"m_indices must be an integer array"),
    (lambda: gemm.grouped_fp8_gemm_contiguous(A, SA, BG, SBG, group_ends=[1, 2], alignment=0), r"alignment must be a positive int"),
    (lambda: gemm.grouped_fp8_gemm_contiguous(A, SA, BG, np.ones((2, 2), np.float32), m_indices=[0, 0, 0, 0]), r"b_scales must be float32 of shape \(2, 1, 2\)"),
    (lambda: gemm.grouped_fp8_gemm_masked(A.reshape(2, 2, 256), SA.reshape(2, 2, 2), BG, SBG, [3, 1]), r"masked_m must be within \[0, m_max=2\], got \[3, 1\]"),
    (lambda: gemm.grouped_fp8_gemm_masked(A.reshape(1, 4, 256), SA.reshape(1, 4, 2), BG, SBG, [3]), r"a and b's groups must agree, got a_groups=1, b_groups=2"),
    (lambda: gemm.k_grouped_fp8_gemm(A[:, :200], SA, B[:, :200], SA, [128]), r"K must be a multiple of 128.*\(4, 200\)"),
    (lambda: gemm.k_grouped_fp8_gemm(A, SA, B, SB, [128]), r"b_scales must be float32 of shape \(8, 2\)"),
    (lambda: gemm.k_grouped_fp8_gemm(A, SA, B, np.ones((8, 2), np.float32), [128, 100]), r"group_k must be non-negative multiples of 128"),
    (lambda: gemm.k_grouped_fp8_gemm(A, SA, B, np.ones((8, 2), np.float32), [256, 128]), r"summing to at most K=256"),
    (lambda: gemm.k_grouped_fp8_gemm(A, SA, B, np.ones((8, 2), np.float32), [[128]]), r"group_k must have shape \[G\]"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_static_checks_raise_under_jit():
  spec = jax.ShapeDtypeStruct
  with pytest.raises(ValueError, match=r"K must be a multiple of 128"):
    jax.jit(gemm.k_grouped_fp8_gemm).trace(
        spec((4, 200), E4M3), spec((4, 2), jnp.float32), spec((8, 200), E4M3),
        spec((8, 2), jnp.float32), spec((2,), jnp.int32))
  with pytest.raises(ValueError, match=r"b_scales must be float32"):
    jax.jit(gemm.fp8_gemm).trace(spec((4, 256), E4M3), spec((4, 2), jnp.float32),
                                 spec((8, 256), E4M3), spec((3, 2), jnp.float32))
