"""Grouped matmul over rows sorted by expert, without per-expert dense tensors.

``gmm(x [M, k], w [G, k, n], group_sizes [G]) -> [M, n]``: rows
``[sum(sizes[:g]), sum(sizes[:g+1]))`` of ``x`` are multiplied by ``w[g]``;
rows past ``sum(sizes)`` give zero (``jax.lax.ragged_dot``'s contract).

Why not ``ragged_dot`` everywhere: XLA:CPU expands it into dense per-group
products with ``[G, M, k]`` intermediates, i.e. a ``[experts, tokens,
hidden]`` tensor, which is what expert parallelism must avoid. This version
walks (row tile, group) work items with ``lax.scan`` (the Megablox schedule):
at most ``M / tile + G`` items, each a ``[tile, k] @ [k, n]`` product, so
memory stays ``O(M * (k + n) + G * k * n)``. Its VJP is two more scans: the
same product with ``w`` transposed for ``x``, and per-group ``x^T g`` sums
for ``w`` (no scatter-add of activations).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxinfra import _custom_call
from jaxinfra.moe import _validate


def _work_items(group_sizes: jax.Array, num_tiles: int, tile: int):
  """(group, tile, valid) for each of ``num_tiles + G`` work items."""
  g = group_sizes.shape[0]
  sizes = group_sizes.astype(jnp.int32)
  ends = jnp.cumsum(sizes)
  starts = ends - sizes
  first = starts // tile
  count = jnp.where(sizes > 0, (ends - 1) // tile - first + 1, 0)
  offsets = jnp.cumsum(count)
  items = num_tiles + g
  i = jnp.arange(items, dtype=jnp.int32)
  group = jnp.minimum(jnp.searchsorted(offsets, i, side="right").astype(jnp.int32), g - 1)
  tile_index = first[group] + i - (offsets[group] - count[group])
  valid = i < offsets[-1]
  return group, jnp.where(valid, tile_index, 0), valid, starts, ends


def _pad_rows(x: jax.Array, rows: int) -> jax.Array:
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, 0)))


def _row_mask(tile_index, group, valid, starts, ends, tile: int):
  rows = tile_index * tile + jnp.arange(tile, dtype=jnp.int32)
  return (rows >= starts[group]) & (rows < ends[group]) & valid


def _gmm_forward(x, w, group_sizes, tile: int):
  m, n = x.shape[0], w.shape[2]
  acc_dtype = _validate.accum_dtype(x.dtype)
  num_tiles = -(-m // tile)
  group, tile_index, valid, starts, ends = _work_items(group_sizes, num_tiles, tile)
  xp = _pad_rows(x, num_tiles * tile)

  def step(out, item):
    g, t, ok = item
    xt = lax.dynamic_slice_in_dim(xp, t * tile, tile)
    prod = jnp.dot(xt, w[g], preferred_element_type=acc_dtype)
    mask = _row_mask(t, g, ok, starts, ends, tile)
    acc = lax.dynamic_slice_in_dim(out, t * tile, tile) + jnp.where(mask[:, None], prod, 0)
    return lax.dynamic_update_slice_in_dim(out, acc, t * tile, 0), None

  out0 = _custom_call.vary_like(jnp.zeros((num_tiles * tile, n), acc_dtype), x, w, group_sizes)
  out, _ = lax.scan(step, out0, (group, tile_index, valid))
  return out[:m]


def _gmm_weight_grad(x, g_out, group_sizes, num_groups: int, tile: int):
  """[G, k, n]: sum over group g's rows of x[r]^T g_out[r]."""
  m, k, n = x.shape[0], x.shape[1], g_out.shape[1]
  acc_dtype = _validate.accum_dtype(x.dtype)
  num_tiles = -(-m // tile)
  group, tile_index, valid, starts, ends = _work_items(group_sizes, num_tiles, tile)
  xp = _pad_rows(x, num_tiles * tile)
  gp = _pad_rows(g_out, num_tiles * tile)

  def step(acc, item):
    g, t, ok = item
    mask = _row_mask(t, g, ok, starts, ends, tile)
    xt = jnp.where(mask[:, None], lax.dynamic_slice_in_dim(xp, t * tile, tile), 0)
    gt = lax.dynamic_slice_in_dim(gp, t * tile, tile)
    part = jnp.dot(xt.T, gt, preferred_element_type=acc_dtype)
    current = lax.dynamic_index_in_dim(acc, g, keepdims=False)
    return lax.dynamic_update_index_in_dim(acc, current + part, g, 0), None

  acc0 = _custom_call.vary_like(jnp.zeros((num_groups, k, n), acc_dtype), x, g_out,
                                group_sizes)
  acc, _ = lax.scan(step, acc0, (group, tile_index, valid))
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gmm(x, w, group_sizes, tile):
  return _gmm_forward(x, w, group_sizes, tile).astype(x.dtype)


def _gmm_fwd(x, w, group_sizes, tile):
  return _gmm(x, w, group_sizes, tile), (x, w, group_sizes)


def _gmm_bwd(tile, residuals, g):
  x, w, group_sizes = residuals
  grad_x = _gmm_forward(g, jnp.swapaxes(w, 1, 2), group_sizes, tile).astype(x.dtype)
  grad_w = _gmm_weight_grad(x, g, group_sizes, w.shape[0], tile).astype(w.dtype)
  return grad_x, grad_w, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *, tile: int = 64) -> jax.Array:
  """``[M, k] x [G, k, n] -> [M, n]`` by contiguous row groups (see the module docstring).

  Args:
    x: ``[M, k]`` float rows sorted by group.
    w: ``[G, k, n]`` float, ``x``'s dtype.
    group_sizes: ``[G]`` int32 rows per group (sum <= M).
    tile: rows per work item.

  Returns:
    ``[M, n]`` in ``x``'s dtype, float32 accumulation (float64 for float64
    ``x``); differentiable in ``x``
    and ``w``.
  """
  if x.ndim != 2 or w.ndim != 3 or w.shape[1] != x.shape[1]:
    raise ValueError(f"gmm: x must be [M, k] and w [G, k, n], got {x.shape} and {w.shape}")
  if group_sizes.shape != (w.shape[0],):
    raise ValueError(f"gmm: group_sizes must have shape ({w.shape[0]},), got "
                     f"{group_sizes.shape}")
  return _gmm(x, w.astype(x.dtype), group_sizes.astype(jnp.int32), int(tile))

