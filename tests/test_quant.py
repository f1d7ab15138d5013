"""jaxinfra.quant: the custom call against the pure-JAX path (bit for bit), both
against an independent NumPy/ml_dtypes reference, round-trip error, non-finite
input, transformations, and argument validation."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfra import quant

E4M3 = ml_dtypes.float8_e4m3fn


def wide_range_input(key, shape, dtype):
  """Normal values times 10^[-4, 4] per row, some exact zeros and subnormals."""
  k1, k2, k3 = jax.random.split(key, 3)
  x = jax.random.normal(k1, shape, jnp.float32)
  x = x * 10.0 ** jax.random.uniform(k2, shape[:-1] + (1,), minval=-4, maxval=4)
  pick = jax.random.uniform(k3, shape)
  x = jnp.where(pick < 0.02, 0.0, x)
  x = jnp.where((pick > 0.02) & (pick < 0.03), x * 1e-40, x)  # float32 subnormals
  return np.asarray(x.astype(dtype))


def bits(a):
  a = np.asarray(a)
  return a.view(np.uint8 if a.dtype.itemsize == 1 else np.uint32)


def assert_same_bits(got, want):
  """Equal bit patterns; NaNs must sit in the same places (payload ignored)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape
  got_nan = np.isnan(got.astype(np.float32))
  np.testing.assert_array_equal(got_nan, np.isnan(want.astype(np.float32)))
  np.testing.assert_array_equal(bits(got)[~got_nan], bits(want)[~got_nan])


def reference_per_token(x, block, ue8m0):
  """float32 NumPy + ml_dtypes rounding, written independently of jaxinfra."""
  x = np.asarray(x).astype(np.float32)
  *lead, m, k = x.shape
  groups = -(-k // block)
  scales = np.empty((*lead, m, groups), np.float32)
  q = np.empty(x.shape, E4M3)
  for g in range(groups):
    part = x[..., g * block:(g + 1) * block]
    amax = np.max(np.abs(part), axis=-1)
    scale = np.maximum(amax, np.float32(1e-4)) * np.float32(1 / 448)
    if ue8m0:
      scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
    scales[..., g] = scale
    inv = np.float32(1) / scale
    q[..., g * block:(g + 1) * block] = np.clip(part * inv[..., None], -448, 448).astype(E4M3)
  return q, scales


def reference_per_block(w, block, ue8m0):
  w = np.asarray(w).astype(np.float32)
  bn, bk = block
  *lead, n, k = w.shape
  # A block is a per-token group of the transposed-and-reshaped tile; loop plainly.
  rb, cb = -(-n // bn), -(-k // bk)
  scales = np.empty((*lead, rb, cb), np.float32)
  q = np.empty(w.shape, E4M3)
  for i in range(rb):
    for j in range(cb):
      tile = w[..., i * bn:(i + 1) * bn, j * bk:(j + 1) * bk]
      amax = np.max(np.abs(tile), axis=(-2, -1))
      scale = np.maximum(amax, np.float32(1e-4)) * np.float32(1 / 448)
      if ue8m0:
        scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
      scales[..., i, j] = scale
      inv = np.float32(1) / scale
      q[..., i * bn:(i + 1) * bn, j * bk:(j + 1) * bk] = np.clip(
          tile * inv[..., None, None], -448, 448).astype(E4M3)
  return q, scales


DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]
TOKEN_SHAPES = [(4, 200), (2, 3, 17, 300), (1, 1), (5, 128), (3, 1000)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", TOKEN_SHAPES)
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_per_token_ffi_equals_xla_equals_reference(dtype, shape, block, ue8m0):
  x = wide_range_input(jax.random.key(sum(shape) + block), shape, dtype)
  q_ref, s_ref = reference_per_token(x, block, ue8m0)
  for impl in ("ffi", "xla"):
    fn = jax.jit(functools.partial(quant.quantize_per_token, block=block, ue8m0=ue8m0,
                                   impl=impl))
    q, s = fn(x)
    assert q.dtype == jnp.float8_e4m3fn and q.shape == x.shape
    assert s.dtype == jnp.float32 and s.shape == (*shape[:-1], -(-shape[-1] // block))
    assert_same_bits(s, s_ref)
    assert_same_bits(q, q_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(256, 384), (200, 300), (3, 130, 129), (1, 1)])
@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_per_block_ffi_equals_xla_equals_reference(dtype, shape, block, ue8m0):
  w = wide_range_input(jax.random.key(sum(shape)), shape, dtype)
  q_ref, s_ref = reference_per_block(w, block, ue8m0)
  for impl in ("ffi", "xla"):
    q, s = jax.jit(functools.partial(quant.quantize_per_block, block=block, ue8m0=ue8m0,
                                     impl=impl))(w)
    assert_same_bits(s, s_ref)
    assert_same_bits(q, q_ref)


def e4m3_rounding_cases():
  """Every e4m3 magnitude, the midpoints between neighbours and one float32 ulp
  either side of each midpoint, all below 400."""
  grid = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)))
  grid = grid[np.isfinite(grid) & (grid <= 400)]
  mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
  cases = np.concatenate([grid, mids, np.nextafter(mids, np.float32(0)),
                          np.nextafter(mids, np.float32(np.inf))])
  return np.concatenate([cases, -cases])


@pytest.mark.parametrize("impl", ["ffi", "xla"])
def test_rounding_ties_to_even_against_ml_dtypes(impl):
  # With amax = 200 and ue8m0, the scale is exactly 0.5, so x / scale = 2x exactly
  # and each quantized value is the e4m3 rounding of a chosen float32.
  targets = e4m3_rounding_cases()
  x = np.concatenate([[200.0], targets / 2]).astype(np.float32)[None, :]
  q, s = quant.quantize_per_token(x, block=128, ue8m0=True, impl=impl)
  np.testing.assert_array_equal(np.asarray(s), 0.5)
  want = np.concatenate([[400.0], targets]).astype(np.float32).astype(E4M3)
  assert_same_bits(q[0], want)


@pytest.mark.parametrize("impl", ["ffi", "xla"])
@pytest.mark.parametrize("ue8m0", [False, True])
def test_round_trip_relative_error(impl, ue8m0):
  x = wide_range_input(jax.random.key(7), (64, 1000), jnp.float32)
  q, s = quant.quantize_per_token(x, ue8m0=ue8m0, impl=impl)
  x_back = np.asarray(quant.dequantize_per_token(q, s)).astype(np.float64)
  x64 = x.astype(np.float64)
  scale = np.repeat(np.asarray(s, np.float64), 128, axis=-1)[:, :1000]
  normal = np.abs(x64) / scale >= 2.0**-6  # away from e4m3 underflow
  assert normal.mean() > 0.9
  rel = np.abs(x_back - x64)[normal] / np.abs(x64)[normal]
  assert rel.max() <= 2.0**-4
  # Below it, the absolute error is at most half a subnormal step.
  assert np.all(np.abs(x_back - x64)[~normal] <= 2.0**-10 * scale[~normal] * (1 + 1e-6))
  w = wide_range_input(jax.random.key(8), (300, 260), jnp.float32).astype(np.float64)
  wq, ws = quant.quantize_per_block(w.astype(np.float32), ue8m0=ue8m0, impl=impl)
  w_back = np.asarray(quant.dequantize_per_block(wq, ws)).astype(np.float64)
  wscale = np.repeat(np.repeat(np.asarray(ws, np.float64), 128, 0), 128, 1)[:300, :260]
  normal = np.abs(w) / wscale >= 2.0**-6
  assert np.all(np.abs(w_back - w)[normal] <= 2.0**-4 * np.abs(w)[normal])


@pytest.mark.parametrize("impl", ["ffi", "xla"])
def test_non_finite_input_poisons_only_its_group(impl):
  x = np.ones((3, 384), np.float32)
  x[0, 5] = np.nan
  x[1, 130] = np.inf
  x[2, 300] = -np.inf
  q, s = quant.quantize_per_token(x, impl=impl)
  q, s = np.asarray(q).astype(np.float32), np.asarray(s)
  assert np.isnan(s[0, 0]) and np.isnan(q[0, :128]).all()
  assert s[1, 1] == np.inf and np.isnan(q[1, 130]) and (q[1, 128:256][np.arange(128) != 2] == 0).all()
  assert s[2, 2] == np.inf and np.isnan(q[2, 300])
  finite_groups = np.isfinite(s)
  assert finite_groups.sum() == 9 - 3
  np.testing.assert_array_equal(s[finite_groups], np.float32(1) * np.float32(1 / 448))
  assert (q[0, 128:] == 448).all() and (q[1, :128] == 448).all()
  back = np.asarray(quant.dequantize_per_token(*quant.quantize_per_token(x, impl=impl)))
  assert np.isnan(back[0, :128]).all() and np.isnan(back[1, 128:256]).all()
  assert np.isfinite(back[0, 128:]).all()

  w = np.ones((256, 256), np.float32)
  w[200, 10] = np.nan
  wq, ws = quant.quantize_per_block(w, impl=impl)
  assert np.isnan(np.asarray(ws)[1, 0]) and np.isfinite(np.asarray(ws)).sum() == 3
  assert np.isnan(np.asarray(wq)[128:, :128].astype(np.float32)).all()


def test_empty_rows():
  x = np.zeros((0, 300), np.float32)
  for impl in ("ffi", "xla"):
    q, s = quant.quantize_per_token(x, impl=impl)
    assert q.shape == (0, 300) and s.shape == (0, 3)


@pytest.mark.parametrize("in_axes", [0, 1])
def test_vmap(in_axes):
  x = wide_range_input(jax.random.key(3), (5, 6, 200), jnp.bfloat16)
  for op in (functools.partial(quant.quantize_per_token, block=64),
             functools.partial(quant.quantize_per_block, block=(32, 128))):
    got = jax.jit(jax.vmap(functools.partial(op, impl="ffi"), in_axes=in_axes))(x)
    want = jax.vmap(functools.partial(op, impl="xla"), in_axes=in_axes)(x)
    per_slice = [op(np.take(x, i, axis=in_axes), impl="ffi") for i in range(x.shape[in_axes])]
    for g, w, idx in zip(got, want, range(2)):
      assert_same_bits(g, w)
      assert_same_bits(g, np.stack([p[idx] for p in per_slice]))


def test_shard_map_over_8_devices():
  assert len(jax.devices()) == 8
  mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
  x = wide_range_input(jax.random.key(4), (64, 300), jnp.float32)
  w = wide_range_input(jax.random.key(5), (8, 200, 130), jnp.bfloat16)
  for op, arg in ((quant.quantize_per_token, x), (quant.quantize_per_block, w)):
    sharded = jax.jit(jax.shard_map(functools.partial(op, impl="ffi"), mesh=mesh,
                                    in_specs=P("x"), out_specs=(P("x"), P("x"))))
    arg = jax.device_put(arg, jax.NamedSharding(mesh, P("x")))
    got = sharded(arg)
    want = op(np.asarray(arg), impl="xla")
    assert len(got[0].sharding.device_set) == 8
    for g, wv in zip(got, want):
      assert_same_bits(g, wv)


def lowered_text(fn, *args, platform="cpu"):
  # A fresh function each time: jit caches traces per function, and the kill
  # switch is read when tracing.
  traced = jax.jit(lambda *a: fn(*a)).trace(*args)
  return traced.lower(lowering_platforms=(platform,)).as_text()


def test_auto_uses_the_custom_call_on_cpu_and_the_kill_switch_turns_it_off(monkeypatch):
  x = np.ones((4, 256), np.float32)
  target = "jaxinfra_quantize_per_token"
  assert target in lowered_text(functools.partial(quant.quantize_per_token, impl="auto"), x)
  assert target not in lowered_text(functools.partial(quant.quantize_per_token, impl="xla"), x)
  monkeypatch.setenv("JAXINFRA_DISABLE_CUSTOM_CALLS", "quantize_per_token")
  assert target not in lowered_text(functools.partial(quant.quantize_per_token, impl="auto"), x)
  assert "jaxinfra_quantize_per_block" in lowered_text(quant.quantize_per_block, x)
  with pytest.warns(RuntimeWarning, match="overridden"):
    text = lowered_text(functools.partial(quant.quantize_per_token, block=64, impl="ffi"), x)
  assert target not in text
  monkeypatch.setenv("JAXINFRA_DISABLE_CUSTOM_CALLS", "all")
  assert "jaxinfra_quantize_per_block" not in lowered_text(quant.quantize_per_block, x)


def test_auto_never_selects_cuda_kernels_that_were_not_verified_on_a_gpu():
  # The GPU rule: CUDA code is selected by impl="auto" only after its tests passed
  # on a GPU, which is recorded in `verified`.
  x = np.ones((4, 256), np.float32)
  for call, op in ((quant.QUANTIZE_PER_TOKEN, quant.quantize_per_token),
                   (quant.QUANTIZE_PER_BLOCK, quant.quantize_per_block)):
    if "cuda" not in call.verified:
      assert call.target not in lowered_text(op, x, platform="cuda")
    assert call.target in lowered_text(op, x, platform="cpu")


@pytest.mark.parametrize("impl", ["ffi", "xla", "auto"])
def test_not_differentiable(impl):
  x = np.ones((2, 128), np.float32)

  def loss(v):
    q, s = quant.quantize_per_token(v, impl=impl)
    return quant.dequantize_per_token(q, s).sum()

  with pytest.raises(TypeError, match="quantize_per_token is not differentiable"):
    jax.grad(loss)(x)
  stopped = jax.grad(lambda v: loss(jax.lax.stop_gradient(v)) + v.sum())(x)
  np.testing.assert_array_equal(stopped, 1.0)


def test_dequantize_is_differentiable_in_scales():
  q, s = quant.quantize_per_token(np.arange(1, 257, dtype=np.float32)[None], impl="xla")
  grad = jax.grad(lambda scales: quant.dequantize_per_token(q, scales).sum())(s)
  want = [np.asarray(q[0, :128]).astype(np.float32).sum(),
          np.asarray(q[0, 128:]).astype(np.float32).sum()]
  np.testing.assert_allclose(grad[0], want, rtol=1e-6)


@pytest.mark.parametrize("call, match", [
    (lambda: quant.quantize_per_token(np.ones((4, 8), np.int32)), r"x must be float32.*int32.*\(4, 8\)"),
    (lambda: quant.quantize_per_token(np.ones((4, 8), E4M3)), r"x must be float32.*float8_e4m3fn"),
    (lambda: quant.quantize_per_token(np.ones((8,), np.float32)), r"x must have shape \[\.\.\., m, k\].*\(8,\)"),
    (lambda: quant.quantize_per_token(np.ones((4, 0), np.float32)), r"k > 0.*\(4, 0\)"),
    (lambda: quant.quantize_per_token(np.ones((4, 8), np.float32), block=96), r"block must be one of"),
    (lambda: quant.quantize_per_token(np.ones((4, 8), np.float32), block=True), r"block must be an int"),
    (lambda: quant.quantize_per_token(np.ones((4, 8), np.float32), impl="cuda"), r"impl must be one of"),
    (lambda: quant.quantize_per_block(np.ones((0, 8), np.float32)), r"n > 0 and k > 0.*\(0, 8\)"),
    (lambda: quant.quantize_per_block(np.ones((4, 8), np.float32), block=128), r"block must be a pair"),
    (lambda: quant.quantize_per_block(np.ones((4, 8), np.float32), block=(128, 100)), r"block\[1\] must be one of"),
    (lambda: quant.dequantize_per_token(np.ones((4, 256), E4M3), np.ones((4, 3), np.float32)), r"scales must be float32 of shape \(4, 2\)"),
    (lambda: quant.dequantize_per_token(np.ones((4, 256), np.float32), np.ones((4, 2), np.float32)), r"x_fp8 must be float8_e4m3fn"),
    (lambda: quant.dequantize_per_block(np.ones((4, 256), E4M3), np.ones((1, 2), np.float16)), r"w_fp8 of shape \(4, 256\), got float16"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_bad_static_arguments_raise_under_jit():
  with pytest.raises(ValueError, match=r"x must have shape"):
    jax.jit(quant.quantize_per_token).lower(jax.ShapeDtypeStruct((16,), jnp.float32))
