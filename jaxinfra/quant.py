"""Fine-grained FP8 quantization: the format DeepGEMM and DeepEP share.

Activations get one scale per token per 128 channels (1 x 128 groups), weights
one scale per 128 x 128 block; values are float8_e4m3fn, scales float32.

The contract, identical in the custom calls (CPU loops, CUDA kernels) and the
pure-JAX path, which agree bit for bit:

1. Each value is converted to float32.
2. A group's ``amax`` is the largest ``|x|`` in it (partial groups at the end of
   a row or column use the values they have).
3. ``scale = max(amax, 1e-4) * float32(1 / 448)``; with ``ue8m0=True`` it is
   then rounded *up* to a power of two (the UE8M0 format Blackwell GEMMs want).
   (DeepGEMM writes ``amax / 448``; XLA turns that division into this product,
   so the product is the form every implementation can reproduce exactly. The
   two differ by at most one float32 ulp.)
4. ``q = e4m3fn(x * (1 / scale))``, with ``1 / scale`` computed once per group
   in float32, rounded to nearest (ties to even) and saturated to +-448. (XLA
   rewrites ``x / broadcast(scale)`` into this product, so again it is the form
   all implementations share.)

Dequantization is ``q * scale``. For finite input and values whose quantized
magnitude is at least 2^-6 (e4m3's smallest normal), the round trip has a
relative error of at most 2^-4.

Non-finite input poisons only its own group, loudly: a NaN makes the group's
scale NaN and every value in the group NaN; an infinity makes the scale +inf,
the infinite values NaN and the finite ones 0, so the dequantized group is all
NaN. Other groups are unaffected.

Quantization is not differentiable: differentiating through it raises a
``TypeError`` (use a straight-through estimator, e.g.
``x + jax.lax.stop_gradient(dequantized - x)``, if you want one).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfra import _custom_call

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4
SUPPORTED_BLOCKS = (32, 64, 128)
_INPUT_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64))
_NOT_DIFFERENTIABLE_HINT = (
    "Quantize under jax.lax.stop_gradient, or write a straight-through estimator: "
    "x + jax.lax.stop_gradient(dequantized - x).")

QUANTIZE_PER_TOKEN = _custom_call.define("quantize_per_token", verified=("cpu",))
QUANTIZE_PER_BLOCK = _custom_call.define("quantize_per_block", verified=("cpu",))


# --- validation ---------------------------------------------------------------------------------


def _ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def _check_block(op: str, name: str, block) -> int:
  if isinstance(block, (bool, np.bool_)) or not isinstance(block, (int, np.integer)):
    raise ValueError(f"{op}: {name} must be an int in {SUPPORTED_BLOCKS}, got {block!r}")
  if int(block) not in SUPPORTED_BLOCKS:
    raise ValueError(f"{op}: {name} must be one of {SUPPORTED_BLOCKS}, got {block}")
  return int(block)


def _check_block_pair(op: str, block) -> tuple[int, int]:
  if not isinstance(block, Sequence) or len(block) != 2:
    raise ValueError(f"{op}: block must be a pair (block_n, block_k), got {block!r}")
  return _check_block(op, "block[0]", block[0]), _check_block(op, "block[1]", block[1])


def _check_float_matrix(op: str, name: str, x, dims: str) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype not in _INPUT_DTYPES:
    raise ValueError(f"{op}: {name} must be float32, bfloat16, float16 or float64, got "
                     f"{x.dtype} with shape {x.shape}")
  if x.ndim < 2:
    raise ValueError(f"{op}: {name} must have shape {dims} (rank >= 2), got shape {x.shape}")
  return x


def _check_quantized(op: str, name: str, x_fp8, scales,
                     blocks: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
  x_fp8, scales = jnp.asarray(x_fp8), jnp.asarray(scales)
  if x_fp8.dtype != jnp.float8_e4m3fn or x_fp8.ndim < 2:
    raise ValueError(f"{op}: {name} must be float8_e4m3fn of rank >= 2, got {x_fp8.dtype} "
                     f"with shape {x_fp8.shape}")
  *lead, rows, cols = x_fp8.shape
  expected = (*lead, _ceil_div(rows, blocks[0]), _ceil_div(cols, blocks[1]))
  if scales.dtype != jnp.float32 or scales.shape != expected:
    raise ValueError(f"{op}: scales must be float32 of shape {expected} for {name} of shape "
                     f"{x_fp8.shape}, got {scales.dtype} with shape {scales.shape}")
  return x_fp8, scales


# --- the pure-JAX path ---------------------------------------------------------------------------


def _amax(x: jax.Array, axis) -> jax.Array:
  """max |x| over ``axis``, NaN if any element is NaN.

  XLA:CPU's vectorized max-reductions can drop NaNs for some shapes (seen with
  jaxlib 0.10.2), so NaN is propagated explicitly rather than left to max().
  """
  amax = jnp.max(jnp.abs(x), axis=axis)
  return jnp.where(jnp.any(jnp.isnan(x), axis=axis), np.float32(np.nan), amax)


def _scale_from_amax(amax: jax.Array, ue8m0: bool) -> jax.Array:
  """max(amax, 1e-4) * f32(1/448), optionally rounded up to a power of two."""
  scale = jnp.maximum(amax, np.float32(AMAX_FLOOR)) * np.float32(1 / E4M3_MAX)
  if not ue8m0:
    return scale
  bits = lax.bitcast_convert_type(scale, jnp.uint32)
  exponent = bits & np.uint32(0x7F800000)
  mantissa = bits & np.uint32(0x007FFFFF)
  next_power = lax.bitcast_convert_type(exponent + np.uint32(0x00800000), jnp.float32)
  keep = (exponent == np.uint32(0x7F800000)) | (mantissa == np.uint32(0))
  return jnp.where(keep, scale, next_power)


def _round_to_e4m3(v: jax.Array) -> jax.Array:
  """Rounds float32 to the nearest e4m3fn value (ties to even), saturating at 448.

  Done explicitly in float32 so that the result does not depend on how a
  backend converts float32 to float8 (directly, or through float16).
  """
  bits = lax.bitcast_convert_type(v, jnp.uint32)
  lsb = (bits >> np.uint32(20)) & np.uint32(1)
  normal = lax.bitcast_convert_type(
      (bits + np.uint32(0x7FFFF) + lsb) & np.uint32(0xFFF00000), jnp.float32)
  subnormal = lax.round(v * np.float32(512), lax.RoundingMethod.TO_NEAREST_EVEN) * np.float32(2**-9)
  rounded = jnp.where(jnp.abs(v) < np.float32(2**-6), subnormal, normal)
  rounded = jnp.clip(rounded, np.float32(-E4M3_MAX), np.float32(E4M3_MAX))
  return jnp.where(jnp.isnan(v), v, rounded).astype(jnp.float8_e4m3fn)


def _quantize_per_token_xla(x: jax.Array, *, block: int, ue8m0: bool):
  *lead, m, k = x.shape
  groups = _ceil_div(k, block)
  padded = jnp.pad(x.astype(jnp.float32), [(0, 0)] * (x.ndim - 1) + [(0, groups * block - k)])
  grouped = padded.reshape(*lead, m, groups, block)
  scales = _scale_from_amax(_amax(grouped, axis=-1), ue8m0)
  q = _round_to_e4m3(grouped * (np.float32(1) / scales)[..., None])
  return q.reshape(*lead, m, groups * block)[..., :k], scales


def _quantize_per_block_xla(w: jax.Array, *, block_n: int, block_k: int, ue8m0: bool):
  *lead, n, k = w.shape
  row_blocks, col_blocks = _ceil_div(n, block_n), _ceil_div(k, block_k)
  pad = [(0, 0)] * (w.ndim - 2) + [(0, row_blocks * block_n - n), (0, col_blocks * block_k - k)]
  tiles = jnp.pad(w.astype(jnp.float32), pad).reshape(*lead, row_blocks, block_n, col_blocks,
                                                      block_k)
  scales = _scale_from_amax(_amax(tiles, axis=(-3, -1)), ue8m0)
  q = _round_to_e4m3(tiles * (np.float32(1) / scales)[..., :, None, :, None])
  return q.reshape(*lead, row_blocks * block_n, col_blocks * block_k)[..., :n, :k], scales


# --- the custom calls ----------------------------------------------------------------------------


def _quantize_ffi(call: _custom_call.CustomCall, x: jax.Array, scales_shape: tuple[int, ...],
                  **attrs):
  results = (jax.ShapeDtypeStruct(x.shape, jnp.float8_e4m3fn),
             jax.ShapeDtypeStruct(scales_shape, jnp.float32))
  # Leading dimensions are folded into a batch by the handlers, so a vmapped
  # call is one call with an extra leading dimension.
  q, scales = _custom_call.ffi_call(call.target, results, x, vmap_method="broadcast_all", **attrs)
  return q, scales


def _quantize_per_token_ffi(x: jax.Array, *, block: int, ue8m0: bool):
  scales_shape = (*x.shape[:-1], _ceil_div(x.shape[-1], block))
  return _quantize_ffi(QUANTIZE_PER_TOKEN, x, scales_shape, block=np.int64(block),
                       ue8m0=bool(ue8m0))


def _quantize_per_block_ffi(w: jax.Array, *, block_n: int, block_k: int, ue8m0: bool):
  *lead, n, k = w.shape
  scales_shape = (*lead, _ceil_div(n, block_n), _ceil_div(k, block_k))
  return _quantize_ffi(QUANTIZE_PER_BLOCK, w, scales_shape, block_n=np.int64(block_n),
                       block_k=np.int64(block_k), ue8m0=bool(ue8m0))


def _run(call: _custom_call.CustomCall, impl: str, ffi, xla, x: jax.Array):
  fn = _custom_call.select(call, impl, ffi=ffi, xla=xla)
  return tuple(_custom_call.non_differentiable(fn, call.op, _NOT_DIFFERENTIABLE_HINT)(x))


# --- public API ----------------------------------------------------------------------------------


def quantize_per_token(x: jax.Array, block: int = 128, *, ue8m0: bool = False,
                       impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Quantizes activations to FP8 with one scale per token per ``block`` channels.

  Args:
    x: ``[..., m, k]`` float32, bfloat16, float16 or float64; ``k`` need not be
      a multiple of ``block`` (the last group is partial).
    block: group width along ``k``: 32, 64 or 128 (DeepSeek uses 128).
    ue8m0: round each scale up to a power of two.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"`` (see ``jaxinfra._custom_call``).

  Returns:
    ``(x_fp8, scales)``: ``x_fp8`` ``[..., m, k]`` float8_e4m3fn and ``scales``
    ``[..., m, ceil(k / block)]`` float32, with ``x ~= x_fp8 * scales``
    (scales repeated ``block`` times along ``k``).
  """
  op = "quantize_per_token"
  x = _check_float_matrix(op, "x", x, "[..., m, k]")
  block = _check_block(op, "block", block)
  if x.shape[-1] == 0:
    raise ValueError(f"{op}: x must have k > 0 channels, got shape {x.shape}")
  return _run(QUANTIZE_PER_TOKEN, impl,
              lambda v: _quantize_per_token_ffi(v, block=block, ue8m0=ue8m0),
              lambda v: _quantize_per_token_xla(v, block=block, ue8m0=ue8m0), x)


def quantize_per_block(w: jax.Array, block: tuple[int, int] = (128, 128), *, ue8m0: bool = False,
                       impl: str = "auto") -> tuple[jax.Array, jax.Array]:
  """Quantizes weights to FP8 with one scale per ``block_n x block_k`` tile.

  Args:
    w: ``[..., n, k]`` float32, bfloat16, float16 or float64 (e.g. a stack of
      expert weights ``[experts, n, k]``); ``n`` and ``k`` need not be
      multiples of the block (edge tiles are partial).
    block: ``(block_n, block_k)``, each 32, 64 or 128 (DeepSeek uses 128 x 128).
    ue8m0: round each scale up to a power of two.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    ``(w_fp8, scales)``: ``w_fp8`` ``[..., n, k]`` float8_e4m3fn and ``scales``
    ``[..., ceil(n / block_n), ceil(k / block_k)]`` float32.
  """
  op = "quantize_per_block"
  w = _check_float_matrix(op, "w", w, "[..., n, k]")
  block_n, block_k = _check_block_pair(op, block)
  if w.shape[-1] == 0 or w.shape[-2] == 0:
    raise ValueError(f"{op}: w must have n > 0 and k > 0, got shape {w.shape}")
  return _run(QUANTIZE_PER_BLOCK, impl,
              lambda v: _quantize_per_block_ffi(v, block_n=block_n, block_k=block_k, ue8m0=ue8m0),
              lambda v: _quantize_per_block_xla(v, block_n=block_n, block_k=block_k, ue8m0=ue8m0),
              w)


def _dequantize(x_fp8: jax.Array, scales: jax.Array, blocks: tuple[int, int],
                out_dtype) -> jax.Array:
  *_, rows, cols = x_fp8.shape
  expanded = jnp.repeat(jnp.repeat(scales, blocks[0], axis=-2), blocks[1], axis=-1)
  return (x_fp8.astype(jnp.float32) * expanded[..., :rows, :cols]).astype(out_dtype)


def dequantize_per_token(x_fp8: jax.Array, scales: jax.Array, block: int = 128, *,
                         out_dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`quantize_per_token`: ``x_fp8 * scales`` in ``out_dtype``.

  Args:
    x_fp8: ``[..., m, k]`` float8_e4m3fn.
    scales: ``[..., m, ceil(k / block)]`` float32.
    block: the group width the values were quantized with.
    out_dtype: result dtype (the product is computed in float32).

  Returns:
    ``[..., m, k]`` in ``out_dtype``. Pure JAX, so XLA can fuse it into the
    consumer; it is differentiable (with respect to ``scales`` as well).
  """
  block = _check_block("dequantize_per_token", "block", block)
  x_fp8, scales = _check_quantized("dequantize_per_token", "x_fp8", x_fp8, scales, (1, block))
  return _dequantize(x_fp8, scales, (1, block), out_dtype)


def dequantize_per_block(w_fp8: jax.Array, scales: jax.Array,
                         block: tuple[int, int] = (128, 128), *, out_dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`quantize_per_block`: each tile times its scale.

  Args:
    w_fp8: ``[..., n, k]`` float8_e4m3fn.
    scales: ``[..., ceil(n / block_n), ceil(k / block_k)]`` float32.
    block: ``(block_n, block_k)`` the values were quantized with.
    out_dtype: result dtype (the product is computed in float32).

  Returns:
    ``[..., n, k]`` in ``out_dtype``.
  """
  blocks = _check_block_pair("dequantize_per_block", block)
  w_fp8, scales = _check_quantized("dequantize_per_block", "w_fp8", w_fp8, scales, blocks)
  return _dequantize(w_fp8, scales, blocks, out_dtype)
