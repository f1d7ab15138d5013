"""``jaxinfra bench quant``: FP8 quantization on DeepSeek-V3 shapes.

Times every implementation available on the device (``xla``, and ``ffi`` where
the custom call exists) and reports GB/s over the bytes read and written.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxinfra import quant
from jaxinfra.bench import _harness

# (kind, shape): activations (tokens x hidden) and weights (n x k) of DeepSeek-V3.
_FULL = [("per_token", (4096, 7168)), ("per_token", (4096, 2048)), ("per_token", (128, 7168)),
         ("per_block", (7168, 2048)), ("per_block", (24576, 1536)), ("per_block", (2112, 7168))]
_SMALL = [("per_token", (512, 7168)), ("per_token", (64, 2048)), ("per_block", (2112, 1536))]


@_harness.register("quant", "FP8 quantization (per token, per block) on DeepSeek-V3 shapes")
def run(ctx: _harness.BenchContext) -> None:
  ops = {"per_token": (quant.quantize_per_token, quant.QUANTIZE_PER_TOKEN),
         "per_block": (quant.quantize_per_block, quant.QUANTIZE_PER_BLOCK)}
  for kind, shape in ctx.track(_FULL if ctx.full else _SMALL, "quantize"):
    op, call = ops[kind]
    x = jax.random.normal(jax.random.key(0), shape, jnp.bfloat16)
    moved = x.size * (2 + 1)  # read bf16, write e4m3 (scales are negligible)
    for impl in _harness.available_impls(call):
      seconds = ctx.time(jax.jit(functools.partial(op, impl=impl)), x)
      ctx.add(op=f"quantize_{kind}", shape=str(shape), impl=impl, ms=seconds * 1e3,
              gb_per_s=moved / seconds / 1e9)
