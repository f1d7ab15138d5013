"""PagedLatentCache: appends (prefill and decode), frees, refusals and the
bookkeeping invariants, all inside jit, against a plain-Python model of the
sequences; and mla_decode over the cache it builds."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _mla_reference as ref
from jaxinfra import mla

append = jax.jit(lambda cache, ids, lat, rope, n: cache.append(ids, lat, rope, n))
free = jax.jit(lambda cache, ids: cache.free(ids))


def tokens_of(cache, seq):
  """A sequence's cached rows, read through its block table (NumPy)."""
  table, lengths = (np.asarray(x) for x in (cache.block_table, cache.seqlens))
  pages = np.asarray(cache.pages)
  n = int(lengths[seq])
  rows = [pages[table[seq, t // cache.page_size], t % cache.page_size, 0] for t in range(n)]
  return np.stack(rows) if rows else np.zeros((0, pages.shape[-1]), pages.dtype)


def check_invariants(cache, model):
  """Lengths and contents match the model; live sequences own disjoint pages;
  exactly the unowned pages are free; unused table slots are -1."""
  table, lengths = np.asarray(cache.block_table), np.asarray(cache.seqlens)
  owned = []
  for seq in range(cache.max_seqs):
    want = model.get(seq, [])
    assert lengths[seq] == len(want)
    used = -(-len(want) // cache.page_size)
    owned += table[seq, :used].tolist()
    assert np.all(table[seq, used:] == -1)
    if want:
      np.testing.assert_array_equal(tokens_of(cache, seq), np.stack(want))
  assert len(owned) == len(set(owned))
  free_pages = np.asarray(cache.page_free)
  assert set(np.flatnonzero(~free_pages).tolist()) == set(owned)


def test_random_appends_and_frees_follow_the_model():
  rng = np.random.default_rng(0)
  cache = mla.PagedLatentCache.create(num_pages=24, max_seqs=5, max_blocks=6, page_size=8,
                                      dtype=jnp.float32)
  model = {}
  for step in range(40):
    if step % 7 == 6:
      ids = rng.choice(5, 2, replace=False).astype(np.int32)
      cache = free(cache, ids)
      for i in ids:
        model.pop(int(i), None)
    else:
      n, t = 3, int(rng.choice([1, 2, 11]))           # decode steps, MTP, prefill chunks
      ids = rng.choice(np.array([-1, 0, 1, 2, 3, 4, 7]), n, replace=False).astype(np.int32)
      num = rng.integers(0, t + 1, n).astype(np.int32)
      lat = rng.standard_normal((n, t, 512)).astype(np.float32)
      rope = rng.standard_normal((n, t, 64)).astype(np.float32)
      free_before = int(np.sum(np.asarray(cache.page_free)))
      cache, ok = append(cache, ids, lat, rope, num)
      # The expected outcome, row by row, in order.
      requested = 0
      for i, seq in enumerate(ids.tolist()):
        have = len(model.get(seq, []))
        new_pages = -(-(have + num[i]) // 8) - -(-have // 8)
        fits = 0 <= seq < 5 and -(-(have + num[i]) // 8) <= 6
        requested += new_pages if fits else 0
        expect = fits and (new_pages == 0 or requested <= free_before)
        assert bool(ok[i]) == expect, (step, i)
        if expect:
          rows = np.concatenate([lat[i, :num[i]], rope[i, :num[i]]], axis=1)
          model.setdefault(seq, []).extend(list(rows))
    check_invariants(cache, model)


def test_refused_rows_leave_the_cache_unchanged():
  cache = mla.PagedLatentCache.create(num_pages=3, max_seqs=4, max_blocks=2, page_size=4,
                                      dtype=jnp.float32)
  lat = np.ones((4, 5, 512), np.float32)
  rope = np.ones((4, 5, 64), np.float32)
  # seq 0: 5 tokens (2 pages); seq 1: 5 more pages than the pool has left; seq 1 again
  # (repeated id); seq 2: 3 tokens, also refused (pool exhausted after seq 1's request).
  ids = np.array([0, 1, 1, 2], np.int32)
  cache, ok = append(cache, ids, lat, rope, np.array([5, 5, 1, 3], np.int32))
  np.testing.assert_array_equal(ok, [True, False, False, False])
  np.testing.assert_array_equal(cache.seqlens, [5, 0, 0, 0])
  # seq 0 fits 3 more tokens in its last page: served although the pool is short.
  cache, ok = append(cache, np.array([2, 0], np.int32), lat[:2], rope[:2],
                     np.array([5, 3], np.int32))
  np.testing.assert_array_equal(ok, [False, True])
  # More than max_blocks * page_size tokens: refused.
  cache, ok = append(cache, np.array([0], np.int32), lat[:1], rope[:1], np.array([1], np.int32))
  assert not ok[0] and int(cache.seqlens[0]) == 8
  # After freeing seq 0, seq 2 gets pages.
  cache = free(cache, np.array([0, -1, 9], np.int32))
  cache, ok = append(cache, np.array([2], np.int32), lat[:1], rope[:1], np.array([5], np.int32))
  assert ok[0] and int(cache.seqlens[2]) == 5 and int(np.sum(np.asarray(cache.page_free))) == 1


def test_fp8_cache_stores_quantized_records():
  rng = np.random.default_rng(1)
  cache = mla.PagedLatentCache.create(num_pages=4, max_seqs=2, max_blocks=2, page_size=5,
                                      kv_format="fp8")
  lat = rng.standard_normal((2, 7, 512)).astype(np.float32)
  rope = rng.standard_normal((2, 7, 64)).astype(np.float32)
  cache, ok = append(cache, np.array([1, 0], np.int32), lat, rope, np.array([7, 3], np.int32))
  assert cache.pages.dtype == jnp.uint8 and bool(np.all(ok))
  want = np.asarray(mla.quantize_kv_fp8(np.concatenate([lat, rope], -1)))
  np.testing.assert_array_equal(tokens_of(cache, 1), want[0])
  np.testing.assert_array_equal(tokens_of(cache, 0), want[1, :3])


@pytest.mark.parametrize("kv_format", ["bf16", "fp8"])
def test_decode_over_the_cache(kv_format):
  rng = np.random.default_rng(2)
  cache = mla.PagedLatentCache.create(num_pages=12, max_seqs=3, max_blocks=4,
                                      kv_format=kv_format)
  lengths = np.array([150, 0, 64], np.int32)
  lat = (rng.standard_normal((3, 150, 512)) / 10).astype(np.float32)
  rope = (rng.standard_normal((3, 150, 64)) / 10).astype(np.float32)
  cache, ok = append(cache, np.array([2, 0, 1], np.int32), lat, rope, lengths)
  assert bool(np.all(ok))
  seq_ids = np.array([1, 2, 0], np.int32)   # batch rows in another order
  table, seqlens = cache.lookup(seq_ids)
  np.testing.assert_array_equal(seqlens, [64, 150, 0])
  q = ref.queries(rng, 3, 2, 8)
  decode = jax.jit(functools.partial(mla.mla_decode, softmax_scale=0.1, causal=True,
                                     kv_format=kv_format))
  out, lse = decode(q, cache.pages, table, seqlens)
  dequant = ref.dequantize_fp8 if kv_format == "fp8" else None
  want = ref.decode(q, np.asarray(cache.pages), np.asarray(table), np.asarray(seqlens), 0.1,
                    True, tokens_of=dequant)
  ref.check_decode(out, lse, *want)
