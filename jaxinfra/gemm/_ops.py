"""The FP8 GEMMs: validation, the pure-JAX paths, the custom calls, and the
public functions (re-exported by ``jaxinfra.gemm``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfra import _custom_call
from jaxinfra.gemm import _layout
from jaxinfra.gemm._layout import BLOCK_K, BLOCK_N, ceil_div

FP8_GEMM = _custom_call.define("fp8_gemm", verified=("cpu",))
GROUPED_FP8_GEMM_CONTIGUOUS = _custom_call.define("grouped_fp8_gemm_contiguous", verified=("cpu",))
GROUPED_FP8_GEMM_MASKED = _custom_call.define("grouped_fp8_gemm_masked", verified=("cpu",))
K_GROUPED_FP8_GEMM = _custom_call.define("k_grouped_fp8_gemm", verified=("cpu",))

OUT_DTYPES = (np.dtype(jnp.bfloat16), np.dtype(jnp.float32))
_E4M3 = np.dtype(jnp.float8_e4m3fn)
_NOT_DIFFERENTIABLE_HINT = (
    "The FP8 GEMMs take quantized operands; for training use jaxinfra.gemm.fp8_linear or "
    "fp8_grouped_linear, whose custom_vjp runs the FP8 backward GEMMs.")


# --- validation ---------------------------------------------------------------------------------


def _fp8_operand(op: str, name: str, x, dims: str) -> jax.Array:
  x = jnp.asarray(x)
  rank = len(dims.strip("[]").split(","))
  if x.dtype != _E4M3 or x.ndim != rank:
    raise ValueError(f"{op}: {name} must be float8_e4m3fn of shape {dims}, got {x.dtype} with "
                     f"shape {x.shape}")
  if x.shape[-1] == 0:
    raise ValueError(f"{op}: {name} must have k > 0, got shape {x.shape}")
  return x


def _scales(op: str, name: str, s, expected: tuple[int, ...], of: str, what: str) -> jax.Array:
  s = jnp.asarray(s)
  if s.dtype != jnp.float32 or s.shape != expected:
    raise ValueError(f"{op}: {name} must be float32 of shape {expected} ({what}) for {of}, got "
                     f"{s.dtype} with shape {s.shape}")
  return s


def _same(op: str, what: str, **sizes: int) -> None:
  values = set(sizes.values())
  if len(values) != 1:
    detail = ", ".join(f"{k}={v}" for k, v in sizes.items())
    raise ValueError(f"{op}: {what} must agree, got {detail}")


def _out_dtype(op: str, out_dtype) -> np.dtype:
  dtype = np.dtype(out_dtype)
  if dtype not in OUT_DTYPES:
    raise ValueError(f"{op}: out_dtype must be bfloat16 or float32, got {dtype}")
  return dtype


def _int_array(op: str, name: str, x, shape: tuple[int, ...]) -> jax.Array:
  host = _layout.host_value(x)
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.integer) or x.shape != shape:
    raise ValueError(f"{op}: {name} must be an integer array of shape {shape}, got {x.dtype} "
                     f"with shape {x.shape}")
  if host is not None and host.size and (host.min() < np.iinfo(np.int32).min
                                         or host.max() > np.iinfo(np.int32).max):
    raise ValueError(f"{op}: {name} values must fit in int32")
  return x.astype(jnp.int32)


def _check_host(op: str, name: str, x, ok, rule: str) -> None:
  """Checks host data (NumPy, lists) eagerly; device data follows the documented rules."""
  host = _layout.host_value(x)
  if host is not None and not ok(host.astype(np.int64)):
    raise ValueError(f"{op}: {name} must {rule}, got {host.tolist()}")


def _check_a(op: str, a, a_scales, dims: str) -> tuple[jax.Array, jax.Array]:
  a = _fp8_operand(op, "a", a, dims)
  *lead, rows, k = a.shape
  a_scales = _scales(op, "a_scales", a_scales, (*lead, rows, ceil_div(k, BLOCK_K)),
                     f"a of shape {a.shape}", "1 x 128 per-token scales")
  return a, a_scales


def _check_operands(op: str, a, a_scales, b, a_dims: str,
                    b_dims: str) -> tuple[jax.Array, jax.Array, jax.Array]:
  """a (with its per-token scales) and b: e4m3 of the given ranks, equal k."""
  a, a_scales = _check_a(op, a, a_scales, a_dims)
  b = _fp8_operand(op, "b", b, b_dims)
  _same(op, "a and b's k", a_k=a.shape[-1], b_k=b.shape[-1])
  return a, a_scales, b


def _check_weight_scales(op: str, b: jax.Array, b_scales) -> jax.Array:
  *lead, n, k = b.shape
  return _scales(op, "b_scales", b_scales, (*lead, ceil_div(n, BLOCK_N), ceil_div(k, BLOCK_K)),
                 f"b of shape {b.shape}", "128 x 128 per-block scales")


# --- the pure-JAX paths: DeepGEMM's two-level accumulation, block by block along K -------------


def _k_blocks(x: jax.Array, k_blocks: int) -> jax.Array:
  """e4m3 ``[..., rows, k]`` -> bfloat16 ``[KB, ..., rows, 128]``, zero-padded.

  e4m3 values are exact in bfloat16, so a bfloat16 dot with a float32 result
  multiplies them exactly and accumulates in float32 on every backend.
  """
  x = x.astype(jnp.bfloat16)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, k_blocks * BLOCK_K - x.shape[-1])])
  return jnp.moveaxis(x.reshape(*x.shape[:-1], k_blocks, BLOCK_K), -2, 0)


def _row_scales(b_scales: jax.Array, n: int, per_token: bool) -> jax.Array:
  """b's scales as one per row: ``[..., n, KB]`` (128 x 128 tiles repeated over rows)."""
  return b_scales if per_token else jnp.repeat(b_scales, BLOCK_N, axis=-2)[..., :n, :]


def _zeros_varying_like(shape: tuple[int, ...], *inputs: jax.Array) -> jax.Array:
  """float32 zeros for a scan carry, varying over the ``shard_map`` axes ``inputs``
  vary over (a carry must keep its axis types)."""
  return _custom_call.vary_like(jnp.zeros(shape, jnp.float32), *inputs)


def _two_level(a: jax.Array, a_scales: jax.Array, b: jax.Array, b_scales: jax.Array) -> jax.Array:
  """``sum_kb dot(A_kb, B_kb^T) * (sa[:, kb] sb[:, kb]^T)`` in float32, in increasing kb.

  Args: a ``[*B, m, k]`` e4m3, a_scales ``[*B, m, KB]``, b ``[*B, n, k]`` e4m3,
  b_scales ``[*B, n, KB]`` (one per row). Returns ``[*B, m, n]`` float32.
  """
  k_blocks = a_scales.shape[-1]
  batch = tuple(range(a.ndim - 2))
  dims = (((len(batch) + 1,), (len(batch) + 1,)), (batch, batch))

  def step(acc, blocks):
    a_kb, sa_kb, b_kb, sb_kb = blocks
    partial = lax.dot_general(a_kb, b_kb, dims, preferred_element_type=jnp.float32)
    return acc + partial * (sa_kb[..., :, None] * sb_kb[..., None, :]), None

  init = _zeros_varying_like((*a.shape[:-1], b.shape[-2]), a, a_scales, b, b_scales)
  acc, _ = lax.scan(step, init, (_k_blocks(a, k_blocks), jnp.moveaxis(a_scales, -1, 0),
                                 _k_blocks(b, k_blocks), jnp.moveaxis(b_scales, -1, 0)))
  return acc


def _fp8_gemm_xla(a, a_scales, b, b_scales, *c, out_dtype, b_per_token):
  acc = _two_level(a, a_scales, b, _row_scales(b_scales, b.shape[-2], b_per_token))
  if c:
    acc = c[0] + acc
  return acc.astype(out_dtype)


def _masked_xla(a, a_scales, b, b_scales, masked_m, *, out_dtype):
  acc = _two_level(a, a_scales, b, _row_scales(b_scales, b.shape[-2], False))
  rows = _layout.masked_rows(masked_m, a.shape[-2])
  keep = jnp.arange(a.shape[-2])[None, :] < rows[:, None]
  return jnp.where(keep[..., None], acc, 0).astype(out_dtype)


def _contiguous_xla(a, a_scales, b, b_scales, layout, *, psum, alignment, out_dtype):
  m, k = a.shape
  groups, n, _ = b.shape
  if psum:
    group = _layout.rows_of_group_ends(layout, m, alignment)
  else:
    group = _layout.valid_m_indices(layout, groups)
  # Rows sorted by group (padding last) so that each K block is one ragged_dot.
  key = jnp.where(group >= 0, group, groups)
  order = jnp.argsort(key, stable=True)
  key = key[order]
  sizes = jnp.bincount(key, length=groups + 1)[:groups].astype(jnp.int32)
  k_blocks = ceil_div(k, BLOCK_K)
  row_b = jnp.minimum(key, groups - 1)
  b_rows = jnp.moveaxis(_row_scales(b_scales, n, False), -1, 0)   # [KB, G, n]
  dims = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[0])

  def step(acc, blocks):
    a_kb, sa_kb, b_kb, sb_kb = blocks
    partial = lax.ragged_dot_general(a_kb, b_kb, sizes, dims,
                                     preferred_element_type=jnp.float32)
    return acc + partial * (sa_kb[:, None] * sb_kb[row_b]), None

  init = _zeros_varying_like((m, n), a, a_scales, b, b_scales, layout)
  acc, _ = lax.scan(step, init,
                    (_k_blocks(a[order], k_blocks), a_scales[order].T, _k_blocks(b, k_blocks),
                     b_rows))
  acc = jnp.where((key < groups)[:, None], acc, 0)
  return jnp.zeros_like(acc).at[order].set(acc).astype(out_dtype)


def _k_grouped_xla(a, a_scales, b, b_scales, group_k, *c):
  m, k_total = a.shape
  groups = group_k.shape[0]
  starts, valid = _layout.k_group_segments(group_k, k_total)
  ends = jnp.where(valid, starts + group_k, starts)
  # The group of each K block (-1: none). Valid groups are 128-aligned.
  block_starts = jnp.arange(k_total // BLOCK_K, dtype=jnp.int32) * BLOCK_K
  owner = jnp.searchsorted(ends, block_starts, side="right").astype(jnp.int32)
  safe = jnp.minimum(owner, groups - 1)
  owner = jnp.where((owner < groups) & valid[safe] & (block_starts >= starts[safe]), owner, -1)
  dims = (((1,), (1,)), ((), ()))

  def step(acc, blocks):
    a_kb, sa_kb, b_kb, sb_kb, g = blocks
    partial = lax.dot_general(a_kb, b_kb, dims, preferred_element_type=jnp.float32)
    slot = jnp.maximum(g, 0)
    current = lax.dynamic_index_in_dim(acc, slot, keepdims=False)
    updated = jnp.where(g >= 0, current + partial * (sa_kb[:, None] * sb_kb[None, :]), current)
    return lax.dynamic_update_index_in_dim(acc, updated, slot, 0), None

  k_blocks = k_total // BLOCK_K
  init = _zeros_varying_like((groups, m, b.shape[0]), a, a_scales, b, b_scales, group_k)
  acc, _ = lax.scan(step, init, (_k_blocks(a, k_blocks), a_scales.T, _k_blocks(b, k_blocks),
                                 b_scales.T, owner))
  if c:
    acc = c[0] + acc
  return jnp.where(valid[:, None, None], acc, np.float32(np.nan))


# --- the custom calls: operands in the kernel layouts (see _layout) -----------------------------


def _call(call: _custom_call.CustomCall, result: jax.ShapeDtypeStruct, *operands,
          aliases: dict[int, int] | None = None, **attrs) -> jax.Array:
  # Every handler folds leading dimensions into a batch, so a vmapped call is
  # one call with the batch dimension on every operand.
  return _custom_call.ffi_call(call.target, result, *operands, vmap_method="broadcast_all",
                               input_output_aliases=aliases, **attrs)


def _kernel_a(a: jax.Array, a_scales: jax.Array) -> list[jax.Array]:
  return [_layout.pad_k(a), _layout.to_mn_major_scales(a_scales)]


def _fp8_gemm_ffi(a, a_scales, b, b_scales, *c, out_dtype, b_per_token):
  m, n = a.shape[-2], b.shape[-2]
  sfb = _layout.to_mn_major_scales(b_scales) if b_per_token else b_scales
  operands = [*_kernel_a(a, a_scales), _layout.pad_k(b), sfb, *c]
  return _call(FP8_GEMM, jax.ShapeDtypeStruct((*a.shape[:-2], m, n), out_dtype), *operands,
               aliases={4: 0} if c else None, b_per_token=bool(b_per_token))


def _masked_ffi(a, a_scales, b, b_scales, masked_m, *, out_dtype):
  result = jax.ShapeDtypeStruct((*a.shape[:-1], b.shape[-2]), out_dtype)
  return _call(GROUPED_FP8_GEMM_MASKED, result, *_kernel_a(a, a_scales), _layout.pad_k(b),
               b_scales, masked_m)


def _contiguous_ffi(a, a_scales, b, b_scales, layout, *, psum, alignment, out_dtype):
  result = jax.ShapeDtypeStruct((*a.shape[:-1], b.shape[-2]), out_dtype)
  return _call(GROUPED_FP8_GEMM_CONTIGUOUS, result, *_kernel_a(a, a_scales), _layout.pad_k(b),
               b_scales, layout, psum=bool(psum), alignment=np.int64(alignment))


def _k_grouped_ffi(a, a_scales, b, b_scales, group_k, *c):
  result = jax.ShapeDtypeStruct((*group_k.shape, a.shape[-2], b.shape[-2]), jnp.float32)
  return _call(K_GROUPED_FP8_GEMM, result, *_kernel_a(a, a_scales), b,
               _layout.to_mn_major_scales(b_scales), group_k, *c,
               aliases={5: 0} if c else None)


def _run(call: _custom_call.CustomCall, impl: str, ffi, xla, *args, **static) -> jax.Array:
  """Runs ``call`` under ``impl`` as one jitted function (cached per static
  configuration, so eager calls compile once rather than op by op)."""
  fn = _compiled(call, impl, _custom_call.is_disabled(call), ffi, xla,
                 tuple(sorted(static.items())))
  return fn(*args)


@functools.cache
def _compiled(call: _custom_call.CustomCall, impl: str, disabled: bool, ffi, xla,
              static: tuple[tuple[str, object], ...]):
  del disabled  # in the key: the kill switch is read when a function is traced
  static = dict(static)
  fn = _custom_call.select(call, impl, ffi=functools.partial(ffi, **static),
                           xla=functools.partial(xla, **static))
  return jax.jit(_custom_call.non_differentiable(fn, call.op, _NOT_DIFFERENTIABLE_HINT))


# --- public API ----------------------------------------------------------------------------------


def fp8_gemm(a: jax.Array, a_scales: jax.Array, b: jax.Array, b_scales: jax.Array, *,
             out_dtype=jnp.bfloat16, c: jax.Array | None = None,
             impl: str = "auto") -> jax.Array:
  """``D = C + A @ B^T`` with fine-grained FP8 scaling (DeepGEMM's ``fp8_gemm_nt``).

  Accumulates in float32, applying the scales once per 128-wide K block: for
  each block, the float32 sum of e4m3 products is multiplied by
  ``a_scales[i, kb] * b_scale(j, kb)`` and added to the float32 accumulator.

  Args:
    a: ``[m, k]`` float8_e4m3fn (activations; any ``m``, ``k``).
    a_scales: ``[m, ceil(k/128)]`` float32, 1 x 128 per-token scales
      (``jaxinfra.quant.quantize_per_token``).
    b: ``[n, k]`` float8_e4m3fn (weights, NT layout: D = A @ B^T).
    b_scales: ``[ceil(n/128), ceil(k/128)]`` float32 128 x 128 block scales
      (``quantize_per_block``; forward and dgrad), or ``[n, ceil(k/128)]``
      per-token scales (``quantize_per_token``; the wgrad recipe, where both
      operands have 1 x 128 scales along K). The shape says which (for n = 1
      they coincide).
    out_dtype: bfloat16 or float32.
    c: optional ``[m, n]`` float32 added to the result (``out_dtype`` must be
      float32); the custom call aliases it with the output (accumulate-into,
      for weight gradients).
    impl: ``"auto"``, ``"ffi"`` or ``"xla"`` (see ``jaxinfra._custom_call``).

  Returns:
    ``[m, n]`` in ``out_dtype``.
  """
  op = "fp8_gemm"
  a, a_scales, b = _check_operands(op, a, a_scales, b, "[m, k]", "[n, k]")
  (m, k), n = a.shape, b.shape[0]
  per_token_shape = (n, ceil_div(k, BLOCK_K))
  b_per_token = n > 1 and jnp.shape(b_scales) == per_token_shape
  if not b_per_token:
    b_scales = _check_weight_scales(op, b, b_scales)
  b_scales = jnp.asarray(b_scales)
  if b_scales.dtype != jnp.float32:
    raise ValueError(f"{op}: b_scales must be float32, got {b_scales.dtype}")
  out_dtype = _out_dtype(op, out_dtype)
  extra = []
  if c is not None:
    c = jnp.asarray(c)
    if c.dtype != jnp.float32 or c.shape != (m, n):
      raise ValueError(f"{op}: c must be float32 of shape {(m, n)}, got {c.dtype} with shape "
                       f"{c.shape}")
    if out_dtype != np.float32:
      raise ValueError(f"{op}: with c, out_dtype must be float32, got {out_dtype}")
    extra = [c]
  if m == 0 or n == 0:
    return jnp.zeros((m, n), out_dtype) + (c if c is not None else 0)
  return _run(FP8_GEMM, impl, _fp8_gemm_ffi, _fp8_gemm_xla, a, a_scales, b, b_scales, *extra,
              out_dtype=out_dtype, b_per_token=b_per_token)


def grouped_fp8_gemm_contiguous(a: jax.Array, a_scales: jax.Array, b: jax.Array,
                                b_scales: jax.Array, *, group_ends: jax.Array | None = None,
                                m_indices: jax.Array | None = None,
                                alignment: int = _layout.CONTIGUOUS_ALIGNMENT,
                                out_dtype=jnp.bfloat16, impl: str = "auto") -> jax.Array:
  """MoE forward/dgrad GEMM on rows grouped by expert (DeepGEMM's contiguous layout).

  Row ``r`` of the result is ``a[r] @ b[g]^T`` for the group ``g`` that row
  belongs to, zero for padding rows. Give the layout one of two ways (both stay
  on the device; no host sync):

  * ``m_indices [M]``: the group of each row; -1 marks padding. Any value
    outside ``[0, G)`` is treated as padding (a zero row).
  * ``group_ends [G]`` (DeepGEMM's psum layout): group ``g`` covers rows
    ``[align_up(group_ends[g-1], alignment), group_ends[g])``. Ends are clamped
    to ``[0, M]`` and made non-decreasing by a running maximum (an end below
    its predecessor makes that group empty); rows in no group are zero.

  :func:`jaxinfra.gemm.align_groups` builds both from per-expert row counts,
  with each group starting at a multiple of 128, the M block the Hopper
  kernels will need. Host (NumPy) layouts are checked eagerly and raise a
  ``ValueError`` instead.

  Args:
    a: ``[M, k]`` float8_e4m3fn, rows grouped by expert.
    a_scales: ``[M, ceil(k/128)]`` float32 per-token scales.
    b: ``[G, n, k]`` float8_e4m3fn expert weights.
    b_scales: ``[G, ceil(n/128), ceil(k/128)]`` float32 block scales.
    group_ends: ``[G]`` integer, or
    m_indices: ``[M]`` integer (exactly one of the two).
    alignment: row alignment of the group_ends layout (static, >= 1).
    out_dtype: bfloat16 or float32.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    ``[M, n]`` in ``out_dtype``.
  """
  op = "grouped_fp8_gemm_contiguous"
  a, a_scales, b = _check_operands(op, a, a_scales, b, "[M, k]", "[G, n, k]")
  b_scales = _check_weight_scales(op, b, b_scales)
  m, (groups, n, _) = a.shape[0], b.shape
  if (group_ends is None) == (m_indices is None):
    raise ValueError(f"{op}: give exactly one of group_ends [G] and m_indices [M]")
  if isinstance(alignment, bool) or not isinstance(alignment, (int, np.integer)) or alignment < 1:
    raise ValueError(f"{op}: alignment must be a positive int, got {alignment!r}")
  psum = group_ends is not None
  if psum:
    layout = _int_array(op, "group_ends", group_ends, (groups,))
    _check_host(op, "group_ends", group_ends,
                lambda v: v.size == 0 or (np.all(np.diff(v) >= 0) and v.min() >= 0
                                          and v.max() <= m),
                f"be non-decreasing within [0, {m}]")
  else:
    layout = _int_array(op, "m_indices", m_indices, (m,))
    _check_host(op, "m_indices", m_indices, lambda v: v.size == 0 or (v.min() >= -1 and
                                                                      v.max() < groups),
                f"be in [-1, {groups})")
  out_dtype = _out_dtype(op, out_dtype)
  if m == 0 or n == 0 or groups == 0:
    return jnp.zeros((m, n), out_dtype)
  return _run(GROUPED_FP8_GEMM_CONTIGUOUS, impl, _contiguous_ffi, _contiguous_xla, a, a_scales,
              b, b_scales, layout, psum=psum, alignment=int(alignment), out_dtype=out_dtype)


def grouped_fp8_gemm_masked(a: jax.Array, a_scales: jax.Array, b: jax.Array,
                            b_scales: jax.Array, masked_m: jax.Array, *,
                            out_dtype=jnp.bfloat16, impl: str = "auto") -> jax.Array:
  """MoE GEMM on the masked layout (DeepGEMM's ``m_grouped_..._masked``).

  ``d[g, i] = a[g, i] @ b[g]^T`` for ``i < masked_m[g]``, zero for the other
  rows: the layout low-latency expert-parallel dispatch produces for decoding.
  ``masked_m`` stays on the device (no host sync); values are clamped to
  ``[0, m_max]`` (host values outside it raise a ``ValueError``).

  Args:
    a: ``[G, m_max, k]`` float8_e4m3fn.
    a_scales: ``[G, m_max, ceil(k/128)]`` float32 per-token scales.
    b: ``[G, n, k]`` float8_e4m3fn.
    b_scales: ``[G, ceil(n/128), ceil(k/128)]`` float32 block scales.
    masked_m: ``[G]`` integer, valid rows per group.
    out_dtype: bfloat16 or float32.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    ``[G, m_max, n]`` in ``out_dtype``.
  """
  op = "grouped_fp8_gemm_masked"
  a, a_scales, b = _check_operands(op, a, a_scales, b, "[G, m_max, k]", "[G, n, k]")
  _same(op, "a and b's groups", a_groups=a.shape[0], b_groups=b.shape[0])
  b_scales = _check_weight_scales(op, b, b_scales)
  groups, m_max, _ = a.shape
  masked_m_array = _int_array(op, "masked_m", masked_m, (groups,))
  _check_host(op, "masked_m", masked_m, lambda v: v.size == 0 or (v.min() >= 0 and
                                                                  v.max() <= m_max),
              f"be within [0, m_max={m_max}]")
  out_dtype = _out_dtype(op, out_dtype)
  if m_max == 0 or groups == 0 or b.shape[1] == 0:
    return jnp.zeros((groups, m_max, b.shape[1]), out_dtype)
  return _run(GROUPED_FP8_GEMM_MASKED, impl, _masked_ffi, _masked_xla, a, a_scales, b, b_scales,
              masked_m_array, out_dtype=out_dtype)


def k_grouped_fp8_gemm(a: jax.Array, a_scales: jax.Array, b: jax.Array, b_scales: jax.Array,
                       group_k: jax.Array, *, c: jax.Array | None = None,
                       impl: str = "auto") -> jax.Array:
  """K-grouped GEMM for MoE weight gradients (DeepGEMM's ``k_grouped_fp8_gemm``).

  The K axis (tokens) is split into consecutive per-expert segments of
  ``group_k[g]`` columns: ``d[g] = c[g] + a[:, seg_g] @ b[:, seg_g]^T``, float32,
  with 1 x 128 per-token scales along K on both sides (for ``dW_g = dy_g^T x_g``:
  ``a = dy^T``, ``b = x^T``, each quantized with ``quantize_per_token``).

  The layout needs every segment 128-aligned: a group is valid when it and
  every group before it have ``group_k`` >= 0, a multiple of 128, and end
  within K; ``d[g]`` of an invalid group is NaN (an error value, never a read
  outside the operands). K columns past the last group are ignored. Host
  (NumPy) ``group_k`` is checked eagerly and raises a ``ValueError`` instead.

  Args:
    a: ``[m, K]`` float8_e4m3fn, ``K`` a multiple of 128.
    a_scales: ``[m, K/128]`` float32.
    b: ``[n, K]`` float8_e4m3fn.
    b_scales: ``[n, K/128]`` float32.
    group_k: ``[G]`` integer K columns per group.
    c: optional ``[G, m, n]`` float32 to accumulate into (aliased with the output).
    impl: ``"auto"``, ``"ffi"`` or ``"xla"``.

  Returns:
    ``[G, m, n]`` float32.
  """
  op = "k_grouped_fp8_gemm"
  a, a_scales, b = _check_operands(op, a, a_scales, b, "[m, K]", "[n, K]")
  (m, k_total), n = a.shape, b.shape[0]
  if k_total % BLOCK_K:
    raise ValueError(f"{op}: K must be a multiple of {BLOCK_K} (each group's K segment is "
                     f"128-aligned), got a of shape {a.shape}")
  b_scales = _scales(op, "b_scales", b_scales, (n, k_total // BLOCK_K), f"b of shape {b.shape}",
                     "1 x 128 per-token scales")
  group_k_array = jnp.asarray(group_k)
  if group_k_array.ndim != 1:
    raise ValueError(f"{op}: group_k must have shape [G], got shape {group_k_array.shape}")
  groups = group_k_array.shape[0]
  group_k_array = _int_array(op, "group_k", group_k, (groups,))
  _check_host(op, "group_k", group_k,
              lambda v: bool(np.all(v >= 0) and np.all(v % BLOCK_K == 0) and v.sum() <= k_total),
              f"be non-negative multiples of {BLOCK_K} summing to at most K={k_total}")
  extra = []
  if c is not None:
    c = jnp.asarray(c)
    if c.dtype != jnp.float32 or c.shape != (groups, m, n):
      raise ValueError(f"{op}: c must be float32 of shape {(groups, m, n)}, got {c.dtype} with "
                       f"shape {c.shape}")
    extra = [c]
  if groups == 0 or m == 0 or n == 0:
    return jnp.zeros((groups, m, n), jnp.float32) + (c if c is not None else 0)
  return _run(K_GROUPED_FP8_GEMM, impl, _k_grouped_ffi, _k_grouped_xla, a, a_scales, b,
              b_scales, group_k_array, *extra)
