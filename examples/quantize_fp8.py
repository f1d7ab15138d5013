"""Fine-grained FP8 quantization of a DeepSeek-V3-sized activation and weight.

    python examples/quantize_fp8.py

Quantizes activations 1 x 128 and a weight 128 x 128 with the custom call and
with the pure-JAX path, checks that both agree bit for bit, and prints the
round-trip error and the memory saved.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra import quant


def timed(fn, *args):
  out = jax.block_until_ready(fn(*args))  # compile
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - start


def main():
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (4096, 7168), jnp.bfloat16)   # tokens x hidden
  w = jax.random.normal(key_w, (2112, 7168), jnp.bfloat16) * 0.02  # q_a + kv_a projection

  for name, op, arg in (("activation 1x128", quant.quantize_per_token, x),
                        ("weight 128x128", quant.quantize_per_block, w)):
    (q, s), t_ffi = timed(jax.jit(lambda v, op=op: op(v, impl="ffi")), arg)
    (q_xla, s_xla), t_xla = timed(jax.jit(lambda v, op=op: op(v, impl="xla")), arg)
    same = (np.array_equal(np.asarray(q).view(np.uint8), np.asarray(q_xla).view(np.uint8))
            and np.array_equal(np.asarray(s), np.asarray(s_xla)))
    dequantize = (quant.dequantize_per_token if op is quant.quantize_per_token
                  else quant.dequantize_per_block)
    back = np.asarray(dequantize(q, s), np.float64)
    ref = np.asarray(arg, np.float64)
    rel = np.linalg.norm(back - ref) / np.linalg.norm(ref)
    saved = 1 - (q.nbytes + s.nbytes) / arg.nbytes
    print(f"{name:>17}: {arg.shape} {arg.dtype} -> e4m3 + scales {s.shape}; "
          f"relative error {rel:.4f}; {saved:.0%} smaller; ffi == xla: {same}; "
          f"ffi {t_ffi * 1e3:.1f} ms, xla {t_xla * 1e3:.1f} ms on {jax.default_backend()}")


if __name__ == "__main__":
  main()
