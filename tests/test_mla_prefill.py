"""mla_prefill (expanded-form MLA attention): against a float64 NumPy
reference with segment ids, packed cu_seqlens and GQA; gradients with
jax.test_util.check_grads; validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from jaxinfra import mla

SCALE = 192 ** -0.5


def reference(q, k, v, scale, causal, q_seg=None, kv_seg=None):
  """float64 softmax attention; a query without visible keys gives 0."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, s_q, h_q, _ = q.shape
  s_k, h_kv = k.shape[1], k.shape[2]
  per = h_q // h_kv
  out = np.zeros((b, s_q, h_q, v.shape[-1]))
  for i in range(b):
    mask = np.ones((s_q, s_k), bool)
    if causal:
      mask &= np.tril(np.ones((s_q, s_k), bool))
    if q_seg is not None:
      mask &= q_seg[i][:, None] == kv_seg[i][None, :]
    for h in range(h_q):
      scores = np.where(mask, q[i, :, h] @ k[i, :, h // per].T * scale, -np.inf)
      top = scores.max(-1, keepdims=True)
      p = np.where(mask, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0)
      total = p.sum(-1, keepdims=True)
      out[i, :, h] = np.where(total > 0, (p @ v[i, :, h // per]) / np.where(total > 0, total, 1), 0)
  return out


def inputs(rng, b, s, h_q, h_kv, d_qk=192, d_v=128, dtype=np.float32):
  q = rng.standard_normal((b, s, h_q, d_qk)).astype(dtype)
  k = rng.standard_normal((b, s, h_kv, d_qk)).astype(dtype)
  v = rng.standard_normal((b, s, h_kv, d_v)).astype(dtype)
  return q, k, v


@pytest.mark.parametrize("h_q, h_kv", [(4, 4), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_segments_and_gqa_match_reference(h_q, h_kv, causal):
  rng = np.random.default_rng(0)
  q, k, v = inputs(rng, 2, 24, h_q, h_kv)
  seg = np.array([[0] * 10 + [1] * 14, [0] * 3 + [1] * 5 + [2] * 16], np.int32)
  got = jax.jit(functools.partial(mla.mla_prefill, softmax_scale=SCALE, causal=causal))(
      q, k, v, segment_ids=seg)
  assert got.shape == (2, 24, h_q, 128) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, reference(q, k, v, SCALE, causal, seg, seg),
                             rtol=2e-5, atol=2e-6)


def test_separate_query_and_key_segments_and_rows_without_keys():
  rng = np.random.default_rng(1)
  q, k, v = inputs(rng, 1, 12, 2, 2)
  q_seg = np.array([[0] * 4 + [1] * 4 + [5] * 4], np.int32)  # id 5 has no keys
  kv_seg = np.array([[0] * 6 + [1] * 6], np.int32)
  got = mla.mla_prefill(q, k, v, softmax_scale=SCALE, causal=False, segment_ids=(q_seg, kv_seg))
  want = reference(q, k, v, SCALE, False, q_seg, kv_seg)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  assert np.all(np.asarray(got)[0, 8:] == 0)


def test_packed_cu_seqlens_equals_separate_sequences():
  rng = np.random.default_rng(2)
  q, k, v = inputs(rng, 1, 20, 4, 1, dtype=np.float32)
  cu = np.array([0, 7, 8, 17], np.int32)                     # 3 sequences, 3 padding tokens
  got = jax.jit(functools.partial(mla.mla_prefill, softmax_scale=SCALE))(
      q[0], k[0], v[0], cu_seqlens=cu)
  assert got.shape == (20, 4, 128)
  for lo, hi in zip(cu[:-1], cu[1:]):
    want = reference(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], SCALE, True)[0]
    np.testing.assert_allclose(got[lo:hi], want, rtol=2e-5, atol=2e-6)
  assert np.all(np.asarray(got)[17:] == 0)


def test_bfloat16():
  rng = np.random.default_rng(3)
  q, k, v = inputs(rng, 1, 16, 4, 4)
  bf = lambda x: x.astype(jnp.bfloat16)
  got = mla.mla_prefill(bf(q), bf(k), bf(v), softmax_scale=SCALE)
  assert got.dtype == jnp.bfloat16
  want = reference(np.asarray(bf(q), np.float32), np.asarray(bf(k), np.float32),
                   np.asarray(bf(v), np.float32), SCALE, True)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 / 128, atol=2e-2)


@pytest.mark.parametrize("dtype, packed, order", [
    (np.float64, False, 2),   # the float64 softmax path, to second order
    (np.float64, True, 1),    # packed sequences (cu_seqlens)
    (np.float32, False, 1),   # jax.nn.dot_product_attention (float32 logits): first order
])
def test_gradients(dtype, packed, order):
  rng = np.random.default_rng(4)
  with jax.enable_x64(dtype == np.float64):
    q, k, v = inputs(rng, 1, 6, 2, 1, d_qk=12, d_v=8, dtype=dtype)
    if packed:
      f = functools.partial(mla.mla_prefill, softmax_scale=0.3,
                            cu_seqlens=np.array([0, 2, 6], np.int32))
      args = (q[0], k[0], v[0])
    else:
      f = functools.partial(mla.mla_prefill, softmax_scale=0.3,
                            segment_ids=np.array([[0, 0, 0, 1, 1, 1]], np.int32))
      args = (q, k, v)
    # float32 central differences carry ~1e-3 rounding noise at JAX's default
    # eps=1e-4; a wider step keeps the check meaningful (a wrong gradient is off by O(1)).
    tol = dict(eps=1e-2, atol=1e-2, rtol=1e-2) if dtype == np.float32 else {}
    check_grads(jax.jit(f), args, order=order, modes=("fwd", "rev"), **tol)


def test_float64_path_matches_reference():
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    q, k, v = inputs(rng, 2, 10, 4, 2, dtype=np.float64)
    seg = np.array([[0] * 4 + [1] * 6, [0] * 10], np.int32)
    got = mla.mla_prefill(q, k, v, softmax_scale=SCALE, segment_ids=seg)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, reference(q, k, v, SCALE, True, seg, seg), rtol=1e-10,
                               atol=1e-15)


@pytest.mark.parametrize("args, kwargs, message", [
    (((1, 4, 2, 192), (1, 4, 2, 128), (1, 4, 2, 128)), {}, r"k must be \[b=1, s_k, h_kv, d_qk=192\]"),
    (((1, 4, 2, 192), (1, 4, 2, 192), (1, 4, 2, 256)), {}, r"v must be \[b, s_k, h_kv, d_v <= d_qk\]"),
    (((1, 4, 3, 192), (1, 4, 2, 192), (1, 4, 2, 128)), {}, r"h_q % h_kv must be 0"),
    (((1, 4, 2, 192), (1, 5, 2, 192), (1, 5, 2, 128)), {}, r"causal attention needs s_q == s_k"),
    (((1, 4, 2, 192), (1, 4, 2, 192), (1, 4, 2, 128)),
     {"segment_ids": np.zeros((1, 3), np.int32)}, r"q segment ids must be int32 \(1, 4\)"),
    (((4, 2, 192), (4, 2, 192), (4, 2, 128)),
     {"cu_seqlens": np.array([0, 4], np.int32), "segment_ids": np.zeros((1, 4), np.int32)},
     "not both"),
    (((1, 4, 2, 192), (1, 4, 2, 192), (1, 4, 2, 128)), {"cu_seqlens": np.array([0, 4], np.int32)},
     r"q must be packed \[t, h_q, d_qk\]"),
])
def test_bad_arguments(args, kwargs, message):
  arrays = [np.zeros(s, np.float32) for s in args]
  with pytest.raises(ValueError, match=message):
    mla.mla_prefill(*arrays, softmax_scale=SCALE, **kwargs)
