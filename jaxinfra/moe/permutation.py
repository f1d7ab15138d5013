"""Local permute/unpermute: token copies sorted by expert, and back.

Everything here is driven by a *row map*: ``row_id_map [n, d]`` (int32) says
where copy ``j`` of source row ``i`` lives in the permuted array, or ``-1``
when it has no row (an invalid id, or dropped for capacity). Two data-movement
ops use it; each has an XLA FFI custom call (a CPU handler; the CUDA kernel
comes later) and a pure-JAX path that agree bit for bit:

* ``permute`` rows: ``rows[row_id_map[i, j]] = x[i]``; rows nothing points at
  are zero. Any dtype (rows are copied as bytes).
* ``unpermute`` rows: ``out[i] = sum_j weights[i, j] * y[row_id_map[i, j]]``,
  accumulated in float32 in ``j`` order (top-k order for a MoE), rounded to
  ``y``'s dtype.

They are each other's transpose, which gives custom VJPs without a
scatter-add: the gradient of a permute is an (unweighted) unpermute, and the
gradient of an unpermute with respect to ``y`` is a permute of the cotangent
times the weights. The gradient with respect to the weights is a per-copy dot
product.

:func:`permute_map` computes the map: copies with a group id in ``[0, G)`` are
sorted stably by group (ties in source order: row, then column), so the
result is deterministic. Packed (default): rows ``0 .. valid-1`` in sorted
order, optionally limited to ``num_rows`` rows. Blocked (``capacity=C``):
group ``g`` owns rows ``[g*C, (g+1)*C)``, its first ``C`` copies fill them and
the rest are dropped. Dropped copies are counted, never silently lost. The
expert-parallel dispatch uses the blocked form with "destination rank" as the
group; the MoE layer uses the packed form with "local expert" as the group.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra import _custom_call
from jaxinfra.moe import _validate

PERMUTE = _custom_call.define("moe_permute", verified=("cpu",))
UNPERMUTE = _custom_call.define("moe_unpermute", verified=("cpu",))

# Dtypes the unpermute custom call handles; other floating dtypes use the xla path.
_UNPERMUTE_FFI_DTYPES = (np.dtype(jnp.float32), np.dtype(jnp.bfloat16))


class Permuted(NamedTuple):
  """Result of :func:`permute`.

  Attributes:
    rows: ``[M, H]``, x's rows grouped by expert (zero rows where no copy lands).
    row_id_map: ``[N, K]`` int32, the row of each copy or -1.
    group_sizes: ``[G]`` int32, rows kept per group (what a grouped GEMM needs).
    num_dropped: int32 scalar, valid copies that got no row.
  """
  rows: jax.Array
  row_id_map: jax.Array
  group_sizes: jax.Array
  num_dropped: jax.Array


# --- the row map (pure JAX, integers only) -------------------------------------------------------


def permute_map(group_ids: jax.Array, num_groups: int, *, capacity: int | None = None,
                num_rows: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array, int]:
  """Sorts copies by group: the row map of :func:`permute`.

  Args:
    group_ids: ``[N, D]`` integer; entries outside ``[0, num_groups)`` (such
      as -1) are "no copy".
    num_groups: ``G``.
    capacity: rows per group (blocked layout, ``M = G * capacity``), or None
      for the packed layout.
    num_rows: packed layout only: ``M`` (default ``N * D``, never drops).

  Returns:
    ``(row_id_map [N, D] int32, group_sizes [G] int32 (kept rows),
    num_dropped int32 scalar, M)``.
  """
  n, d = group_ids.shape
  flat = group_ids.reshape(-1)
  valid = (flat >= 0) & (flat < num_groups)
  key = jnp.where(valid, flat, num_groups).astype(jnp.int32)
  order = jnp.argsort(key, stable=True)
  sorted_key = key[order]
  counts = jnp.bincount(key, length=num_groups + 1).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  position = jnp.arange(n * d, dtype=jnp.int32)
  in_group = position - starts[sorted_key]
  sorted_valid = sorted_key < num_groups
  if capacity is not None:
    m = num_groups * capacity
    dest = jnp.where(sorted_valid & (in_group < capacity), sorted_key * capacity + in_group, -1)
    kept = jnp.minimum(counts[:num_groups], capacity)
  else:
    m = n * d if num_rows is None else num_rows
    dest = jnp.where(sorted_valid & (position < m), position, -1)
    kept = jnp.clip(m - starts[:num_groups], 0, counts[:num_groups])
  row_id_map = jnp.zeros(n * d, jnp.int32).at[order].set(dest.astype(jnp.int32),
                                                         unique_indices=True)
  num_dropped = jnp.sum(valid, dtype=jnp.int32) - jnp.sum(kept, dtype=jnp.int32)
  return row_id_map.reshape(n, d), kept.astype(jnp.int32), num_dropped, m


# --- row movement: pure-JAX paths ----------------------------------------------------------------


def _permute_rows_xla(x: jax.Array, row_id_map: jax.Array, *, num_rows: int) -> jax.Array:
  n, d = row_id_map.shape
  flat = row_id_map.reshape(-1)
  target = jnp.where((flat >= 0) & (flat < num_rows), flat, num_rows)
  source = jnp.full((num_rows,), n, jnp.int32).at[target].set(
      jnp.arange(n * d, dtype=jnp.int32) // d, mode="drop")
  return jnp.take(x, source, axis=0, mode="fill", fill_value=0)


def _take_rows(y: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
  """y[index] in the accumulation dtype, zeros where index is outside [0, m); the mask."""
  m = y.shape[0]
  ok = (index >= 0) & (index < m)
  rows = jnp.take(y, jnp.where(ok, index, m), axis=0, mode="fill", fill_value=0)
  return rows.astype(_validate.accum_dtype(y.dtype)), ok


def _unpermute_rows_xla(y: jax.Array, row_id_map: jax.Array, weights: jax.Array) -> jax.Array:
  n, d = row_id_map.shape
  acc = jnp.zeros((n, y.shape[1]), _validate.accum_dtype(y.dtype))
  for j in range(d):  # top-k order, as the custom call
    rows, ok = _take_rows(y, row_id_map[:, j])
    acc = acc + jnp.where(ok[:, None], weights[:, j:j + 1] * rows, 0)
  return acc.astype(y.dtype)


# --- row movement: custom calls ------------------------------------------------------------------


def _permute_rows_ffi(x: jax.Array, row_id_map: jax.Array, *, num_rows: int) -> jax.Array:
  out = jax.ShapeDtypeStruct((num_rows, x.shape[1]), x.dtype)
  return _custom_call.ffi_call(PERMUTE.target, out, x, row_id_map, vmap_method="sequential")


def _unpermute_rows_ffi(y: jax.Array, row_id_map: jax.Array, weights: jax.Array) -> jax.Array:
  out = jax.ShapeDtypeStruct((row_id_map.shape[0], y.shape[1]), y.dtype)
  return _custom_call.ffi_call(UNPERMUTE.target, out, y, row_id_map, weights,
                               vmap_method="sequential")


def _permute_rows_raw(x, row_id_map, num_rows: int, impl: str) -> jax.Array:
  fn = _custom_call.select(
      PERMUTE, impl, ffi=lambda a, b: _permute_rows_ffi(a, b, num_rows=num_rows),
      xla=lambda a, b: _permute_rows_xla(a, b, num_rows=num_rows))
  return fn(x, row_id_map)


def _unpermute_rows_raw(y, row_id_map, weights, impl: str) -> jax.Array:
  weights = weights.astype(_validate.accum_dtype(y.dtype))
  if y.dtype not in _UNPERMUTE_FFI_DTYPES:
    if impl == "ffi":
      raise ValueError(f"moe_unpermute: impl='ffi' handles float32 and bfloat16, got y of dtype "
                       f"{y.dtype} with shape {y.shape}; use impl='auto' or impl='xla'")
    impl = "xla"
  return _custom_call.select(UNPERMUTE, impl, ffi=_unpermute_rows_ffi,
                             xla=_unpermute_rows_xla)(y, row_id_map, weights)


def _weights_by_row(weights: jax.Array, row_id_map: jax.Array, num_rows: int) -> jax.Array:
  """[M]: the weight of the copy each row holds (0 for empty rows)."""
  flat = row_id_map.reshape(-1)
  target = jnp.where((flat >= 0) & (flat < num_rows), flat, num_rows)
  return jnp.zeros((num_rows,), weights.dtype).at[target].set(weights.reshape(-1), mode="drop")


# --- differentiable row movement (used by dispatch/combine too) ----------------------------------


def permute_rows(x: jax.Array, row_id_map: jax.Array, num_rows: int, impl: str = "auto") -> jax.Array:
  """``rows [num_rows, H]`` with ``rows[row_id_map[i, j]] = x[i]`` (zeros elsewhere).

  ``row_id_map`` must come from :func:`permute_map` (valid entries distinct).
  Differentiable for floating ``x``: the VJP is an unweighted
  :func:`unpermute_rows` (a gather-sum, no scatter-add).
  """
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    return _permute_rows_raw(x, row_id_map, num_rows, impl)

  @jax.custom_vjp
  def move(x, row_id_map):
    return _permute_rows_raw(x, row_id_map, num_rows, impl)

  def fwd(x, row_id_map):
    return move(x, row_id_map), row_id_map

  def bwd(row_id_map, g):
    ones = jnp.ones(row_id_map.shape, jnp.float32)
    return _unpermute_rows_raw(g, row_id_map, ones, impl).astype(x.dtype), None

  move.defvjp(fwd, bwd)
  return move(x, row_id_map)


def unpermute_rows(y: jax.Array, row_id_map: jax.Array, weights: jax.Array | None = None,
                   impl: str = "auto") -> jax.Array:
  """``out [N, H]``, ``out[i] = sum_j weights[i, j] * y[row_id_map[i, j]]``, float32 sums.

  (float64 sums for float64 ``y``.)

  ``weights`` None means all ones. Differentiable in ``y`` (VJP: a permute of
  the cotangent times the weights) and ``weights`` (a per-copy dot product).
  """
  num_rows = y.shape[0]
  if weights is None:

    @jax.custom_vjp
    def reduce(y, row_id_map):
      return _unpermute_rows_raw(y, row_id_map, jnp.ones(row_id_map.shape, jnp.float32), impl)

    def fwd(y, row_id_map):
      return reduce(y, row_id_map), row_id_map

    def bwd(row_id_map, g):
      return _permute_rows_raw(g, row_id_map, num_rows, impl).astype(y.dtype), None

    reduce.defvjp(fwd, bwd)
    return reduce(y, row_id_map)

  @jax.custom_vjp
  def weighted(y, weights, row_id_map):
    return _unpermute_rows_raw(y, row_id_map, weights, impl)

  def weighted_fwd(y, weights, row_id_map):
    return weighted(y, weights, row_id_map), (y, weights, row_id_map)

  def weighted_bwd(residuals, g):
    y, weights, row_id_map = residuals
    acc = _validate.accum_dtype(y.dtype)
    moved = _permute_rows_raw(g, row_id_map, num_rows, impl).astype(acc)
    grad_y = moved * _weights_by_row(weights.astype(acc), row_id_map, num_rows)[:, None]
    g_acc = g.astype(acc)
    grad_w = []
    for j in range(row_id_map.shape[1]):
      rows, ok = _take_rows(y, row_id_map[:, j])
      grad_w.append(jnp.where(ok, jnp.sum(rows * g_acc, axis=1), 0))
    return grad_y.astype(y.dtype), jnp.stack(grad_w, axis=1).astype(weights.dtype), None

  weighted.defvjp(weighted_fwd, weighted_bwd)
  return weighted(y, weights, row_id_map)


# --- public API ----------------------------------------------------------------------------------


def permute(x: jax.Array, topk_idx: jax.Array, num_experts: int, *, capacity: int | None = None,
            num_rows: int | None = None, impl: str = "auto") -> Permuted:
  """Sorts token copies by expert (stable, so deterministic).

  Args:
    x: ``[N, H]`` tokens, any dtype (float32/bfloat16 to differentiate).
    topk_idx: ``[N, K]`` integer expert ids; ids outside ``[0, num_experts)``
      (such as -1) make no copy.
    num_experts: ``G``, the number of groups.
    capacity: per-expert rows (blocked layout ``[G * capacity, H]``); None for
      the packed layout.
    num_rows: packed layout only: output rows ``M`` (default ``N * K``, which
      never drops); copies beyond row ``M`` in sorted order are dropped.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    :class:`Permuted` ``(rows [M, H], row_id_map [N, K] int32,
    group_sizes [G] int32, num_dropped int32)``. In the packed layout expert
    ``g``'s rows are ``rows[sum(group_sizes[:g]) : sum(group_sizes[:g+1])]``,
    each in source order, and the rows after ``sum(group_sizes)`` are zero.
  """
  op = "permute"
  x = _validate.array(op, "x", x, ndim=2, dims="[N, H]")
  topk_idx = _validate.array(op, "topk_idx", topk_idx, ndim=2, dims="[N, K]", kind="int")
  _validate.same_rows(op, ("x", "topk_idx"), x, topk_idx)
  num_experts = _validate.positive_int(op, "num_experts", num_experts)
  capacity = _validate.positive_int(op, "capacity", capacity, allow_none=True)
  num_rows = _validate.positive_int(op, "num_rows", num_rows, allow_none=True)
  if capacity is not None and num_rows is not None:
    raise ValueError(f"{op}: give capacity (blocked layout) or num_rows (packed), not both; got "
                     f"capacity={capacity}, num_rows={num_rows}")
  row_id_map, group_sizes, dropped, m = permute_map(topk_idx, num_experts, capacity=capacity,
                                                    num_rows=num_rows)
  rows = permute_rows(x, row_id_map, m, impl)
  return Permuted(rows, row_id_map, group_sizes, dropped)


def unpermute(y: jax.Array, row_id_map: jax.Array, weights: jax.Array | None = None, *,
              impl: str = "auto") -> jax.Array:
  """Inverse of :func:`permute`: each token's copies, weighted and summed.

  Args:
    y: ``[M, H]`` float (float32 or bfloat16 use the custom call), e.g. the
      expert outputs in :func:`permute`'s row order.
    row_id_map: ``[N, K]`` int32 from :func:`permute` (entries outside
      ``[0, M)`` contribute nothing).
    weights: ``[N, K]`` float32 top-k weights (float64 with float64 ``y``), or
      None for a plain sum.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    ``[N, H]`` in ``y``'s dtype: ``sum_k weights[n, k] * y[row_id_map[n, k]]``
    accumulated in float32 (float64 for float64 ``y``) in top-k order.
  """
  op = "unpermute"
  y = _validate.array(op, "y", y, ndim=2, dims="[M, H]", kind="float")
  row_id_map = _validate.array(op, "row_id_map", row_id_map, ndim=2, dims="[N, K]",
                               dtypes=(jnp.int32,))
  if weights is not None:
    weights = _validate.array(op, "weights", weights, ndim=2, dims="[N, K]",
                              dtypes=(jnp.float32, jnp.float64))
    _validate.same_shape(op, ("row_id_map", "weights"), row_id_map, weights)
  return unpermute_rows(y, row_id_map, weights, impl)
