"""jaxinfra.mla.mla_decode: the CPU custom call and the xla path against an
independent float64 NumPy reference with FlashMLA's tolerances, on caches
whose unused rows are NaN and whose pages are randomly permuted; FP8 caches;
out-of-range data; the custom call's own guards; transformations; validation."""

import functools
import itertools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import _mla_reference as ref
from _mla_ffi import raw_decode
from jaxinfra import mla
from jaxinfra.mla import schedule

IMPLS = ("ffi", "xla")
SCALE = 192 ** -0.5  # not 1/sqrt(576): the scale DeepSeek uses (without YaRN)


def decode(*args, **kwargs):
  """mla_decode under jit (eagerly, every small op would be compiled on its own)."""
  return jax.jit(functools.partial(mla.mla_decode, softmax_scale=SCALE, **kwargs))(*args)


def run_case(b, s_q, s_k, h_q, h_kv, varlen, causal, *, seed=0, zero_lengths=()):
  rng = np.random.default_rng(seed)
  seqlens = ref.lengths_for(rng, b, s_k, s_q, varlen)
  seqlens[list(zero_lengths)] = 0
  kv, table = ref.paged_cache(rng, seqlens, h_kv=h_kv)
  q = ref.queries(rng, b, s_q, h_q)
  want_out, want_lse = ref.decode(q, kv, table, seqlens, SCALE, causal)
  for impl in IMPLS:
    out, lse = decode(q, kv, table, seqlens, causal=causal, impl=impl)
    assert out.dtype == jnp.bfloat16 and out.shape == (b, s_q, h_q, 512)
    assert lse.dtype == jnp.float32 and lse.shape == (b, h_q, s_q)
    ref.check_decode(out, lse, want_out, want_lse)


# (b, s_q, s_k, h_q, h_kv, varlen, causal)
DEFAULT_CASES = [
    (1, 1, 20, 1, 1, False, False),
    (2, 4, 140, 9, 1, True, True),
    (1, 2, 4096, 128, 1, False, True),   # one long request: split over many SM parts
    (6, 2, 140, 64, 2, True, False),
    (2, 2, 20, 126, 2, False, True),
    (3, 1, 140, 128, 8, True, False),
]


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=str)
def test_decode_matches_float64_reference(case):
  run_case(*case)


_SWEEP = dict(b=(1, 2, 6, 64), s_q=(1, 2, 4), s_k=(20, 140, 4096),
              heads=tuple((h_q, h_kv) for h_kv in (1, 2, 8)
                          for h_q in (1, 3, 9, 63, 64, 126, 128) if h_q % h_kv == 0),
              varlen=(False, True), causal=(False, True))
_SWEEP_COST_CAP = 2_200_000  # b * s_q * h_q * s_k (x2.5 for varlen) key-row pairs


def _sweep_cases():
  """A deterministic all-pairs sample of the FlashMLA sweep.

  The full cross product has 1728 cases (h_q x h_kv restricted to h_q % h_kv
  == 0), each a fresh compilation; that would take hours on 2 cores. Instead:
  among the cases costing at most 2.2M (query row, key) pairs, which includes
  every pairing of two parameter values (the largest, b=1, s_q=4, h_q=128,
  s_k=4096, is 2.1M), greedily pick the case that covers the most
  not-yet-covered pairs of parameter values (ties: the cheaper case) until every
  pair of values of every two parameters appears together in some case.
  """
  names = list(_SWEEP)
  cases = list(itertools.product(*_SWEEP.values()))

  def cost(c):
    d = dict(zip(names, c))
    return d["b"] * d["s_q"] * d["heads"][0] * d["s_k"] * (2.5 if d["varlen"] else 1)

  def pairs(c):
    return {(i, c[i], j, c[j]) for i, j in itertools.combinations(range(len(c)), 2)}

  candidates = sorted((c for c in cases if cost(c) <= _SWEEP_COST_CAP), key=cost)
  uncovered = set().union(*(pairs(c) for c in cases))
  chosen = []
  while uncovered:
    best = max(candidates, key=lambda c: len(pairs(c) & uncovered))  # first max: cheapest
    assert pairs(best) & uncovered, "some pair cannot be covered under the cost cap"
    chosen.append(best)
    uncovered -= pairs(best)
  return [(b, s_q, s_k, h_q, h_kv, varlen, causal)
          for b, s_q, s_k, (h_q, h_kv), varlen, causal in chosen]


@pytest.mark.slow
@pytest.mark.parametrize("case", _sweep_cases(), ids=str)
def test_decode_sweep(case):
  run_case(*case, seed=hash(case) % 2**32)


def test_zero_length_requests_and_causal_rows_without_keys():
  # FlashMLA's corner case (b=128, s_q=2, s_k=4096 with empty requests), CPU-sized;
  # causal s_q=4 with length 2 leaves the first two query rows without keys.
  run_case(16, 2, 140, 16, 1, True, True, zero_lengths=(0, 5, 15))
  rng = np.random.default_rng(1)
  seqlens = np.array([2, 0, 1], np.int32)
  kv, table = ref.paged_cache(rng, seqlens, h_kv=1)
  q = ref.queries(rng, 3, 4, 8)
  for impl in IMPLS:
    out, lse = decode(q, kv, table, seqlens, causal=True, impl=impl)
    lse, out = np.asarray(lse), np.asarray(out.astype(jnp.float32))
    assert np.all(np.isposinf(lse[0, :, :2])) and np.all(np.isfinite(lse[0, :, 2:]))
    assert np.all(np.isposinf(lse[1])) and np.all(out[1] == 0)
    assert np.all(np.isposinf(lse[2, :, :3])) and np.all(out[2, :3] == 0)


@pytest.mark.parametrize("page", [64, 61])
def test_fp8_cache_matches_reference_on_dequantized_cache(page):
  rng = np.random.default_rng(page)
  b, s_q, h_q = 3, 2, 16
  seqlens = np.array([150, 7, 64], np.int32)
  dense, table = ref.paged_cache(rng, seqlens, h_kv=1, page=page, dtype=np.float32)
  records = np.array(jax.jit(mla.quantize_kv_fp8)(np.nan_to_num(dense)))
  records[np.isnan(dense[..., 0])] = 0xFF  # poison unused rows: NaN values and NaN scales
  q = ref.queries(rng, b, s_q, h_q)
  want_out, want_lse = ref.decode(q, records, table, seqlens, SCALE, True,
                                  tokens_of=ref.dequantize_fp8)
  for impl in IMPLS:
    out, lse = decode(q, records, table, seqlens, causal=True, kv_format="fp8", impl=impl)
    ref.check_decode(out, lse, want_out, want_lse)


def test_float32_inputs():
  rng = np.random.default_rng(3)
  seqlens = np.array([100, 33], np.int32)
  kv, table = ref.paged_cache(rng, seqlens, h_kv=2, dtype=np.float32)
  q = ref.queries(rng, 2, 2, 4, np.float32)
  want_out, want_lse = ref.decode(q, kv, table, seqlens, SCALE, True)
  for impl in IMPLS:
    out, lse = decode(q, kv, table, seqlens, causal=True, impl=impl)
    assert out.dtype == jnp.float32
    ref.assert_close("out", out, want_out, abs_tol=1e-6, rel_tol=1e-5)
    ref.assert_close("lse", lse, want_lse, abs_tol=1e-6, rel_tol=1e-6)


# --- data-dependent bad input -------------------------------------------------------------------


def bad_input_case():
  rng = np.random.default_rng(4)
  seqlens = np.array([100, 70, 64, 10, 5, 128], np.int32)
  kv, table = ref.paged_cache(rng, seqlens, h_kv=1)
  q = ref.queries(rng, 6, 1, 4)
  bad = seqlens.copy()
  bad_table = table.copy()
  bad[1] = 129          # beyond the table's capacity (2 pages of 64)
  bad[3] = -5           # negative
  bad_table[4, 0] = kv.shape[0]    # a needed page out of range
  bad_table[5, 1] = -2147483648    # another one
  bad_table[2, 1] = 2**31 - 1      # unused slot (64 tokens fill page 0 exactly): ignored
  return q, kv, bad_table, bad, table, seqlens


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_lengths_and_page_ids_give_nan_rows_only(impl):
  q, kv, bad_table, bad_lengths, table, seqlens = bad_input_case()
  out, lse = decode(q, kv, bad_table, bad_lengths, impl=impl)
  out, lse = np.asarray(out.astype(jnp.float32)), np.asarray(lse)
  poisoned = np.array([False, True, False, True, True, True])
  assert np.all(np.isnan(out[poisoned])) and np.all(np.isnan(lse[poisoned]))
  want_out, want_lse = ref.decode(q, kv, table, seqlens, SCALE, False)
  ref.check_decode(out[~poisoned], lse[~poisoned], want_out[~poisoned], want_lse[~poisoned])


def test_custom_call_guards_itself_against_bad_data():
  q, kv, bad_table, bad_lengths, table, seqlens = bad_input_case()
  # The handler's own contract: bad requests count as length 0 for the schedule
  # and come back NaN; it reads nothing out of range (ids of +-2^31 would crash).
  lengths = np.where([False, True, False, True, True, True], 0, bad_lengths).astype(np.int32)
  metadata = jax.jit(mla.get_mla_metadata, static_argnums=(1, 2))(lengths, 4, 1)
  out, lse, _, _ = raw_decode(q, kv, bad_table, bad_lengths, metadata, softmax_scale=SCALE)
  poisoned = np.array([False, True, False, True, True, True])
  assert np.all(np.isnan(np.asarray(lse)[poisoned]))
  assert np.all(np.isnan(np.asarray(out.astype(jnp.float32))[poisoned]))
  want_out, want_lse = ref.decode(q, kv, table, seqlens, SCALE, False)
  ref.check_decode(np.asarray(out.astype(jnp.float32))[~poisoned], np.asarray(lse)[~poisoned],
                   want_out[~poisoned], want_lse[~poisoned])


@pytest.mark.parametrize("corrupt", ["wrong_lengths", "garbage", "overlap", "num_splits"])
def test_custom_call_rejects_a_schedule_that_does_not_cover_the_requests(corrupt):
  q, kv, _, _, table, seqlens = bad_input_case()
  tile_meta, splits = (np.array(m) for m in mla.get_mla_metadata(seqlens, 4, 1, num_sms=8))
  if corrupt == "wrong_lengths":
    tile_meta, splits = (np.array(m) for m in mla.get_mla_metadata(seqlens * 3, 4, 1,
                                                                      num_sms=8))
  elif corrupt == "garbage":
    tile_meta = np.random.default_rng(0).integers(-2**31, 2**31 - 1, tile_meta.shape, np.int32)
  elif corrupt == "overlap":
    tile_meta[1] = tile_meta[0]
  else:
    splits = splits.copy()
    splits[-1] += 1
  with pytest.raises(Exception, match="mla_decode: .*(schedule|num_splits|tile)"):
    jax.block_until_ready(raw_decode(q, kv, table, seqlens, (tile_meta, splits),
                                     softmax_scale=SCALE))


def test_precomputed_metadata_is_used_and_checked():
  q, kv, _, _, table, seqlens = bad_input_case()
  metadata = mla.get_mla_metadata(jnp.asarray(seqlens), 4, 1, num_sms=20)
  out, lse = decode(q, kv, table, seqlens, metadata=metadata, impl="ffi")
  ref.check_decode(out, lse, *ref.decode(q, kv, table, seqlens, SCALE, False))
  stale = mla.get_mla_metadata(jnp.asarray(seqlens + 64), 4, 1, num_sms=20)
  with pytest.raises(Exception, match="mla_decode: .*(schedule|tile)"):
    jax.block_until_ready(decode(q, kv, table, seqlens, metadata=stale, impl="ffi"))


# --- transformations ---------------------------------------------------------------------------


def test_vmap_and_shard_map_over_requests():
  rng = np.random.default_rng(5)
  seqlens = ref.lengths_for(rng, 8, 140, 1, True)
  kv, table = ref.paged_cache(rng, seqlens, h_kv=1)
  q = ref.queries(rng, 8, 1, 16)
  want_out, want_lse = ref.decode(q, kv, table, seqlens, SCALE, False)
  # vmap (the custom call's; the xla path is plain JAX) over two half-batches, cache shared.
  halves = lambda x: x.reshape(2, 4, *x.shape[1:])
  decode_ffi = functools.partial(mla.mla_decode, softmax_scale=SCALE, impl="ffi")
  out, lse = jax.jit(jax.vmap(decode_ffi, in_axes=(0, None, 0, 0)))(
      halves(q), kv, halves(table), halves(seqlens))
  ref.check_decode(out.reshape(8, *out.shape[2:]), lse.reshape(8, *lse.shape[2:]),
                   want_out, want_lse)
  mesh = jax.make_mesh((8,), ("batch",), axis_types=(jax.sharding.AxisType.Explicit,))
  split = lambda x: jax.device_put(x, jax.NamedSharding(mesh, P("batch")))
  for impl in IMPLS:
    sharded = jax.jit(jax.shard_map(
        functools.partial(mla.mla_decode, softmax_scale=SCALE, impl=impl), mesh=mesh,
        in_specs=(P("batch"), P(), P("batch"), P("batch")), out_specs=(P("batch"), P("batch"))))
    out, lse = sharded(split(q), kv, split(table), split(seqlens))
    assert len(out.sharding.device_set) == 8
    ref.check_decode(out, lse, want_out, want_lse)


def test_not_differentiable():
  rng = np.random.default_rng(6)
  seqlens = np.array([10], np.int32)
  kv, table = ref.paged_cache(rng, seqlens, h_kv=1, dtype=np.float32)
  q = ref.queries(rng, 1, 1, 2, np.float32)
  for impl in IMPLS:
    f = lambda q: mla.mla_decode(q, np.nan_to_num(kv), table, seqlens, softmax_scale=SCALE,
                                 impl=impl)[0].sum()
    with pytest.raises(TypeError, match="mla_decode is not differentiable"):
      jax.grad(f)(q)


def test_kill_switch_uses_the_xla_path(monkeypatch):
  monkeypatch.setenv("JAXINFRA_DISABLE_CUSTOM_CALLS", "mla_decode")
  rng = np.random.default_rng(7)
  seqlens = np.array([30], np.int32)
  kv, table = ref.paged_cache(rng, seqlens, h_kv=1)
  q = ref.queries(rng, 1, 1, 2)
  text = jax.jit(functools.partial(mla.mla_decode, softmax_scale=SCALE)).lower(
      q, kv, table, seqlens).as_text()
  assert "jaxinfra_mla_decode" not in text
  monkeypatch.delenv("JAXINFRA_DISABLE_CUSTOM_CALLS")
  text = jax.jit(functools.partial(mla.mla_decode, softmax_scale=SCALE, impl="ffi")).lower(
      q, kv, table, seqlens).as_text()
  assert "jaxinfra_mla_decode" in text


# --- static validation -------------------------------------------------------------------------


def _good():
  q = np.zeros((2, 1, 4, 576), ml_dtypes.bfloat16)
  kv = np.zeros((5, 64, 1, 576), ml_dtypes.bfloat16)
  return q, kv, np.zeros((2, 3), np.int32), np.zeros((2,), np.int32)


@pytest.mark.parametrize("change, kwargs, message", [
    (lambda a: (a[0][..., :512], *a[1:]), {}, r"q must be \[b, s_q, h_q, 576\].*\(2, 1, 4, 512\)"),
    (lambda a: (a[0].astype(np.float16), *a[1:]), {}, "q must be bfloat16"),
    (lambda a: (a[0], a[1][:, :32], *a[2:]), {}, r"page size .* must be 64.*\(5, 32, 1, 576\)"),
    (lambda a: (a[0], a[1][..., :512], *a[2:]), {}, r"kv_cache must be .*\(5, 64, 1, 512\)"),
    (lambda a: (a[0], np.zeros((5, 64, 3, 576), ml_dtypes.bfloat16), *a[2:]), {},
     r"h_q % h_kv must be 0"),
    (lambda a: (a[0], a[1].astype(np.float32), *a[2:]), {}, "kv_cache must have q's dtype"),
    (lambda a: (*a[:2], a[2].astype(np.float32), a[3]), {}, r"block_table must be int32"),
    (lambda a: (*a[:2], a[2][:1], a[3]), {}, r"block_table must be int32 \[b=2.*\(1, 3\)"),
    (lambda a: (*a[:3], a[3][:1]), {}, r"cache_seqlens must be int32 \[b=2\].*\(1,\)"),
    (lambda a: a, {"head_dim_v": 576}, "head_dim_v must be 512"),
    (lambda a: a, {"kv_format": "fp8"}, r"kv_cache must be uint8 \[num_blocks, page, 1, 656\]"),
    (lambda a: a, {"kv_format": "int8"}, "kv_format must be one of"),
    (lambda a: a, {"impl": "cuda"}, "impl must be one of"),
    (lambda a: a, {"metadata": (np.zeros((3, 7), np.int32), np.zeros(3, np.int32))},
     r"tile_scheduler_metadata must be int32 \[num_sm_parts, 8\].*\(3, 7\)"),
])
def test_bad_static_arguments_raise(change, kwargs, message):
  args = change(_good())
  with pytest.raises(ValueError, match=message):
    mla.mla_decode(*args, softmax_scale=SCALE, **kwargs)


def test_schedule_sizes_follow_flashmla():
  # num_sm_parts = max(num_sms // h_kv // ceil(s_q * h_q / h_kv / 64), 1)
  assert schedule.num_sm_parts(128, 1, 132) == 66   # h_q=128, s_q=1 on an H800
  assert schedule.num_sm_parts(256, 1, 132) == 33
  assert schedule.num_sm_parts(16, 1, 132) == 132
  assert schedule.num_sm_parts(64, 8, 132) == 16
  assert schedule.num_sm_parts(4096, 8, 132) == 1
