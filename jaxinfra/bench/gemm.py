"""``jaxinfra bench gemm``: the FP8 GEMMs on DeepSeek-V3's shapes.

For every case it times jaxinfra's implementations (``xla``, and ``ffi`` where
the custom call exists) and what JAX offers without jaxinfra:

* ``jnp.dot bf16``: the same GEMM in bfloat16 (float32 accumulation);
* ``xla fp8 per-tensor``: XLA's FP8 dot, e4m3 operands with one float32 scale
  per tensor (the scaling XLA's FP8 GEMM rewrite understands), bfloat16 out;
* ``ragged_dot bf16`` for the grouped (contiguous) cases (rhs ``[G, k, n]``).

It reports milliseconds, TFLOPS = 2 m n k / t (m = all rows that carry
tokens) and DeepGEMM's ``calc_diff`` against the float32 product of the
unquantized inputs. On CPU the shapes are scaled down (n / 16, k / 8, m / 16
for the grouped and masked cases, m in {64, 128, 256} for dense) and a
``note`` says what XLA:CPU does: it runs the FP8 dot by converting the
operands to float32 (there is no FP8 arithmetic on CPU), ragged_dot as one
dense dot per group, and ``ffi`` is the C++ reference loops, not a kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfra import gemm, quant
from jaxinfra.bench import _harness
from jaxinfra.testing.numerics import calc_diff

# DeepSeek-V3 (no tensor parallelism): (n, k) of the dense projections, m in _DENSE_M.
_DENSE_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
_DENSE_M = [64, 128, 4096]
_GROUPED_NK = [(4096, 7168), (7168, 2048)]
_CONTIGUOUS = [(4, 8192), (8, 4096)]      # (groups, rows per group)
_MASKED = [(1, 1024), (2, 512), (4, 256)]   # (groups, rows per group)


def _small(n: int, k: int) -> tuple[int, int]:
  return n // 16, k // 8


def cases(full: bool) -> list[tuple[str, tuple[int, ...]]]:
  """(kind, shape): ("dense", (m, n, k)), ("contiguous" | "masked", (G, m, n, k))."""
  out = []
  for n, k in _DENSE_NK:
    for m in _DENSE_M if full else (64, 128, 256):
      out.append(("dense", (m, *((n, k) if full else _small(n, k)))))
  for kind, groups in (("contiguous", _CONTIGUOUS), ("masked", _MASKED)):
    for n, k in _GROUPED_NK:
      for g, m in groups:
        out.append((kind, (g, m if full else m // 16, *((n, k) if full else _small(n, k)))))
  return out


def _per_tensor_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """e4m3 values with one float32 scale for the whole tensor."""
  scale = jnp.maximum(jnp.max(jnp.abs(x)), 1e-4).astype(jnp.float32) / 448.0
  return (x / scale).astype(jnp.float8_e4m3fn), scale


def _xla_fp8_dot(a, a_scale, b, b_scale, batch: bool):
  dims = (((a.ndim - 1,), (b.ndim - 1,)), (((0,), (0,)) if batch else ((), ())))
  out = lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)
  return (out * (a_scale * b_scale)).astype(jnp.bfloat16)


def _bf16_dot(a, b, batch: bool):
  dims = (((a.ndim - 1,), (b.ndim - 1,)), (((0,), (0,)) if batch else ((), ())))
  return lax.dot_general(a, b, dims, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


# What XLA:CPU does with some impls (printed in the note column on CPU).
_CPU_NOTES = {
    "xla fp8 per-tensor": "f32 upcast, no fp8 math",
    "ragged_dot bf16": "dense dot per group",
    "ffi": "C++ reference loops",
}


def _note(platform: str, impl: str) -> str:
  return _CPU_NOTES.get(impl, "") if platform == "cpu" else ""


class _Case:
  """One shape: inputs, quantized inputs, and the float32 reference."""

  def __init__(self, kind: str, shape: tuple[int, ...]):
    self.kind = kind
    keys = jax.random.split(jax.random.key(0), 2)
    if kind == "dense":
      m, n, k = shape
      self.x = jax.random.normal(keys[0], (m, k), jnp.bfloat16)
      self.rows = m
    else:
      g, m, n, k = shape
      self.x = jax.random.normal(keys[0], (g * m if kind == "contiguous" else g, *(
          (k,) if kind == "contiguous" else (m, k))), jnp.bfloat16)
      self.rows = g * m
      self.group_sizes = jnp.full((g,), m, jnp.int32)
    self.w = jax.random.normal(keys[1], ((n, k) if kind == "dense" else (shape[0], n, k)),
                               jnp.bfloat16)
    self.flops = 2 * self.rows * n * k
    self.xq, self.xs = jax.jit(quant.quantize_per_token)(self.x)
    self.wq, self.ws = jax.jit(quant.quantize_per_block)(self.w)
    if kind == "contiguous":
      self.layout = gemm.align_groups(self.group_sizes, self.x.shape[0])
      self.xq, self.xs = jax.jit(quant.quantize_per_token)(gemm.to_padded(self.x, self.layout))

  def comparable(self, impl: str, out: jax.Array) -> np.ndarray:
    """An implementation's output in the reference's layout."""
    if self.kind == "contiguous" and impl in ("xla", "ffi"):
      out = gemm.from_padded(out, self.layout)
    return np.asarray(out, np.float32)

  def reference(self) -> np.ndarray:
    x, w = self.x.astype(jnp.float32), self.w.astype(jnp.float32)
    if self.kind == "dense":
      return np.asarray(jnp.dot(x, w.T, precision=lax.Precision.HIGHEST))
    if self.kind == "masked":
      return np.asarray(jnp.einsum("gmk,gnk->gmn", x, w, precision=lax.Precision.HIGHEST))
    g = w.shape[0]
    xg = x.reshape(g, -1, x.shape[-1])
    return np.asarray(jnp.einsum("gmk,gnk->gmn", xg, w,
                                 precision=lax.Precision.HIGHEST)).reshape(x.shape[0], -1)

  def runners(self, impls: list[str]) -> dict[str, tuple]:
    """impl name -> (jitted function, args); results comparable with reference()."""
    out = {}
    for impl in impls:
      if self.kind == "dense":
        fn = functools.partial(gemm.fp8_gemm, impl=impl)
        out[impl] = (jax.jit(fn), (self.xq, self.xs, self.wq, self.ws))
      elif self.kind == "masked":
        fn = functools.partial(gemm.grouped_fp8_gemm_masked, impl=impl)
        out[impl] = (jax.jit(fn), (self.xq, self.xs, self.wq, self.ws, self.group_sizes))
      else:
        fn = functools.partial(gemm.grouped_fp8_gemm_contiguous, impl=impl)
        out[impl] = (jax.jit(lambda *a, fn=fn: fn(*a[:4], group_ends=a[4])),
                     (self.xq, self.xs, self.wq, self.ws, self.layout.group_ends))
    batch = self.kind != "dense"
    x = self.x.reshape(self.w.shape[0], -1, self.x.shape[-1]) if self.kind == "contiguous" else self.x
    out["jnp.dot bf16"] = (jax.jit(functools.partial(_bf16_dot, batch=batch)), (x, self.w))
    xq, xs = jax.jit(_per_tensor_fp8)(x)
    wq, ws = jax.jit(_per_tensor_fp8)(self.w)
    out["xla fp8 per-tensor"] = (jax.jit(functools.partial(_xla_fp8_dot, batch=batch)),
                                 (xq, xs, wq, ws))
    if self.kind == "contiguous":
      out["ragged_dot bf16"] = (jax.jit(lambda a, b, s: lax.ragged_dot(
          a, b, s, preferred_element_type=jnp.float32).astype(jnp.bfloat16)),
                                (self.x, jnp.swapaxes(self.w, 1, 2), self.group_sizes))
    return out


@_harness.register("gemm", "FP8 GEMMs (dense, grouped contiguous, masked) on DeepSeek-V3 shapes")
def run(ctx: _harness.BenchContext) -> None:
  platform = jax.default_backend()
  calls = {"dense": gemm.FP8_GEMM, "contiguous": gemm.GROUPED_FP8_GEMM_CONTIGUOUS,
           "masked": gemm.GROUPED_FP8_GEMM_MASKED}
  for kind, shape in ctx.track(cases(ctx.full), "fp8 gemm"):
    case = _Case(kind, shape)
    reference = case.reference()
    for impl, (fn, args) in case.runners(_harness.available_impls(calls[kind])).items():
      try:
        seconds = ctx.time(fn, *args)
        out = case.comparable(impl, fn(*args)).reshape(reference.shape)
        row = dict(ms=seconds * 1e3, tflops=case.flops / seconds / 1e12,
                   diff=calc_diff(out, reference), note=_note(platform, impl))
      except Exception as e:  # pylint: disable=broad-except
        row = dict(ms=float("nan"), tflops=float("nan"), diff=float("nan"),
                   note=f"fails: {type(e).__name__}: {str(e).splitlines()[0][:60]}")
      ctx.add(op=kind, shape="x".join(map(str, shape)), impl=impl, **row)
