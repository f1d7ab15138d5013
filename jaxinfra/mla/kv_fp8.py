"""DeepSeek-V3.2's FP8 latent-cache record: 656 bytes per token.

Byte layout of one token (little-endian, as on x86 and NVIDIA GPUs)::

  [  0, 512)  512 float8_e4m3fn values: the latent c_t (the "NoPE" part)
  [512, 528)  4 float32 scales, one per 128 latent channels
  [528, 656)  64 bfloat16 values: the rotated RoPE key k^R_t (not quantized)

Scales are powers of two (``jaxinfra.quant.quantize_per_token(..., block=128,
ue8m0=True)``: ``max(amax, 1e-4) / 448`` rounded up to ``2^k``), so a
dequantized value ``e4m3 * scale`` is exact in bfloat16 and float32; FlashMLA's
kernels rely on that (SM90 converts scales to bfloat16, SM100 to e8m0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfra import quant

NOPE_DIM = 512
ROPE_DIM = 64
QK_DIM = NOPE_DIM + ROPE_DIM  # 576
SCALE_BLOCK = 128
NUM_SCALES = NOPE_DIM // SCALE_BLOCK  # 4
BYTES_PER_TOKEN = NOPE_DIM + 4 * NUM_SCALES + 2 * ROPE_DIM  # 656
_SCALES_AT = NOPE_DIM
_ROPE_AT = NOPE_DIM + 4 * NUM_SCALES


def _to_bytes(x: jax.Array) -> jax.Array:
  """``[..., n]`` of a k-byte dtype -> ``[..., n * k]`` uint8 (little-endian)."""
  b = lax.bitcast_convert_type(x, jnp.uint8)
  return b.reshape(*x.shape[:-1], -1) if b.ndim > x.ndim else b


def _from_bytes(b: jax.Array, dtype) -> jax.Array:
  """Inverse of :func:`_to_bytes`."""
  width = np.dtype(dtype).itemsize
  if width == 1:
    return lax.bitcast_convert_type(b, dtype)
  return lax.bitcast_convert_type(b.reshape(*b.shape[:-1], -1, width), dtype)


def quantize_kv_fp8(kv: jax.Array) -> jax.Array:
  """Packs latent-cache rows into the 656-byte FP8 record.

  Args:
    kv: ``[..., 576]`` float (bfloat16, float32, ...): 512 latent channels then
      64 rotated RoPE channels, e.g. a cache ``[num_blocks, page, 1, 576]``.

  Returns:
    ``[..., 656]`` uint8. The latent part becomes e4m3 with one power-of-two
    scale per 128 channels; the RoPE part is stored as bfloat16. A NaN or
    infinity in a 128-channel group makes that group's scale and values
    non-finite (see ``jaxinfra.quant``): poisoned, never silently finite.
  """
  kv = jnp.asarray(kv)
  if kv.ndim < 1 or kv.shape[-1] != QK_DIM or not jnp.issubdtype(kv.dtype, jnp.floating):
    raise ValueError(f"quantize_kv_fp8: kv must be a float array [..., {QK_DIM}], got "
                     f"{kv.dtype} with shape {kv.shape}")
  lead = kv.shape[:-1]
  rows = kv.reshape(-1, QK_DIM)
  values, scales = quant.quantize_per_token(rows[:, :NOPE_DIM], block=SCALE_BLOCK, ue8m0=True)
  rope = rows[:, NOPE_DIM:].astype(jnp.bfloat16)
  record = jnp.concatenate([_to_bytes(values), _to_bytes(scales), _to_bytes(rope)], axis=-1)
  return record.reshape(*lead, BYTES_PER_TOKEN)


def unpack_kv_fp8(record: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Splits ``[..., 656]`` uint8 records into their three fields.

  Returns:
    ``(values [..., 512] float8_e4m3fn, scales [..., 4] float32,
    rope [..., 64] bfloat16)``.
  """
  record = _check_record("unpack_kv_fp8", record)
  values = _from_bytes(record[..., :_SCALES_AT], jnp.float8_e4m3fn)
  scales = _from_bytes(record[..., _SCALES_AT:_ROPE_AT], jnp.float32)
  rope = _from_bytes(record[..., _ROPE_AT:], jnp.bfloat16)
  return values, scales, rope


def dequantize_kv_fp8(record: jax.Array, out_dtype=jnp.float32) -> jax.Array:
  """Inverse of :func:`quantize_kv_fp8`.

  Args:
    record: ``[..., 656]`` uint8.
    out_dtype: result dtype; bfloat16 and float32 hold every value exactly.

  Returns:
    ``[..., 576]``: ``e4m3 * scale`` for the latent channels, then the RoPE
    channels.
  """
  values, scales, rope = unpack_kv_fp8(record)
  lead = values.shape[:-1]
  latent = quant.dequantize_per_token(values.reshape(-1, NOPE_DIM), scales.reshape(-1, NUM_SCALES),
                                      block=SCALE_BLOCK).reshape(*lead, NOPE_DIM)
  return jnp.concatenate([latent, rope.astype(jnp.float32)], axis=-1).astype(out_dtype)


def _check_record(op: str, record) -> jax.Array:
  record = jnp.asarray(record)
  if record.dtype != jnp.uint8 or record.ndim < 1 or record.shape[-1] != BYTES_PER_TOKEN:
    raise ValueError(f"{op}: record must be uint8 [..., {BYTES_PER_TOKEN}], got {record.dtype} "
                     f"with shape {record.shape}")
  return record
