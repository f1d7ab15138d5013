"""The split-KV schedule (get_mla_metadata) against FlashMLA's greedy algorithm
re-implemented here in plain Python, its invariants, and the split/combine
path (split_kv_reference and the CPU custom call's workspace) against unsplit
attention for skewed length distributions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import _mla_reference as ref
from _mla_ffi import raw_decode
from jaxinfra import mla
from jaxinfra.mla import schedule

FIXED, TILE = 5, 64
SCALE = 0.11


def flashmla_schedule(seqlens, parts):
  """get_mla_metadata_kernel's walk, transcribed from FlashMLA's description:
  requests cost tiles + 5 (an empty request counts one tile); each part gets
  ceil(total / parts) + 5; it takes whole requests while they fit, then a
  split of payload - 5 tiles if that is positive."""
  tiles = [max(1, -(-max(int(s), 0) // TILE)) for s in seqlens]
  b = len(tiles)
  payload = -(-sum(t + FIXED for t in tiles) // parts) + FIXED
  req = tile = split = cum = 0
  splits = [0] * (b + 1)
  meta = []
  for _ in range(parts):
    begin = (req, tile, split)
    left = payload
    while req < b:
      rest = tiles[req] - tile
      if left >= rest + FIXED:
        cum += split + 1
        splits[req + 1] = cum
        left -= rest + FIXED
        req, tile, split = req + 1, 0, 0
      else:
        if left - FIXED > 0:
          tile += left - FIXED
          split += 1
        break
    end_req = req if tile > 0 else req - 1
    end_tile = tile if tile > 0 else tiles[req - 1]
    first, last = begin[1] != 0, end_tile != tiles[end_req]
    if begin[0] == end_req:
      first = last = first or last
    meta.append([begin[0], end_req, begin[1], end_tile, begin[2], int(first), int(last), 0])
  return np.array(meta, np.int32), np.array(splits, np.int32), tiles, payload


LENGTH_SETS = {
    "one_huge": [1, 1, 1, 30000],
    "zeros_and_edges": [0, 0, 5000, 0, 64, 65, 63, 1],
    "lognormal": np.random.default_rng(0).lognormal(6, 1.5, 37).astype(int).tolist(),
    "single_long": [20000],
    "all_empty": [0] * 10,
    "uniform": [4096] * 128,
}


@pytest.mark.parametrize("name", list(LENGTH_SETS))
@pytest.mark.parametrize("num_sms", [132, 8, 1, 3])
def test_metadata_matches_flashmla_greedy_and_partitions_every_request(name, num_sms):
  lengths = np.array(LENGTH_SETS[name], np.int32)
  parts = schedule.num_sm_parts(128, 1, num_sms)
  got_meta, got_splits = jax.jit(
      lambda s: mla.get_mla_metadata(s, 128, 1, num_sms=num_sms))(lengths)  # traced lengths
  want_meta, want_splits, tiles, payload = flashmla_schedule(lengths, parts)
  np.testing.assert_array_equal(got_meta, want_meta)
  np.testing.assert_array_equal(got_splits, want_splits)
  # Invariants the kernels rely on: each request's tiles are covered once, in
  # order, by num_splits[r+1] - num_splits[r] chunks; no part exceeds its payload.
  covered = {r: [] for r in range(len(tiles))}
  for begin_req, end_req, begin_tile, end_tile, begin_split, *_ in want_meta:
    work = 0
    for r in range(begin_req, end_req + 1):
      lo = begin_tile if r == begin_req else 0
      hi = end_tile if r == end_req else tiles[r]
      if hi > lo:
        covered[r].append((lo, hi, begin_split if r == begin_req else 0))
        work += hi - lo + FIXED
    assert work <= payload
  for r, chunks in covered.items():
    assert [c[2] for c in chunks] == list(range(len(chunks)))
    assert chunks[0][0] == 0 and chunks[-1][1] == tiles[r]
    assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:]))
    assert len(chunks) == want_splits[r + 1] - want_splits[r]
  assert want_splits[-1] <= len(tiles) + parts


def test_metadata_under_vmap_and_shard_map():
  lengths = np.array([[5000, 3, 0, 700], [1, 1, 1, 20000]], np.int32)
  meta, splits = jax.vmap(lambda s: mla.get_mla_metadata(s, 16, 1, num_sms=16))(lengths)
  for i in range(2):
    want_meta, want_splits, *_ = flashmla_schedule(lengths[i], 16)
    np.testing.assert_array_equal(meta[i], want_meta)
    np.testing.assert_array_equal(splits[i], want_splits)
  mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:2])
  per_shard = jax.shard_map(lambda s: tuple(x[None] for x in mla.get_mla_metadata(s[0], 16, 1,
                                                                                    num_sms=16)),
                            mesh=mesh, in_specs=P("x"), out_specs=(P("x"), P("x")))
  meta2, splits2 = jax.jit(per_shard)(jax.device_put(lengths, jax.NamedSharding(mesh, P("x"))))
  np.testing.assert_array_equal(meta2, meta)
  np.testing.assert_array_equal(splits2, splits)


def test_merge_partials_is_the_logsumexp_combine():
  rng = np.random.default_rng(1)
  lse = rng.normal(size=(3, 5)).astype(np.float32)
  lse[0, 1] = lse[2, :] = -np.inf   # a split that saw no key; a row with no key at all
  out = rng.normal(size=(3, 5, 7)).astype(np.float32)
  out[0, 1] = out[2] = 0
  got_lse, got_out = jax.jit(mla.merge_partials)(lse, out)
  with np.errstate(divide="ignore", invalid="ignore"):
    want_lse = np.log(np.sum(np.exp(lse.astype(np.float64)), axis=1))
    weights = np.exp(lse - want_lse[:, None])
  want_out = np.einsum("rn,rnd->rd", np.nan_to_num(weights), out)
  np.testing.assert_allclose(got_lse, want_lse, rtol=1e-6)
  np.testing.assert_allclose(got_out, want_out, rtol=1e-5, atol=1e-6)
  assert got_lse[2] == -np.inf and np.all(np.asarray(got_out[2]) == 0)
  with pytest.raises(ValueError, match=r"merge_partials: .*\(3, 5\), \(3, 4, 7\)"):
    mla.merge_partials(lse, out[:, :4])


SKEWED = {
    "one_huge": [2500, 3, 1, 70],
    "zeros": [0, 900, 0, 64, 65, 1, 0],
    "lognormal": [int(x) for x in np.random.default_rng(2).lognormal(5, 1.2, 9)],
}


@pytest.mark.parametrize("name", [
    "one_huge", "zeros", pytest.param("lognormal", marks=pytest.mark.slow)])
def test_split_kv_execution_equals_unsplit_attention(name):
  """16 SMs and skewed lengths put most long requests in several splits."""
  rng = np.random.default_rng(3)
  seqlens = np.array(SKEWED[name], np.int32)
  b, s_q, h_q = len(seqlens), 2, 8
  kv, table = ref.paged_cache(rng, seqlens, h_kv=1, dtype=np.float32)
  q = ref.queries(rng, b, s_q, h_q, np.float32)
  metadata = jax.jit(lambda s: mla.get_mla_metadata(s, s_q * h_q, 1, num_sms=16))(seqlens)
  n_splits = np.diff(np.asarray(metadata.num_splits))
  assert n_splits.max() > 1  # the case does split
  split_ref = jax.jit(functools.partial(mla.split_kv_reference, softmax_scale=SCALE, causal=True))
  out, lse, o_accum, lse_accum = split_ref(q, kv, table, seqlens, metadata)
  unsplit = jax.jit(functools.partial(mla.mla_decode, softmax_scale=SCALE, causal=True,
                                      impl="xla"))(q, kv, table, seqlens)
  # Splitting changes only float32 rounding.
  np.testing.assert_allclose(out, unsplit[0], rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(lse, unsplit[1], rtol=2e-6, atol=1e-6)
  want_out, want_lse = ref.decode(q, kv, table, seqlens, SCALE, True)
  ref.assert_close("out", out, want_out, abs_tol=1e-6, rel_tol=1e-5)
  ref.assert_close("lse", lse, want_lse, abs_tol=1e-6, rel_tol=1e-6)
  # The CPU custom call runs the same plan: same results, and the same
  # partials in the workspace slots of split requests.
  ffi_out, ffi_lse, ffi_o_accum, ffi_lse_accum = raw_decode(q, kv, table, seqlens, metadata,
                                                            softmax_scale=SCALE, causal=True)
  np.testing.assert_allclose(ffi_out, out, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(ffi_lse, lse, rtol=2e-6, atol=1e-6)
  starts = np.asarray(metadata.num_splits)[:-1]
  slots = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, n_splits) if n > 1])
  np.testing.assert_allclose(ffi_lse_accum[slots], lse_accum[slots], rtol=2e-6, atol=1e-6)
  np.testing.assert_allclose(ffi_o_accum[slots], o_accum[slots], rtol=2e-5, atol=1e-6)
  # Merging a request's stored partials (the combine step) reproduces its output.
  merge = jax.jit(mla.merge_partials)
  for r in np.flatnonzero(n_splits > 1):
    rslots = np.arange(starts[r], starts[r] + n_splits[r])
    merged_lse, merged_out = merge(
        jnp.moveaxis(jnp.asarray(lse_accum[rslots]), 0, -1),
        jnp.moveaxis(jnp.asarray(o_accum[rslots]), 0, -2))
    rows = merged_lse.reshape(s_q, h_q)  # kernel row order: query token major
    np.testing.assert_allclose(rows.T, np.where(np.isinf(lse[r]), -np.inf, lse[r]), rtol=2e-6,
                               atol=1e-6)
    np.testing.assert_allclose(merged_out.reshape(s_q, h_q, 512), out[r], rtol=2e-5, atol=1e-6)
