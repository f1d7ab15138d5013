"""The 656-byte FP8 latent record (against a byte-level NumPy/ml_dtypes packing
written here) and DeepSeek-V3.2 sparse decode against a float64 reference on
the dequantized cache: -1 and out-of-range indices, topk_length (including 0),
rows without any valid index, attention sinks including +-inf."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import _mla_reference as ref
from jaxinfra import mla

E4M3 = ml_dtypes.float8_e4m3fn
SCALE = 576 ** -0.55  # FlashMLA's sparse tests use d_qk^-0.55


def pack_reference(kv):
  """[n, 576] -> [n, 656] uint8, from the format's definition: per 128 latent
  channels scale = 2^ceil(log2(max(amax, 1e-4) / 448)), e4m3(x / scale) rounded
  to nearest even; then the 4 float32 scales; then 64 bfloat16 RoPE values."""
  kv = np.asarray(kv, np.float32)
  latent = kv[:, :512].reshape(-1, 4, 128)
  amax = np.max(np.abs(latent), axis=-1)
  scale = np.maximum(amax, np.float32(1e-4)) * np.float32(1 / 448)
  scale = np.exp2(np.ceil(np.log2(scale.astype(np.float64)))).astype(np.float32)
  values = np.clip(latent / scale[..., None], -448, 448).astype(E4M3).reshape(-1, 512)
  rope = kv[:, 512:].astype(ml_dtypes.bfloat16)
  return np.concatenate([values.view(np.uint8), scale.view(np.uint8).reshape(-1, 16),
                         rope.view(np.uint8).reshape(-1, 128)], axis=1)


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_record_layout_matches_the_definition(dtype):
  rng = np.random.default_rng(0)
  kv = rng.standard_normal((40, 576)).astype(np.float32)
  kv *= 10.0 ** rng.uniform(-3, 3, (40, 1))          # a wide range of magnitudes per token
  kv[3, :128] = 0                                    # an all-zero group
  kv = kv.astype(dtype)
  got = np.asarray(jax.jit(mla.quantize_kv_fp8)(kv.reshape(5, 8, 1, 576)))
  assert got.dtype == np.uint8 and got.shape == (5, 8, 1, 656)
  np.testing.assert_array_equal(got.reshape(40, 656), pack_reference(kv))
  values, scales, rope = mla.unpack_kv_fp8(got)
  assert values.dtype == jnp.float8_e4m3fn and scales.shape == (5, 8, 1, 4)
  mantissa = np.frexp(np.asarray(scales))[0]
  assert np.all(mantissa == 0.5)                     # every scale is a power of two
  np.testing.assert_array_equal(np.asarray(rope), kv[:, 512:].astype(ml_dtypes.bfloat16)
                                .reshape(5, 8, 1, 64))
  back = np.asarray(jax.jit(mla.dequantize_kv_fp8)(got)).reshape(40, 576)
  np.testing.assert_array_equal(back, ref.dequantize_fp8(got).reshape(40, 576))
  # Round trip: e4m3 keeps 3 mantissa bits (relative error <= 2^-4 above 2^-6 * scale).
  x = kv.astype(np.float32)[:, :512]
  big = np.abs(x) >= np.repeat(np.asarray(scales).reshape(40, 4), 128, 1) * 2**-6
  assert np.all(np.abs(back[:, :512] - x)[big] <= np.abs(x)[big] * 2**-4)
  # bfloat16 holds the dequantized values exactly (power-of-two scales).
  exact = np.asarray(mla.dequantize_kv_fp8(got, jnp.bfloat16)).astype(np.float32).reshape(40, 576)
  np.testing.assert_array_equal(exact, back)


def test_non_finite_input_poisons_only_its_group():
  kv = np.ones((2, 576), np.float32)
  kv[0, 130] = np.nan
  back = np.asarray(mla.dequantize_kv_fp8(mla.quantize_kv_fp8(kv)))
  assert np.all(np.isnan(back[0, 128:256]))
  assert np.all(back[0, :128] == 1) and np.all(back[0, 256:] == 1) and np.all(back[1] == 1)


def test_bad_record_arguments():
  with pytest.raises(ValueError, match=r"kv must be a float array \[..., 576\].*\(3, 512\)"):
    mla.quantize_kv_fp8(np.zeros((3, 512), np.float32))
  with pytest.raises(ValueError, match=r"record must be uint8 \[..., 656\].*int8"):
    mla.dequantize_kv_fp8(np.zeros((3, 656), np.int8))


# --- sparse decode ------------------------------------------------------------------------------


def sparse_reference(q, records, indices, scale, topk_length=None, sink=None):
  """float64: each (request, query token) attends to its valid indices."""
  q = ref.f64(q)
  b, s_q, h_q, _ = q.shape
  tokens = ref.dequantize_fp8(records.reshape(-1, 656))
  n = tokens.shape[0]
  out = np.zeros((b, s_q, h_q, 512))
  lse = np.full((b, h_q, s_q), np.inf)
  for i in range(b):
    for s in range(s_q):
      idx = indices[i, s]
      if topk_length is not None:
        idx = idx[:max(int(topk_length[i]), 0)]
      idx = idx[(idx >= 0) & (idx < n)]
      if len(idx) == 0:
        continue
      o, l = ref.attend(q[i, s][None], tokens[idx][:, None], scale, False)
      if sink is not None:
        o = o / (1 + np.exp(sink.astype(np.float64) - l[:, 0]))[None, :, None]
      out[i, s], lse[i, :, s] = o[0], l[:, 0]
  return out, lse


def sparse_case(rng, b, s_q, h_q, page, topk, num_blocks):
  dense = np.clip(rng.standard_normal((num_blocks, page, 1, 576), dtype=np.float32) / 10, -1, 1)
  records = np.array(mla.quantize_kv_fp8(dense))
  indices = np.stack([rng.permutation(num_blocks * page)[:topk] for _ in range(b * s_q)])
  indices = indices.reshape(b, s_q, topk).astype(np.int32)
  invalid = rng.random(indices.shape) < 0.2
  junk = rng.choice(np.array([-1, -1, -2**31, -123456, num_blocks * page, 2**31 - 1], np.int64),
                    indices.shape)
  indices = np.where(invalid, junk, indices).astype(np.int32)
  indices[0, 0, :] = -1                                # a row with no valid index
  used = np.zeros(num_blocks * page, bool)
  used[indices[(indices >= 0) & (indices < num_blocks * page)]] = True
  records.reshape(-1, 656)[~used] = 0xFF               # poison every unreferenced record
  q = ref.queries(rng, b, s_q, h_q)
  return q, records, indices


@pytest.mark.parametrize("h_q, s_q, page, topk", [(64, 1, 64, 128), (128, 3, 61, 64),
                                                  (16, 2, 2, 192)])
def test_sparse_decode_matches_reference_on_dequantized_cache(h_q, s_q, page, topk):
  rng = np.random.default_rng(h_q + page)
  b = 4
  q, records, indices = sparse_case(rng, b, s_q, h_q, page, topk, num_blocks=1200 // page + 2)
  out, lse = jax.jit(functools.partial(mla.mla_decode_sparse, softmax_scale=SCALE))(
      q, records, indices)
  assert out.dtype == jnp.bfloat16 and out.shape == (b, s_q, h_q, 512)
  assert lse.shape == (b, h_q, s_q)
  want_out, want_lse = sparse_reference(q, records, indices, SCALE)
  ref.check_decode(out, lse, want_out, want_lse, out_abs=1e-3)
  assert np.all(np.isposinf(np.asarray(lse)[0, :, 0]))


def test_topk_length_and_attention_sinks():
  rng = np.random.default_rng(5)
  b, s_q, h_q, topk = 4, 2, 8, 64
  q, records, indices = sparse_case(rng, b, s_q, h_q, 64, topk, num_blocks=6)
  topk_length = np.array([64, 0, 17, 100], np.int32)   # full, none, partial, beyond topk
  sink = rng.normal(size=h_q).astype(np.float32) * 3
  sink[0], sink[1] = np.inf, -np.inf
  fn = jax.jit(functools.partial(mla.mla_decode_sparse, softmax_scale=SCALE))
  out, lse = fn(q, records, indices, topk_length=topk_length, attn_sink=sink)
  want_out, want_lse = sparse_reference(q, records, indices, SCALE, topk_length, sink)
  ref.check_decode(out, lse, want_out, want_lse, out_abs=1e-3)
  out = np.asarray(out.astype(np.float32))
  assert np.all(out[:, :, 0] == 0)                     # sink +inf: output 0
  assert np.all(out[1] == 0) and np.all(np.isposinf(np.asarray(lse)[1]))  # topk_length 0
  # sink -inf changes nothing; the returned lse never includes the sink.
  plain_out, plain_lse = fn(q, records, indices, topk_length=topk_length)
  np.testing.assert_array_equal(np.asarray(plain_out.astype(np.float32))[:, :, 1], out[:, :, 1])
  np.testing.assert_array_equal(plain_lse, lse)


def test_sparse_decode_validation():
  q = np.zeros((2, 1, 4, 576), ml_dtypes.bfloat16)
  cache = np.zeros((3, 64, 1, 656), np.uint8)
  idx = np.zeros((2, 1, 64), np.int32)
  call = functools.partial(mla.mla_decode_sparse, softmax_scale=SCALE)
  with pytest.raises(ValueError, match=r"indices must be int32 \[b=2, s_q=1, topk\].*\(2, 64\)"):
    call(q, cache, idx[:, 0])
  with pytest.raises(ValueError, match=r"kv_cache must be uint8 \[num_blocks, page, 1, 656\]"):
    call(q, np.zeros((3, 64, 1, 576), ml_dtypes.bfloat16), idx)
  with pytest.raises(ValueError, match=r"topk_length must be int32 \[b=2\]"):
    call(q, cache, idx, topk_length=np.zeros(3, np.int32))
  with pytest.raises(ValueError, match=r"attn_sink must be float32 \[h_q=4\]"):
    call(q, cache, idx, attn_sink=np.zeros(4, ml_dtypes.bfloat16))
  with pytest.raises(ValueError, match="head_dim_v must be 512"):
    call(q, cache, idx, head_dim_v=576)
  with pytest.raises(TypeError, match="mla_decode_sparse is not differentiable"):
    jax.grad(lambda q: call(q, cache, idx)[0].astype(jnp.float32).sum())(q.astype(np.float32))
