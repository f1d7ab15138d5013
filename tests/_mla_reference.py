"""Independent float64 NumPy references and FlashMLA's tolerance check for the
MLA tests. Nothing here imports jaxinfra: the references are written from the
published definitions (FlashMLA's tests and README), not from the library."""

import math

import ml_dtypes
import numpy as np

QK, V, ROPE = 576, 512, 64
UNUSED_BLOCK = 2147480000  # what FlashMLA's tests put in unused block-table slots


def f64(x):
  return np.asarray(x).astype(np.float32).astype(np.float64)


def attend(q, keys, scale, causal):
  """One request: q [s_q, h_q, 576], keys [n, h_kv, 576] (float64).

  Returns out [s_q, h_q, 512] and lse [h_q, s_q] (natural log; +inf and 0
  output for rows without keys). Causal rows are bottom-right aligned.
  """
  s_q, h_q, _ = q.shape
  n, h_kv, _ = keys.shape
  per = h_q // h_kv
  out = np.zeros((s_q, h_q, V))
  lse = np.full((h_q, s_q), np.inf)
  if n == 0:
    return out, lse
  for g in range(h_kv):
    qg = q[:, g * per:(g + 1) * per]                                   # [s_q, per, 576]
    k = keys[:, g]                                                     # [n, 576]
    scores = (qg.reshape(-1, QK) @ k.T).reshape(s_q, per, n) * scale
    limit = np.full(s_q, n) if not causal else n - (s_q - 1 - np.arange(s_q))
    mask = np.arange(n)[None, :] < limit[:, None]                      # [s_q, n]
    scores = np.where(mask[:, None, :], scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    live = np.isfinite(top)
    p = np.exp(scores - np.where(live, top, 0))
    total = p.sum(-1, keepdims=True)
    o = (p.reshape(-1, n) @ k[:, :V]).reshape(s_q, per, V)
    o = np.where(live, o / np.where(live, total, 1), 0)
    l = np.where(live[..., 0], top[..., 0] + np.log(np.where(live[..., 0], total[..., 0], 1)),
                 np.inf)
    out[:, g * per:(g + 1) * per] = o
    lse[g * per:(g + 1) * per] = l.T
  return out, lse


def decode(q, kv_cache, block_table, seqlens, scale, causal, tokens_of=None):
  """Paged decode: request i's keys are the first seqlens[i] rows of its pages.

  tokens_of(pages) turns a [p, page, h_kv, ...] slice of the cache into float64
  [p, page, h_kv, 576] (default: the values themselves).
  """
  q, kv_cache = f64(q), np.asarray(kv_cache)
  tokens_of = tokens_of or f64
  b, s_q, h_q, _ = q.shape
  page = kv_cache.shape[1]
  out = np.zeros((b, s_q, h_q, V))
  lse = np.zeros((b, h_q, s_q))
  for i in range(b):
    n = int(seqlens[i])
    pages = np.asarray(block_table)[i, :math.ceil(n / page)]
    keys = tokens_of(kv_cache[pages]).reshape(-1, *kv_cache.shape[2:3], QK)[:n]
    out[i], lse[i] = attend(q[i], keys, scale, causal)
  return out, lse


def dequantize_fp8(records):
  """[..., 656] uint8 -> [..., 576] float64: 512 e4m3 times 4 float32 scales
  (one per 128 channels), then 64 bfloat16 RoPE values. Little-endian."""
  records = np.ascontiguousarray(records)
  lead = records.shape[:-1]
  flat = records.reshape(-1, 656)
  values = flat[:, :512].copy().view(ml_dtypes.float8_e4m3fn).astype(np.float64)
  scales = flat[:, 512:528].copy().view(np.float32).astype(np.float64)
  rope = flat[:, 528:].copy().view(ml_dtypes.bfloat16).astype(np.float64)
  latent = values * np.repeat(scales, 128, axis=1)
  return np.concatenate([latent, rope], axis=1).reshape(*lead, QK)


def assert_close(name, got, want, *, abs_tol, rel_tol, cos_tol=None):
  """FlashMLA's check_is_allclose: each element within abs_tol OR rel_tol,
  non-finite values in exactly the same places, and the global cosine
  difference 1 - 2<a,b>/(|a|^2+|b|^2) at most cos_tol."""
  got, want = f64(got), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
  for what, fn in (("NaN", np.isnan), ("+inf", np.isposinf), ("-inf", np.isneginf)):
    mismatch = fn(got) != fn(want)
    assert not mismatch.any(), (f"{name}: {what} positions differ at "
                                f"{np.argwhere(mismatch)[:5].tolist()}")
  finite = np.isfinite(want)
  g, w = got[finite], want[finite]
  abs_err = np.abs(g - w)
  rel_err = abs_err / np.maximum(np.abs(w), 1e-30)
  bad = ~((abs_err <= abs_tol) | (rel_err <= rel_tol))
  if bad.any():
    i = np.argmax(np.where(bad, abs_err, -1))
    raise AssertionError(f"{name}: {bad.sum()} of {bad.size} elements out of tolerance; worst "
                         f"got {g[i]!r} want {w[i]!r} (abs {abs_err[i]:.3g}, rel {rel_err[i]:.3g})")
  if cos_tol is not None:
    denom = np.sum(g * g + w * w)
    diff = 0.0 if denom == 0 else 1 - 2 * np.sum(g * w) / denom
    assert diff <= cos_tol, f"{name}: cosine difference {diff:.3g} > {cos_tol}"


def check_decode(got_out, got_lse, want_out, want_lse, *, out_abs=8e-4):
  """FlashMLA's dense-decode tolerances (out_abs 1e-3 for its sparse tests)."""
  assert_close("out", got_out, want_out, abs_tol=out_abs, rel_tol=2.01 / 128, cos_tol=5e-6)
  assert_close("lse", got_lse, want_lse, abs_tol=1e-6, rel_tol=8.01 / 65536)


def lengths_for(rng, b, s_k, s_q, varlen):
  """FlashMLA's test lengths: s_k, or with varlen max(N(s_k, s_k/2), s_q)."""
  if not varlen:
    return np.full(b, s_k, np.int32)
  return np.maximum(rng.normal(s_k, s_k / 2, b), s_q).astype(np.int32)


def paged_cache(rng, seqlens, *, h_kv, page=64, dtype=ml_dtypes.bfloat16, spare_blocks=3):
  """A cache holding len(seqlens) requests in randomly permuted pages.

  Returns (kv_cache [num_blocks, page, h_kv, 576], block_table [b, max_blocks]).
  Values ~ N(0, 1)/10 clipped to +-1; every cache row past a request's length,
  and every page no request uses, is NaN; block-table slots past a request's
  pages hold 2147480000.
  """
  b = len(seqlens)
  pages_of = [math.ceil(n / page) for n in seqlens]
  max_blocks = max(max(pages_of), 1)
  num_blocks = sum(pages_of) + spare_blocks
  cache = rng.standard_normal((num_blocks, page, h_kv, QK), dtype=np.float32)
  cache /= 10
  np.clip(cache, -1, 1, out=cache)
  live = np.zeros((num_blocks, page), bool)
  table = np.full((b, max_blocks), UNUSED_BLOCK, np.int32)
  perm = rng.permutation(num_blocks)
  used = 0
  for i, n in enumerate(seqlens):
    ids = perm[used:used + pages_of[i]]
    used += pages_of[i]
    table[i, :len(ids)] = ids
    for j, block in enumerate(ids):
      live[block, :max(0, min(page, n - j * page))] = True
  cache[~live] = np.nan
  return cache.astype(dtype), table


def queries(rng, b, s_q, h_q, dtype=ml_dtypes.bfloat16):
  return np.clip(rng.standard_normal((b, s_q, h_q, QK), dtype=np.float32) / 10, -1, 1).astype(dtype)
