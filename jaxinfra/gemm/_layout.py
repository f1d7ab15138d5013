"""Layouts of the FP8 GEMMs, in one place.

Two kinds of conversion live here:

* **Kernel layouts**: what the custom calls (the CPU handlers now, the Hopper
  kernels later) take, derived from the natural layouts ``jaxinfra.quant``
  produces. Per-token (1 x 128) scales ``[..., rows, ceil(k/128)]`` become
  DeepGEMM's *MN-major, TMA-aligned* layout ``[..., ceil(k/128), align(rows, 4)]``
  (rows contiguous, each K block's row padded to 16 bytes so that a TMA load of
  it is aligned); e4m3 operands get ``k`` padded to a multiple of 16 (TMA needs
  16-byte row strides). Per-block (128 x 128) weight scales are passed as they
  are. ``csrc/gemm/gemm.h`` documents the same layouts for the kernels.
* **Grouped-row layouts** for MoE: :func:`align_groups` turns per-expert row
  counts into DeepGEMM's contiguous layout, each expert's rows starting at a
  multiple of 128 (the M block of the Hopper kernels), with the maps to go
  there and back.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

BLOCK_K = 128                # scales are applied once per 128 K values
BLOCK_N = 128                # weight scale tiles are 128 x 128
CONTIGUOUS_ALIGNMENT = 128   # row alignment of each group in the contiguous layout
TMA_ALIGNMENT_BYTES = 16     # TMA: global strides and MN-major scale rows


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def align_up(a: int, b: int) -> int:
  return ceil_div(a, b) * b


def tma_aligned_size(rows: int, element_bytes: int = 4) -> int:
  """``rows`` rounded up so that ``rows * element_bytes`` is a multiple of 16."""
  return align_up(rows, TMA_ALIGNMENT_BYTES // element_bytes)


# --- kernel layouts ---------------------------------------------------------------------------


def to_mn_major_scales(scales: jax.Array) -> jax.Array:
  """Per-token scales ``[..., rows, kb]`` -> MN-major ``[..., kb, tma_aligned_size(rows)]``.

  Padding columns are zero. This is the layout of every per-token scale
  operand of the FP8 GEMM custom calls (DeepGEMM's
  ``get_mn_major_tma_aligned_tensor``, with the strides made explicit).
  """
  rows = scales.shape[-2]
  padded = tma_aligned_size(rows)
  pad = [(0, 0)] * (scales.ndim - 2) + [(0, 0), (0, padded - rows)]
  return jnp.pad(jnp.swapaxes(scales, -1, -2), pad)


def from_mn_major_scales(scales: jax.Array, rows: int) -> jax.Array:
  """Inverse of :func:`to_mn_major_scales`: ``[..., kb, padded]`` -> ``[..., rows, kb]``."""
  return jnp.swapaxes(scales[..., :rows], -1, -2)


def pad_k(x: jax.Array) -> jax.Array:
  """e4m3 operand ``[..., rows, k]`` with ``k`` zero-padded to a multiple of 16.

  Zero columns add nothing to any K block, and ``ceil(k / 128)`` does not change,
  so the scales stay as they are. No copy when ``k % 16 == 0``.
  """
  k = x.shape[-1]
  padded = align_up(k, TMA_ALIGNMENT_BYTES // x.dtype.itemsize)
  if padded == k:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, padded - k)])


# --- grouped-row layouts -------------------------------------------------------------------------


class GroupLayout(NamedTuple):
  """Rows grouped by expert, each group starting at a multiple of ``alignment``.

  Attributes:
    row_map: ``[num_rows]`` int32: where each input row goes in the padded
      layout; ``padded_rows`` (out of range) for rows that belong to no group.
    m_indices: ``[padded_rows]`` int32: the group of each padded row, -1 for
      padding (DeepGEMM's ``m_indices``).
    group_ends: ``[G]`` int32: end of each group's rows in the padded layout;
      group ``g`` starts at ``align_up(group_ends[g - 1], alignment)``
      (DeepGEMM's psum layout).
    group_k: ``[G]`` int32: ``align_up(group_sizes[g], alignment)``, each group's
      share of the padded rows (the ``group_k`` of the k-grouped GEMM when the
      padded rows are the contracted axis).
  """

  row_map: jax.Array
  m_indices: jax.Array
  group_ends: jax.Array
  group_k: jax.Array

  @property
  def padded_rows(self) -> int:
    return self.m_indices.shape[0]


def padded_rows(num_rows: int, groups: int, alignment: int = CONTIGUOUS_ALIGNMENT) -> int:
  """Static row count of :func:`align_groups`'s layout: enough for any split of
  ``num_rows`` rows into ``groups`` groups, rounded up to ``alignment``."""
  return align_up(num_rows + groups * (alignment - 1), alignment)


def clamp_group_sizes(group_sizes: jax.Array, num_rows: int) -> jax.Array:
  """The group sizes a layout uses: negative sizes count as 0, and groups are cut
  where their running total passes ``num_rows`` (rows past it belong to no group)."""
  ends = jnp.clip(jnp.cumsum(jnp.maximum(group_sizes.astype(jnp.int32), 0)), 0, num_rows)
  return jnp.diff(ends, prepend=jnp.zeros((1,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("num_rows", "alignment"))
def align_groups(group_sizes: jax.Array, num_rows: int,
                 alignment: int = CONTIGUOUS_ALIGNMENT) -> GroupLayout:
  """The contiguous layout for ``num_rows`` rows grouped by ``group_sizes``.

  Args:
    group_sizes: ``[G]`` integer rows per group; the input rows are grouped
      contiguously in order (group 0 first), like ``jax.lax.ragged_dot``. Sizes
      are clamped as :func:`clamp_group_sizes` says (no error: they may be
      device data).
    num_rows: the static number of input rows.
    alignment: row alignment of each group (128 for the Hopper kernels).

  Returns:
    A :class:`GroupLayout` with ``padded_rows(num_rows, G, alignment)`` rows.
    Use :func:`to_padded` and :func:`from_padded` to move rows.
  """
  groups = group_sizes.shape[0]
  total = padded_rows(num_rows, groups, alignment)
  sizes = clamp_group_sizes(group_sizes, num_rows)
  group_k = (sizes + (alignment - 1)) // alignment * alignment
  padded_starts = jnp.cumsum(group_k) - group_k
  input_starts = jnp.cumsum(sizes) - sizes
  group_ends = (padded_starts + sizes).astype(jnp.int32)

  rows = jnp.arange(num_rows, dtype=jnp.int32)
  group = jnp.searchsorted(jnp.cumsum(sizes), rows, side="right").astype(jnp.int32)
  in_group = group < groups
  safe = jnp.minimum(group, groups - 1)
  row_map = jnp.where(in_group, padded_starts[safe] + rows - input_starts[safe], total)

  padded = jnp.arange(total, dtype=jnp.int32)
  owner = jnp.searchsorted(group_ends, padded, side="right").astype(jnp.int32)
  safe = jnp.minimum(owner, groups - 1)
  m_indices = jnp.where((owner < groups) & (padded >= padded_starts[safe]), owner, -1)
  return GroupLayout(row_map.astype(jnp.int32), m_indices.astype(jnp.int32), group_ends,
                     group_k.astype(jnp.int32))


def to_padded(x: jax.Array, layout: GroupLayout) -> jax.Array:
  """Rows ``[num_rows, ...]`` -> ``[padded_rows, ...]``; padding rows are zero."""
  out = jnp.zeros((layout.padded_rows, *x.shape[1:]), x.dtype)
  return out.at[layout.row_map].set(x, mode="drop")


def from_padded(y: jax.Array, layout: GroupLayout) -> jax.Array:
  """Rows ``[padded_rows, ...]`` -> ``[num_rows, ...]``; rows in no group are zero."""
  return y.at[layout.row_map].get(mode="fill", fill_value=0)


# --- data-dependent layout rules (the same as csrc/gemm/gemm.h) ---------------------------------


def rows_of_group_ends(group_ends: jax.Array, num_rows: int, alignment: int) -> jax.Array:
  """Group of each of ``num_rows`` rows under the group_ends (psum) layout, -1 for none.

  The ends are clamped to ``[0, num_rows]`` and made non-decreasing by a running
  maximum; group ``g`` covers ``[align_up(end[g-1], alignment), end[g])``.
  """
  groups = group_ends.shape[-1]
  ends = lax.cummax(jnp.clip(group_ends.astype(jnp.int32), 0, num_rows), axis=0)
  previous = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  begins = (previous + (alignment - 1)) // alignment * alignment
  rows = jnp.arange(num_rows, dtype=jnp.int32)
  group = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)
  safe = jnp.minimum(group, groups - 1)
  return jnp.where((group < groups) & (rows >= begins[safe]), group, -1)


def valid_m_indices(m_indices: jax.Array, groups: int) -> jax.Array:
  """m_indices with every value outside ``[0, groups)`` replaced by -1 (padding)."""
  m_indices = m_indices.astype(jnp.int32)
  return jnp.where((m_indices >= 0) & (m_indices < groups), m_indices, -1)


def masked_rows(masked_m: jax.Array, m_max: int) -> jax.Array:
  """Rows each problem of the masked layout computes: ``masked_m`` clamped to ``[0, m_max]``."""
  return jnp.clip(masked_m.astype(jnp.int32), 0, m_max)


def k_group_segments(group_k: jax.Array, k_total: int) -> tuple[jax.Array, jax.Array]:
  """``(starts, valid)`` of the k-grouped layout.

  Group ``g`` contracts ``[starts[g], starts[g] + group_k[g])``; it is valid when it
  and every group before it have ``group_k >= 0``, a multiple of 128, and end at
  or before ``k_total``. Invalid groups produce NaN.
  """
  group_k = group_k.astype(jnp.int32)
  ok = (group_k >= 0) & (group_k % BLOCK_K == 0) & (group_k <= k_total)
  sizes = jnp.where(ok, group_k, 0)
  ends = jnp.cumsum(sizes)
  valid = lax.cummin((ok & (ends <= k_total)).astype(jnp.int32), axis=0).astype(bool)
  return ends - sizes, valid


def host_value(x) -> np.ndarray | None:
  """``x`` as a NumPy array when it is host data (checked eagerly), else None.

  Device arrays are never read back (no host sync); their bad values follow the
  documented rules above.
  """
  if isinstance(x, (np.ndarray, np.generic, list, tuple, int)):
    return np.asarray(x)
  return None
