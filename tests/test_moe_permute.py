"""jaxinfra.moe local ops: permute/unpermute (custom call and xla path), the
scan grouped matmul, and the dispatch layout."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra import moe
from jaxinfra.moe import grouped
from jaxinfra.moe import permutation

IMPLS = ("ffi", "xla")


def ref_map(ids, groups, capacity=None, num_rows=None):
  """NumPy: stable sort of copies by group -> (row_id_map, group_sizes, dropped, M)."""
  n, d = ids.shape
  copies = [(int(ids[i, j]), i, j) for i in range(n) for j in range(d) if 0 <= ids[i, j] < groups]
  copies.sort(key=lambda c: c[0])  # stable: (row, column) order within a group
  row_map = np.full((n, d), -1, np.int32)
  sizes = np.zeros(groups, np.int32)
  if capacity is not None:
    for g, i, j in copies:
      if sizes[g] < capacity:
        row_map[i, j] = g * capacity + sizes[g]
        sizes[g] += 1
    m = groups * capacity
  else:
    m = n * d if num_rows is None else num_rows
    for pos, (g, i, j) in enumerate(copies):
      if pos < m:
        row_map[i, j] = pos
        sizes[g] += 1
  return row_map, sizes, len(copies) - int(sizes.sum()), m


def routing(n=40, k=4, groups=9, seed=0, invalid=True):
  rng = np.random.default_rng(seed)
  ids = np.stack([rng.choice(groups, k, replace=False) for _ in range(n)]).astype(np.int32)
  if invalid:
    ids[rng.random((n, k)) < 0.1] = -1
    ids[3, 0] = groups + 5  # out of range: no copy
  return ids


def bits(a):
  a = np.asarray(a)
  return a.view(np.uint8) if a.dtype.itemsize == 1 or a.dtype.kind == "V" or a.dtype == jnp.bfloat16 else a


@pytest.mark.parametrize("mode", [dict(), dict(capacity=3), dict(num_rows=70)])
def test_permute_map_matches_numpy(mode):
  ids = routing()
  row_map, sizes, dropped, m = permutation.permute_map(jnp.asarray(ids), 9, **mode)
  want_map, want_sizes, want_dropped, want_m = ref_map(ids, 9, **mode)
  np.testing.assert_array_equal(row_map, want_map)
  np.testing.assert_array_equal(sizes, want_sizes)
  assert int(dropped) == want_dropped and m == want_m


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.int32, jnp.float8_e4m3fn])
@pytest.mark.parametrize("mode", [dict(), dict(capacity=3)])
def test_permute_moves_rows(impl, dtype, mode):
  ids = routing()
  x = (np.arange(40 * 24).reshape(40, 24) % 200).astype(np.float32)
  xj = jnp.asarray(x).astype(dtype)
  out = jax.jit(functools.partial(moe.permute, num_experts=9, impl=impl, **mode))(xj, ids)
  want_map, want_sizes, want_dropped, m = ref_map(ids, 9, **mode)
  want = np.zeros((m, 24), np.float32)
  for i, j in zip(*np.nonzero(want_map >= 0)):
    want[want_map[i, j]] = np.asarray(xj[i].astype(jnp.float32))
  assert out.rows.dtype == dtype and out.rows.shape == (m, 24)
  np.testing.assert_array_equal(np.asarray(out.rows.astype(jnp.float32)), want)
  np.testing.assert_array_equal(out.row_id_map, want_map)
  np.testing.assert_array_equal(out.group_sizes, want_sizes)
  assert int(out.num_dropped) == want_dropped


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_unpermute_matches_numpy_and_custom_call_equals_xla_bitwise(dtype):
  rng = np.random.default_rng(1)
  ids = routing()
  row_map, _, _, m = ref_map(ids, 9)
  y = jnp.asarray(rng.standard_normal((m, 48)), dtype)
  w = rng.random(ids.shape).astype(np.float32)
  outs = {impl: jax.jit(functools.partial(moe.unpermute, impl=impl))(y, row_map, w)
          for impl in IMPLS}
  assert np.array_equal(bits(outs["ffi"]), bits(outs["xla"]))
  y64 = np.asarray(y.astype(jnp.float32), np.float64)
  want = np.zeros((ids.shape[0], 48))
  for i, j in zip(*np.nonzero(row_map >= 0)):
    want[i] += w[i, j] * y64[row_map[i, j]]
  tol = 1e-6 if dtype == jnp.float32 else 8e-3
  np.testing.assert_allclose(np.asarray(outs["ffi"].astype(jnp.float32)), want, rtol=tol,
                             atol=tol)
  # Unweighted: a plain sum.
  plain = moe.unpermute(y, jnp.asarray(row_map))
  want_plain = np.zeros_like(want)
  for i, j in zip(*np.nonzero(row_map >= 0)):
    want_plain[i] += y64[row_map[i, j]]
  np.testing.assert_allclose(np.asarray(plain.astype(jnp.float32)), want_plain, rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
def test_unpermute_skips_out_of_range_map_entries(impl):
  y = jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
  row_map = jnp.array([[0, -1], [4, 3], [10**6, -(10**6)]], jnp.int32)
  w = jnp.ones((3, 2), jnp.float32)
  out = moe.unpermute(y, row_map, w, impl=impl)
  np.testing.assert_array_equal(out, [[0, 1, 2], [9, 10, 11], [0, 0, 0]])


@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_and_determinism(impl):
  rng = np.random.default_rng(2)
  ids = routing(invalid=False)
  x = jnp.asarray(rng.standard_normal((40, 32)), jnp.float32)
  w = rng.random(ids.shape).astype(np.float32)

  @jax.jit
  def round_trip(x, ids, w):
    out = moe.permute(x, ids, 9, impl=impl)
    return moe.unpermute(out.rows, out.row_id_map, w, impl=impl)

  got = [np.asarray(round_trip(x, ids, w)) for _ in range(3)]
  np.testing.assert_allclose(got[0], np.asarray(x) * w.sum(1, keepdims=True), rtol=1e-6)
  assert all(np.array_equal(got[0], g) for g in got[1:])


def _float_scatter_adds(jaxpr):
  found = []
  for eqn in jaxpr.eqns:
    if "scatter" in str(eqn.primitive) and "add" in str(eqn.primitive):
      if any(jnp.issubdtype(v.aval.dtype, jnp.floating) and v.aval.ndim >= 2 for v in eqn.outvars):
        found.append(eqn)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found += _float_scatter_adds(inner)
  return found


@pytest.mark.parametrize("impl", IMPLS)
def test_vjps_match_numpy_without_scatter_add(impl):
  rng = np.random.default_rng(3)
  ids = routing()
  x = rng.standard_normal((40, 16)).astype(np.float32)
  w = rng.random(ids.shape).astype(np.float32)
  probe_rows = rng.standard_normal((160, 16)).astype(np.float32)
  probe_out = rng.standard_normal((40, 16)).astype(np.float32)

  def f(x, w):
    out = moe.permute(x, ids, 9, impl=impl)
    y = out.rows * probe_rows
    return jnp.sum(moe.unpermute(y, out.row_id_map, w, impl=impl) * probe_out)

  grad_fn = jax.jit(jax.grad(f, argnums=(0, 1)))
  gx, gw = grad_fn(x, w)
  row_map, _, _, _ = ref_map(ids, 9)
  want_gx, want_gw = np.zeros_like(x, np.float64), np.zeros_like(w, np.float64)
  for i, j in zip(*np.nonzero(row_map >= 0)):
    r = row_map[i, j]
    want_gx[i] += w[i, j] * probe_rows[r] * probe_out[i]
    want_gw[i, j] = np.sum(x[i] * probe_rows[r] * probe_out[i])
  np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gw, want_gw, rtol=1e-5, atol=1e-6)
  assert not _float_scatter_adds(jax.make_jaxpr(jax.grad(f, argnums=(0, 1)))(x, w).jaxpr)


def test_vmap_and_shard_map():
  rng = np.random.default_rng(4)
  ids = np.stack([routing(seed=s) for s in range(8)])            # [8, 40, 4]
  x = rng.standard_normal((8, 40, 16)).astype(np.float32)
  batched = jax.jit(jax.vmap(lambda x, i: moe.permute(x, i, 9, impl="ffi").rows))(x, ids)
  for b in range(8):
    np.testing.assert_array_equal(batched[b], moe.permute(x[b], ids[b], 9, impl="xla").rows)
  mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,))
  sharding = NamedSharding(mesh, P("ep"))
  sharded = jax.jit(jax.shard_map(
      lambda x, i: moe.permute(x, i, 9).rows, mesh=mesh, in_specs=(P("ep"), P("ep")),
      out_specs=P("ep")))(jax.device_put(x.reshape(320, 16), sharding),
                          jax.device_put(ids.reshape(320, 4), sharding))
  np.testing.assert_array_equal(np.asarray(sharded).reshape(8, 160, 16), batched)


def test_permute_rejects_bad_arguments():
  x, ids = np.zeros((4, 8), np.float32), np.zeros((4, 2), np.int32)
  with pytest.raises(ValueError, match=r"x must have shape \[N, H\], got shape \(4,\)"):
    moe.permute(np.zeros(4), ids, 3)
  with pytest.raises(ValueError, match="topk_idx must be an integer array"):
    moe.permute(x, ids.astype(np.float32), 3)
  with pytest.raises(ValueError, match=r"same number of rows, got shapes \(4, 8\) and \(5, 2\)"):
    moe.permute(x, np.zeros((5, 2), np.int32), 3)
  with pytest.raises(ValueError, match="num_experts must be a positive int"):
    moe.permute(x, ids, 0)
  with pytest.raises(ValueError, match="not both"):
    moe.permute(x, ids, 3, capacity=2, num_rows=4)
  with pytest.raises(ValueError, match=r"weights must have row_id_map's shape \(4, 2\)"):
    moe.unpermute(np.zeros((8, 8), np.float32), ids, np.zeros((4, 3), np.float32))
  with pytest.raises(ValueError, match="row_id_map must be int32"):
    moe.unpermute(np.zeros((8, 8), np.float32), ids.astype(np.int16))
  with pytest.raises(ValueError, match="impl='ffi' handles float32 and bfloat16"):
    moe.unpermute(np.zeros((8, 8), np.float16), ids, impl="ffi")


# --- the scan grouped matmul ---------------------------------------------------------------------


def ref_gmm(x, w, sizes):
  out = np.zeros((x.shape[0], w.shape[2]))
  start = 0
  for g, size in enumerate(sizes):
    out[start:start + size] = np.asarray(x[start:start + size], np.float64) @ w[g]
    start += size
  return out


@pytest.mark.parametrize("sizes, tile", [([5, 0, 17, 64, 1, 0, 13], 16), ([0, 0, 3], 8),
                                         ([40, 40, 40], 64)])
def test_gmm_matches_numpy_forward_and_backward(sizes, tile):
  rng = np.random.default_rng(5)
  m, g, k, n = 130, len(sizes), 24, 20
  sizes = np.asarray(sizes, np.int32)
  x = rng.standard_normal((m, k)).astype(np.float32)
  w = rng.standard_normal((g, k, n)).astype(np.float32)
  probe = rng.standard_normal((m, n)).astype(np.float32)
  out = jax.jit(functools.partial(grouped.gmm, tile=tile))(x, w, sizes)
  np.testing.assert_allclose(out, ref_gmm(x, w, sizes), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(x, w, sizes), rtol=1e-5, atol=1e-5)
  gx, gw = jax.jit(jax.grad(lambda x, w: jnp.sum(grouped.gmm(x, w, sizes, tile=tile) * probe),
                            argnums=(0, 1)))(x, w)
  rx, rw = jax.grad(lambda x, w: jnp.sum(jax.lax.ragged_dot(x, w, sizes) * probe),
                    argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)


def test_gmm_compiled_memory_does_not_scale_with_groups_times_rows():
  # m large enough that weight-sized temporaries (XLA on jax 0.11 keeps two [G, k, n]
  # float32 buffers where 0.10 keeps one) stay far below a [G, M, k] intermediate.
  m, k, n = 2048, 128, 64
  temps = {}
  for g in (16, 64):
    x = jnp.zeros((m, k)); w = jnp.zeros((g, k, n)); sizes = jnp.full((g,), m // g, jnp.int32)
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(grouped.gmm(x, w, sizes)), argnums=(0, 1)))
    temps[g] = f.lower(x, w).compile().memory_analysis().temp_size_in_bytes
  # A [G, M, k] intermediate alone would be 64-256 MiB; weights [G, k, n] are 0.5-2 MiB.
  assert temps[64] < 4 * (64 * k * n * 4) + 4 * m * (k + n) * 4, temps
  assert temps[64] < m * 64 * k * 4 / 4, temps
