"""Calls the jaxinfra_mla_decode custom call directly, without mla_decode's
argument sanitizing, returning the workspace too (as another caller, or the
future CUDA kernel's tests, would use the target)."""

import jax
import numpy as np

from jaxinfra import mla


def raw_decode(q, kv, table, lengths, metadata, *, softmax_scale, causal=False):
  """-> (out, lse, o_accum, lse_accum), jitted."""
  b, s_q, h_q, _ = q.shape
  h_kv, parts = kv.shape[2], metadata[0].shape[0]
  rows = s_q * h_q // h_kv
  shapes = [((b, s_q, h_q, 512), q.dtype), ((b, h_q, s_q), np.float32),
            ((b + parts, h_kv, rows, 512), np.float32), ((b + parts, h_kv, rows), np.float32)]
  call = jax.ffi.ffi_call(mla.MLA_DECODE.target, [jax.ShapeDtypeStruct(*s) for s in shapes],
                          vmap_method="sequential")
  fn = lambda *args: call(*args, softmax_scale=np.float32(softmax_scale), causal=bool(causal))
  return jax.jit(fn)(q, kv, table, lengths, *metadata)
