"""jaxinfra.gemm's FP8 training layers: gradients against bf16 and fp32 autodiff
(calc_diff < 1e-3), the grouped layer against ragged_dot, the NNX modules, a
300-step run of examples/fp8_training.py's MLP against bf16, shard_map with
experts over 8 devices."""

import functools
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxinfra import gemm
from jaxinfra.testing.numerics import calc_diff

IMPLS = ("ffi", "xla")


def normal(seed, shape, scale=1.0, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, dtype)


def value_and_grads(fn, x, w, cotangent):
  """(y, dx, dw) of fn(x, w), with the loss sum(fn(x, w) * cotangent) in float32."""
  def loss(x_, w_):
    y = fn(x_, w_)
    return jnp.sum(y.astype(jnp.float32) * cotangent), y
  (_, y), (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)
  return y, dx, dw


def bf16_linear(x, w):
  return jnp.einsum("...k,nk->...n", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                    preferred_element_type=jnp.float32).astype(x.dtype)


def f32_linear(x, w):
  return jnp.einsum("...k,nk->...n", x.astype(jnp.float32), w,
                    precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_linear_gradients_against_bf16_and_fp32_autodiff(impl):
  x = normal(0, (3, 70, 260), dtype=jnp.bfloat16)    # k, n and tokens not multiples of 128
  w = normal(1, (200, 260), 0.05)                       # float32 master weights
  dy = normal(2, (3, 70, 200))
  y8, dx8, dw8 = value_and_grads(functools.partial(gemm.fp8_linear, impl=impl), x, w, dy)
  assert y8.dtype == jnp.bfloat16 and dx8.dtype == jnp.bfloat16 and dw8.dtype == jnp.float32
  assert y8.shape == (3, 70, 200)
  for reference in (bf16_linear, f32_linear):
    y, dx, dw = value_and_grads(reference, x, w, dy)
    assert calc_diff(y8, y) < 1e-3
    assert calc_diff(dx8, dx) < 1e-3
    assert calc_diff(dw8, dw) < 1e-3


def test_fp8_linear_impls_agree_and_float32_activations_stay_float32():
  x, w, dy = normal(0, (130, 128)), normal(1, (64, 128), 0.1), normal(2, (130, 64))
  outs = [value_and_grads(functools.partial(gemm.fp8_linear, impl=impl), x, w, dy)
          for impl in IMPLS]
  for got, want in zip(*outs):
    assert got.dtype == jnp.float32
    assert calc_diff(got, want) < 1e-6


def ragged_reference(x, w, group_sizes):
  return jax.lax.ragged_dot(x.astype(jnp.float32), jnp.swapaxes(w, 1, 2), group_sizes,
                            precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("impl", IMPLS)
def test_fp8_grouped_linear_against_ragged_dot(impl):
  sizes = jnp.asarray([100, 0, 150, 30], jnp.int32)   # 20 rows past the last group
  x = normal(0, (300, 260), dtype=jnp.bfloat16)
  w = normal(1, (4, 200, 260), 0.05)
  dy = normal(2, (300, 200))
  fn = functools.partial(gemm.fp8_grouped_linear, group_sizes=sizes, impl=impl)
  y8, dx8, dw8 = value_and_grads(lambda x_, w_: fn(x_, w_), x, w, dy)
  y, dx, dw = value_and_grads(lambda x_, w_: ragged_reference(x_, w_, sizes), x, w, dy)
  assert y8.shape == (300, 200) and dw8.shape == w.shape
  assert calc_diff(y8, y) < 1e-3
  assert calc_diff(dx8, dx) < 1e-3
  for g in (0, 2, 3):
    assert calc_diff(dw8[g], dw[g]) < 1e-3
  np.testing.assert_array_equal(dw8[1], 0)       # an expert without tokens gets no gradient
  np.testing.assert_array_equal(y8[280:], 0)     # rows in no group: zero output and gradient
  np.testing.assert_array_equal(dx8[280:], 0)


def test_fp8_grouped_linear_clamps_device_group_sizes():
  x, w = normal(0, (10, 128)), normal(1, (3, 8, 128))
  got = gemm.fp8_grouped_linear(x, w, jnp.asarray([-2, 6, 9]), impl="ffi")   # -> 0, 6, 4
  want = ragged_reference(x, w, jnp.asarray([0, 6, 4]))
  assert calc_diff(got, want) < 1e-3


def test_nnx_modules():
  rngs = nnx.Rngs(0)
  dense = gemm.Fp8Dense(260, 70, rngs=rngs)
  assert dense.kernel[...].shape == (70, 260) and dense.kernel[...].dtype == jnp.float32
  assert dense.bias[...].shape == (70,)
  # LeCun normal over [out, in]: fan in is the last axis.
  assert 0.5 / np.sqrt(260) < float(jnp.std(dense.kernel[...])) < 1.5 / np.sqrt(260)
  dense.bias[...] = normal(5, (70,))
  x = normal(2, (2, 5, 260), dtype=jnp.bfloat16)
  y = dense(x)
  assert y.dtype == jnp.bfloat16 and y.shape == (2, 5, 70)
  want = gemm.fp8_linear(x, dense.kernel[...]) + dense.bias[...].astype(jnp.bfloat16)
  np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(want, np.float32))
  assert gemm.Fp8Dense(8, 4, use_bias=False, dtype=jnp.bfloat16, rngs=rngs)(
      jnp.ones((3, 8))).dtype == jnp.bfloat16

  grouped = gemm.Fp8GroupedDense(4, 128, 64, rngs=rngs)
  assert grouped.kernel[...].shape == (4, 64, 128)
  sizes = jnp.asarray([3, 0, 5, 2])
  x = normal(3, (10, 128))
  np.testing.assert_array_equal(grouped(x, sizes),
                                gemm.fp8_grouped_linear(x, grouped.kernel[...], sizes))
  grads = nnx.grad(lambda m: jnp.sum(m(x, sizes) ** 2))(grouped)
  assert grads.kernel[...].shape == (4, 64, 128)
  np.testing.assert_array_equal(grads.kernel[...][1], 0)


def _fp8_training_example():
  """examples/fp8_training.py as a module: its MLP, bf16 baseline layer and training loop."""
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                      "fp8_training.py")
  spec = importlib.util.spec_from_file_location("fp8_training_example", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_mlp_trained_300_steps_with_fp8_dense_ends_within_2_percent_of_bf16():
  # 16 classes of a random tanh teacher; every layer of the student is Fp8Dense.
  inputs = normal(0, (1024, 128))
  hidden = jnp.tanh(inputs @ normal(5, (128, 256), 1 / np.sqrt(128)))
  labels = jnp.argmax(hidden @ normal(6, (256, 16), 1 / np.sqrt(256)), axis=1)
  # The example's MLP (Fp8Dense or its Bf16Dense layers) and 300 Adam steps, batch 128.
  example = _fp8_training_example()
  fp8_loss, fp8_curve = example.train(gemm.Fp8Dense, inputs, labels, steps=300)
  bf16_loss, bf16_curve = example.train(example.Bf16Dense, inputs, labels, steps=300)
  assert np.isfinite(fp8_curve).all() and np.isfinite(bf16_curve).all()
  assert fp8_loss < 0.05 * np.log(16) and bf16_loss < 0.05 * np.log(16)   # both learned
  assert abs(fp8_loss - bf16_loss) <= 0.02 * bf16_loss, (fp8_loss, bf16_loss)


# The xla path under shard_map is slow to compile on CPU; the custom call runs by default.
@pytest.mark.parametrize("impl", ["ffi", pytest.param("xla", marks=pytest.mark.slow)])
def test_fp8_grouped_linear_in_shard_map_with_experts_over_8_devices(impl):
  mesh = jax.make_mesh((8,), ("e",), axis_types=(jax.sharding.AxisType.Explicit,))
  tokens, k, n = 96, 128, 64
  x = normal(0, (8 * tokens, k))
  w = normal(1, (16, n, k), 0.1)                        # 2 experts per device
  sizes = jnp.asarray(np.random.default_rng(2).integers(0, 48, (16,)), jnp.int32)
  dy = normal(3, (8 * tokens, n))

  def loss(x_, w_, sizes_, dy_):
    y = gemm.fp8_grouped_linear(x_, w_, sizes_, impl=impl)
    return jax.lax.psum(jnp.sum(y * dy_), "e"), y

  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  sharded = jax.jit(jax.shard_map(grad, mesh=mesh, in_specs=P("e"),
                                  out_specs=((P(), P("e")), (P("e"), P("e")))))
  put = lambda a: jax.device_put(a, jax.NamedSharding(mesh, P("e")))
  (_, y), (dx, dw) = sharded(put(x), put(w), put(sizes), put(dy))
  assert len(dw.sharding.device_set) == 8
  y, dx, dw = np.asarray(y), np.asarray(dx), np.asarray(dw)
  for dev in range(8):
    rows, experts = slice(dev * tokens, (dev + 1) * tokens), slice(2 * dev, 2 * dev + 2)
    want_y, want_dx, want_dw = value_and_grads(
        lambda x_, w_: ragged_reference(x_, w_, sizes[experts]), x[rows], w[experts], dy[rows])
    assert calc_diff(y[rows], want_y) < 1e-3
    assert calc_diff(dx[rows], want_dx) < 1e-3
    assert calc_diff(dw[experts], want_dw) < 1e-3


@pytest.mark.parametrize("call, match", [
    (lambda: gemm.fp8_linear(jnp.ones((4, 8), jnp.int32), jnp.ones((2, 8))), r"x must be float32, bfloat16 or float16 of shape \[\.\.\., k\], got int32"),
    (lambda: gemm.fp8_linear(jnp.ones((4, 8)), jnp.ones((2, 8, 1))), r"w must be .* of shape \[n, k\].*\(2, 8, 1\)"),
    (lambda: gemm.fp8_linear(jnp.ones((4, 8)), jnp.ones((2, 9))), r"must share k > 0, got x of shape \(4, 8\) and w of shape \(2, 9\)"),
    (lambda: gemm.fp8_grouped_linear(jnp.ones((4, 8)), jnp.ones((2, 3, 8)), jnp.ones(3, jnp.int32)), r"group_sizes must be an integer array of shape \(2,\)"),
    (lambda: gemm.fp8_grouped_linear(jnp.ones((4, 8)), jnp.ones((2, 3, 8)), jnp.ones(2)), r"group_sizes must be an integer array"),
    (lambda: gemm.fp8_grouped_linear(jnp.ones((4, 8)), jnp.ones((2, 3, 7)), jnp.ones(2, jnp.int32)), r"must share k > 0"),
    (lambda: gemm.fp8_grouped_linear(jnp.ones((2, 4, 8)), jnp.ones((2, 3, 8)), jnp.ones(2, jnp.int32)), r"x must be .* of shape \[M, k\]"),
])
def test_bad_arguments_raise_value_error_naming_them(call, match):
  with pytest.raises(ValueError, match=match):
    call()
