"""FP8 training layers with DeepSeek-V3's recipe: ``fp8_linear``,
``fp8_grouped_linear`` and the Flax NNX modules ``Fp8Dense``, ``Fp8GroupedDense``.

Forward: x quantized per token (1 x 128), w per 128 x 128 block, one FP8 GEMM.
Backward (``custom_vjp``):

* dgrad ``dx = dy @ w``: dy quantized per token (1 x 128 along n), times the
  forward's FP8 w transposed (128 x 128 block scales transpose with it, so w
  is not quantized again).
* wgrad ``dw = dy^T @ x``: dy^T and x^T quantized per token along the token
  axis (1 x 128 scales along the contracted axis on both sides), float32
  result cast to the weight's dtype.

Master weights, their gradients and the optimizer state stay in the weights'
dtype (float32 by default); only the GEMM operands are FP8.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfra import quant
from jaxinfra.gemm import _layout
from jaxinfra.gemm import _ops

_FLOAT_DTYPES = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def _gemm_dtype(dtype: np.dtype) -> np.dtype:
  """The GEMM output dtype for activations of ``dtype`` (bfloat16 stays bfloat16)."""
  return np.dtype(jnp.bfloat16) if dtype == jnp.bfloat16 else np.dtype(jnp.float32)


def _check_float(op: str, name: str, x, dims: str, rank: int | None = None) -> jax.Array:
  x = jnp.asarray(x)
  if x.dtype not in _FLOAT_DTYPES or (rank is not None and x.ndim != rank) or x.ndim < 1:
    raise ValueError(f"{op}: {name} must be float32, bfloat16 or float16 of shape {dims}, got "
                     f"{x.dtype} with shape {x.shape}")
  return x


# --- fp8_linear ----------------------------------------------------------------------------------


@functools.cache
def _linear(impl: str, x_dtype: np.dtype, w_dtype: np.dtype) -> Callable:
  """The custom_vjp for one (impl, dtypes) combination: x [M, k], w [n, k] -> [M, n]."""

  def forward(x, w):
    xq, xs = quant.quantize_per_token(x, impl=impl)
    wq, ws = quant.quantize_per_block(w, impl=impl)
    y = _ops.fp8_gemm(xq, xs, wq, ws, out_dtype=_gemm_dtype(x_dtype), impl=impl)
    return y.astype(x_dtype), (x, wq, ws)

  def backward(residuals, dy):
    x, wq, ws = residuals
    dyq, dys = quant.quantize_per_token(dy, impl=impl)
    dx = _ops.fp8_gemm(dyq, dys, wq.T, ws.T, out_dtype=_gemm_dtype(x_dtype), impl=impl)
    dyt_q, dyt_s = quant.quantize_per_token(dy.T, impl=impl)
    xt_q, xt_s = quant.quantize_per_token(x.T, impl=impl)
    dw = _ops.fp8_gemm(dyt_q, dyt_s, xt_q, xt_s, out_dtype=jnp.float32, impl=impl)
    return dx.astype(x_dtype), dw.astype(w_dtype)

  @jax.custom_vjp
  def linear(x, w):
    return forward(x, w)[0]

  linear.defvjp(forward, backward)
  return linear


def fp8_linear(x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
  """``y = x @ w^T`` with FP8 GEMMs forward and backward (DeepSeek-V3's recipe).

  Args:
    x: ``[..., k]`` float32, bfloat16 or float16 activations.
    w: ``[n, k]`` float32, bfloat16 or float16 weights (the master copy; its
      gradient comes back in its dtype).
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``, for the quantization and the GEMMs.

  Returns:
    ``[..., n]`` in x's dtype. Differentiable in x and w (``custom_vjp``).
  """
  op = "fp8_linear"
  x = _check_float(op, "x", x, "[..., k]")
  w = _check_float(op, "w", w, "[n, k]", rank=2)
  if x.shape[-1] != w.shape[1] or w.shape[1] == 0:
    raise ValueError(f"{op}: x [..., k] and w [n, k] must share k > 0, got x of shape {x.shape} "
                     f"and w of shape {w.shape}")
  lead = x.shape[:-1]
  y = _linear(impl, x.dtype, w.dtype)(x.reshape(-1, x.shape[-1]), w)
  return y.reshape(*lead, w.shape[0])


# --- fp8_grouped_linear --------------------------------------------------------------------------


@functools.cache
def _grouped_linear(impl: str, x_dtype: np.dtype, w_dtype: np.dtype) -> Callable:
  """The custom_vjp for x [M, k], w [G, n, k], group_sizes [G] -> [M, n]."""

  def forward(x, w, group_sizes):
    layout = _layout.align_groups(group_sizes, x.shape[0])
    xq, xs = quant.quantize_per_token(_layout.to_padded(x, layout), impl=impl)
    wq, ws = quant.quantize_per_block(w, impl=impl)
    y = _ops.grouped_fp8_gemm_contiguous(xq, xs, wq, ws, group_ends=layout.group_ends,
                                         out_dtype=_gemm_dtype(x_dtype), impl=impl)
    return _layout.from_padded(y, layout).astype(x_dtype), (x, group_sizes, wq, ws)

  def backward(residuals, dy):
    x, group_sizes, wq, ws = residuals
    layout = _layout.align_groups(group_sizes, x.shape[0])
    dy_padded = _layout.to_padded(dy, layout)
    dyq, dys = quant.quantize_per_token(dy_padded, impl=impl)
    dx = _ops.grouped_fp8_gemm_contiguous(dyq, dys, jnp.swapaxes(wq, 1, 2),
                                          jnp.swapaxes(ws, 1, 2), group_ends=layout.group_ends,
                                          out_dtype=_gemm_dtype(x_dtype), impl=impl)
    # Each expert's tokens start at a multiple of 128 in the padded layout, so
    # the token axis splits into 128-aligned K segments: the k-grouped GEMM.
    dyt_q, dyt_s = quant.quantize_per_token(dy_padded.T, impl=impl)
    xt_q, xt_s = quant.quantize_per_token(_layout.to_padded(x, layout).T, impl=impl)
    dw = _ops.k_grouped_fp8_gemm(dyt_q, dyt_s, xt_q, xt_s, layout.group_k, impl=impl)
    return (_layout.from_padded(dx, layout).astype(x_dtype), dw.astype(w_dtype), None)

  @jax.custom_vjp
  def grouped_linear(x, w, group_sizes):
    return forward(x, w, group_sizes)[0]

  grouped_linear.defvjp(forward, backward)
  return grouped_linear


def fp8_grouped_linear(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                       impl: str = "auto") -> jax.Array:
  """Per-expert ``y[r] = x[r] @ w[g(r)]^T`` with FP8 GEMMs forward and backward.

  Rows are grouped contiguously by expert, as for ``jax.lax.ragged_dot``:
  rows ``[sum(group_sizes[:g]), sum(group_sizes[:g+1]))`` belong to expert
  ``g``. Internally the rows move to the 128-aligned contiguous layout
  (:func:`jaxinfra.gemm.align_groups`, a static ``padded_rows(M, G)`` rows),
  the grouped GEMM runs there (forward and dgrad), and the weight gradient is
  a k-grouped GEMM over the padded token axis. No host sync; static shapes.

  ``group_sizes`` is device data: negative sizes count as 0, and rows past
  ``M`` (or past ``sum(group_sizes)``) belong to no expert; their output and
  input gradient are zero, like ``ragged_dot``.

  Args:
    x: ``[M, k]`` float32, bfloat16 or float16.
    w: ``[G, n, k]`` float32, bfloat16 or float16 expert weights.
    group_sizes: ``[G]`` integer rows per expert.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    ``[M, n]`` in x's dtype; differentiable in x and w (``custom_vjp``).
  """
  op = "fp8_grouped_linear"
  x = _check_float(op, "x", x, "[M, k]", rank=2)
  w = _check_float(op, "w", w, "[G, n, k]", rank=3)
  if x.shape[1] != w.shape[2] or w.shape[2] == 0:
    raise ValueError(f"{op}: x [M, k] and w [G, n, k] must share k > 0, got x of shape "
                     f"{x.shape} and w of shape {w.shape}")
  group_sizes = jnp.asarray(group_sizes)
  if not jnp.issubdtype(group_sizes.dtype, jnp.integer) or group_sizes.shape != w.shape[:1]:
    raise ValueError(f"{op}: group_sizes must be an integer array of shape {w.shape[:1]}, got "
                     f"{group_sizes.dtype} with shape {group_sizes.shape}")
  if w.shape[0] == 0:
    raise ValueError(f"{op}: w must have at least one expert, got shape {w.shape}")
  return _grouped_linear(impl, x.dtype, w.dtype)(x, w, group_sizes.astype(jnp.int32))


# --- Flax NNX modules ----------------------------------------------------------------------------


def _kernel_init(batch_axis: tuple[int, ...] = ()) -> nnx.Initializer:
  # LeCun normal over the [..., out, in] layout (fan in = the last axis).
  return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-1,
                                           out_axis=-2, batch_axis=batch_axis)


class Fp8Dense(nnx.Module):
  """A dense layer whose GEMMs run in FP8: ``y = x @ kernel^T + bias``.

  The kernel is stored ``[out_features, in_features]`` (DeepGEMM's NT layout,
  unlike ``nnx.Linear``'s ``[in, out]``) in ``param_dtype`` (the master
  weights, float32 by default); every call quantizes it per 128 x 128 block
  and the input per token, and the backward pass uses FP8 GEMMs too
  (:func:`fp8_linear`). The bias is added in the output dtype.

  Args:
    in_features, out_features: sizes.
    use_bias: whether to add a bias (``[out_features]``).
    dtype: activations are cast to it before the GEMM (None: keep the input's).
    param_dtype: dtype of the kernel and bias.
    kernel_init, bias_init: initializers (``kernel_init`` gets the shape
      ``(out_features, in_features)``).
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, kernel_init: nnx.Initializer | None = None,
               bias_init: nnx.Initializer = nnx.initializers.zeros_init(), impl: str = "auto",
               rngs: nnx.Rngs):
    kernel_init = kernel_init or _kernel_init()
    self.in_features, self.out_features = in_features, out_features
    self.dtype, self.impl = dtype, impl
    self.kernel = nnx.Param(kernel_init(rngs.params(), (out_features, in_features), param_dtype))
    self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [..., in_features]`` -> ``[..., out_features]`` in the activation dtype."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    y = fp8_linear(x, self.kernel[...], impl=self.impl)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class Fp8GroupedDense(nnx.Module):
  """Per-expert dense layers with FP8 GEMMs: ``y[r] = x[r] @ kernel[g(r)]^T``.

  The kernel is ``[num_experts, out_features, in_features]`` in
  ``param_dtype``; rows of x are grouped contiguously by expert with
  ``group_sizes`` (see :func:`fp8_grouped_linear`).

  Args:
    num_experts, in_features, out_features: sizes.
    dtype: activations are cast to it before the GEMM (None: keep the input's).
    param_dtype: dtype of the kernel.
    kernel_init: initializer, gets ``(num_experts, out_features, in_features)``.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.
    rngs: ``nnx.Rngs`` with a ``params`` stream.
  """

  def __init__(self, num_experts: int, in_features: int, out_features: int, *, dtype=None,
               param_dtype=jnp.float32, kernel_init: nnx.Initializer | None = None,
               impl: str = "auto", rngs: nnx.Rngs):
    kernel_init = kernel_init or _kernel_init(batch_axis=(0,))
    self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
    self.dtype, self.impl = dtype, impl
    self.kernel = nnx.Param(kernel_init(rngs.params(), (num_experts, out_features, in_features),
                                        param_dtype))

  def __call__(self, x: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x [M, in_features]``, ``group_sizes [num_experts]`` -> ``[M, out_features]``."""
    if self.dtype is not None:
      x = x.astype(self.dtype)
    return fp8_grouped_linear(x, self.kernel[...], group_sizes, impl=self.impl)
