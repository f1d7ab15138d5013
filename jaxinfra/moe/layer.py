"""The DeepSeek-V3 MoE layer (Flax NNX): router, shared experts, routed experts, EP.

``MoE(...)(x)`` takes tokens ``x [N, H]`` and returns ``(y [N, H], MoEStats)``:

1. Router: ``logits = x @ router [H, E]`` in float32, then
   :func:`jaxinfra.moe.route` (group-limited top-k, selection bias
   ``gate_bias``, a :class:`RouterBias` variable updated by
   :meth:`MoE.update_bias`, never by gradients).
2. Placement: logical expert ids map to *physical slots* (``num_slots``
   experts' weights, ``[P, ...]``). The default is the identity (``P = E``).
   An EPLB placement (:class:`jaxinfra.eplb.ExpertPlacement`, replicated
   experts) is passed per call, ``layer(x, placement=placement)``, with the
   layer's expert weights built by :func:`physical_expert_weights`::

       layer = MoE(..., num_slots=placement.num_slots, ...)
       phys = physical_expert_weights(placement, {"w_gate": wg, "w_up": wu, "w_down": wd})
       for name, w in phys.items():
         getattr(layer, name)[...] = w
       y, stats = layer(x, placement=placement)   # stats.tokens_per_slot: [P]

   Any other map from logical ids to slots goes in ``expert_map`` (see
   :func:`replicated_expert_map`).
3. Routed experts: SwiGLU experts ``w_gate, w_up [P, I, H]`` and
   ``w_down [P, H, I]`` (``[groups, n, k]``, the layout of
   ``jaxinfra.gemm``'s grouped GEMMs) run through one grouped-GEMM function,
   :func:`grouped_linear`.
4. Shared experts: a dense SwiGLU MLP on every token, added to the output.

Expert parallelism: with ``mesh`` and ``ep_axis`` (an axis name, or
``(node_axis, local_axis)`` for two-level EP) the layer runs inside
``jax.shard_map``: tokens are split over the EP axes, rank ``r`` holds slots
``[r * P/R, (r+1) * P/R)``, and routed tokens move with
:func:`jaxinfra.moe.dispatch`/:func:`jaxinfra.moe.combine` (``mode="normal"``,
differentiable) or the low-latency pair (``mode="low_latency"``, decode,
forward only). Without a mesh or an EP axis everything runs locally.

Inside your own ``shard_map`` (a model already manual over the EP axis, a
pipeline stage): build the layer with ``ep_axis`` and **no** ``mesh``. It then
runs the same per-rank body without a second ``shard_map``: ``x [n, H]`` is
this rank's tokens and the expert weights are this rank's slots
``[P/R, ...]``. The weights get there through ``in_specs``;
:meth:`MoE.param_specs` gives each array's spec::

    layer = MoE(..., ep_axis="ep", rngs=nnx.Rngs(0))     # full weights [P, ...]
    params, specs = layer.params(), layer.param_specs()  # dicts of arrays / specs

    def body(params, x):                                 # x: this rank's tokens
      return layer.apply(params, x)                      # (y, MoEStats)

    jax.shard_map(body, mesh=mesh, in_specs=(specs, P("ep")),
                  out_specs=(P("ep"), P()))(params, x)

:meth:`MoE.apply` is the functional form (a dict of arrays in, no module
state touched), the recommended one wherever parameters arrive as arrays, e.g.
a pipeline's ``stage_fn(stage_params, x)`` with ``stage_specs=
layer.param_specs()`` (``tests/test_pipeline_moe.py``). NNX's
``nnx.merge(graphdef, state)(x)`` inside the ``shard_map`` works too (the
state's expert weights sharded ``P(ep_axis)``); ``apply`` avoids building
``State`` spec trees.

Capacity: ``capacity_factor=None`` never drops a token. A factor ``f`` sizes
the buffers for ``f`` times the balanced load: ``ceil(f * N * K / R)`` rows
per (source, destination) rank pair and ``ceil(f * N * K)`` expert rows per
rank (``N`` tokens per rank); excess copies are dropped deterministically and
counted in ``MoEStats.num_dropped``. Memory then grows with
``tokens * top_k * hidden``, never with the number of experts.

FP8: ``fp8=True`` dispatches in FP8 (e4m3 + 1x128 scales; the backward is the
bf16 combine) and runs the routed experts' GEMMs in FP8 with DeepSeek-V3's
recipe through ``jaxinfra.gemm``: normal mode :func:`grouped_linear` ->
``fp8_grouped_linear`` (grouped contiguous FP8 GEMM forward and dgrad,
k-grouped FP8 GEMM wgrad; 1x128 activation and 128x128 weight scales),
low-latency mode :func:`masked_grouped_linear` -> ``grouped_fp8_gemm_masked``
fed directly with the dispatched e4m3 rows and scales. The router and the
shared experts stay in the compute dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra import gemm
from jaxinfra import quant
from jaxinfra.eplb import ExpertPlacement
from jaxinfra.moe import _validate
from jaxinfra.moe import grouped
from jaxinfra.moe import normal as dispatch_lib
from jaxinfra.moe import low_latency as low_latency_lib
from jaxinfra.moe import permutation as permute_lib
from jaxinfra.moe import routing

MODES = ("normal", "low_latency")
_EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")


class RouterBias(nnx.Variable):
  """The router's selection bias (aux-loss-free balancing); not a gradient target."""


class MoEStats(NamedTuple):
  """Per-call statistics, summed over the EP ranks.

  Attributes:
    tokens_per_expert: ``[E]`` int32 (token, logical expert) assignments, for
      :meth:`MoE.update_bias` and EPLB.
    tokens_per_slot: ``[P]`` int32 assignments per physical slot.
    num_dropped: int32 token copies dropped for capacity (0 when dropless).
  """
  tokens_per_expert: jax.Array
  tokens_per_slot: jax.Array
  num_dropped: jax.Array


def grouped_linear(x: jax.Array, w: jax.Array, group_sizes: jax.Array, *,
                   fp8: bool = False, impl: str = "auto") -> jax.Array:
  """The routed experts' grouped GEMM: ``out[rows of g] = x[rows of g] @ w[g].T``.

  The one place the MoE layer multiplies by expert weights (normal mode).

  * ``fp8=True``: :func:`jaxinfra.gemm.fp8_grouped_linear`, DeepSeek-V3's
    recipe: ``x`` quantized per token (1 x 128), ``w`` per 128 x 128 block,
    the grouped contiguous FP8 GEMM forward and for dgrad, the k-grouped FP8
    GEMM for wgrad (``custom_vjp``); ``w``'s gradient in ``w``'s dtype (the
    master weights). Rows move to the 128-aligned contiguous layout, so the
    GEMM sees ``padded_rows(M, G)`` rows (at most ``M + 128 G``).
  * otherwise, in ``x``'s dtype: on CPU the scan-based
    :func:`jaxinfra.moe.grouped.gmm` (XLA:CPU's ``ragged_dot`` builds
    ``[experts, rows, k]`` intermediates), elsewhere ``jax.lax.ragged_dot``.

  Args:
    x: ``[M, k]`` rows grouped contiguously by expert (float32, bfloat16 or
      float16 with ``fp8``).
    w: ``[G, n, k]`` expert weights.
    group_sizes: ``[G]`` int32 rows per expert; rows after their sum give 0.
    fp8: use the FP8 grouped GEMMs.
    impl: ``"auto"``, ``"ffi"`` or ``"xla"`` for the FP8 quantization and GEMMs.

  Returns:
    ``[M, n]`` in ``x``'s dtype (float32 accumulation, float64 for float64).
  """
  if fp8:
    return gemm.fp8_grouped_linear(x, w, group_sizes, impl=impl)
  w_kn = jnp.swapaxes(w, 1, 2).astype(x.dtype)

  def ragged(x, w_kn, group_sizes):
    out = lax.ragged_dot(x, w_kn, group_sizes,
                         preferred_element_type=_validate.accum_dtype(x.dtype))
    return out.astype(x.dtype)

  def scanned(x, w_kn, group_sizes):
    return grouped.gmm(x, w_kn, group_sizes)

  return lax.platform_dependent(x, w_kn, group_sizes, cpu=scanned, default=ragged)


def masked_grouped_linear(x: jax.Array, w: jax.Array, counts: jax.Array, *,
                          fp8: bool = False, x_scales: jax.Array | None = None,
                          out_dtype=None, impl: str = "auto") -> jax.Array:
  """The low-latency experts' GEMM on the masked layout (forward only).

  ``x [G, M, k]``, ``w [G, n, k]``, ``counts [G]`` (rows of each expert that
  hold tokens) -> ``[G, M, n]``, rows at or past ``counts[g]`` zero.

  With ``fp8`` (or ``x_scales``): :func:`jaxinfra.gemm.grouped_fp8_gemm_masked`
  with ``w`` quantized per 128 x 128 block and ``x`` per token (1 x 128); an
  ``x`` that is already e4m3 with ``x_scales [G, M, ceil(k/128)]`` (the FP8
  low-latency dispatch's ``recv_x``/``recv_scales``) goes in as it is.
  Otherwise an einsum in ``x``'s dtype.

  Args:
    x: ``[G, M, k]`` float, or float8_e4m3fn with ``x_scales``.
    w: ``[G, n, k]`` expert weights.
    counts: ``[G]`` int32 valid rows per expert (on device).
    fp8: quantize ``x`` and ``w`` and run the FP8 masked GEMM.
    x_scales: per-token scales of an e4m3 ``x`` (implies ``fp8``).
    out_dtype: result dtype (default ``x``'s; required for an e4m3 ``x``).
    impl: ``"auto"``, ``"ffi"`` or ``"xla"`` for the FP8 quantization and GEMM.

  Returns:
    ``[G, M, n]`` in ``out_dtype``.
  """
  out_dtype = np.dtype(out_dtype or x.dtype)
  if x_scales is None and x.dtype == jnp.float8_e4m3fn:
    raise ValueError(f"masked_grouped_linear: an e4m3 x (shape {x.shape}) needs x_scales")
  if fp8 or x_scales is not None:
    if out_dtype == jnp.float8_e4m3fn:
      raise ValueError("masked_grouped_linear: give out_dtype for an e4m3 x")
    if x_scales is None:
      x, x_scales = quant.quantize_per_token(x, impl=impl)
    wq, ws = quant.quantize_per_block(w, impl=impl)
    gemm_dtype = jnp.bfloat16 if out_dtype == jnp.bfloat16 else jnp.float32
    out = gemm.grouped_fp8_gemm_masked(x, x_scales, wq, ws, counts, out_dtype=gemm_dtype,
                                       impl=impl)
    return out.astype(out_dtype)
  out = jnp.einsum("gmk,gnk->gmn", x, w.astype(x.dtype),
                   preferred_element_type=_validate.accum_dtype(x.dtype))
  live = jnp.arange(x.shape[1])[None, :, None] < counts[:, None, None]
  return jnp.where(live, out, 0).astype(out_dtype)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  acc = _validate.accum_dtype(gate.dtype)
  return (jax.nn.silu(gate.astype(acc)) * up.astype(acc)).astype(gate.dtype)


def physical_expert_weights(placement: ExpertPlacement,
                            experts: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Physical expert weights for ``placement`` from logical ones (a jittable gather).

  Args:
    placement: a single-layer :class:`jaxinfra.eplb.ExpertPlacement`
      (``E`` experts, ``P`` slots).
    experts: ``{name: [E, ...]}``, e.g. ``w_gate``/``w_up [E, I, H]`` and
      ``w_down [E, H, I]`` of an unreplicated layer.

  Returns:
    ``{name: [P, ...]}``: slot ``p`` holds expert ``placement.phy2log[p]``'s
    weights; assign them to a ``MoE(num_slots=P)`` layer's ``w_gate`` etc.
    and call it with ``placement=placement``.
  """
  if not isinstance(placement, ExpertPlacement) or placement.num_layers is not None:
    raise ValueError("physical_expert_weights: placement must be a single-layer "
                     f"ExpertPlacement, got {placement!r}")
  for name, w in experts.items():
    if jnp.ndim(w) < 1 or jnp.shape(w)[0] != placement.num_experts:
      raise ValueError(f"physical_expert_weights: {name} must have shape "
                       f"[{placement.num_experts}, ...] (logical experts), got {jnp.shape(w)}")
  return {name: placement.physical_weights(w) for name, w in experts.items()}


def replicated_expert_map(logical_to_physical: jax.Array,
                          num_replicas: jax.Array) -> Callable[[jax.Array], jax.Array]:
  """An ``expert_map`` for replicated experts (an EPLB placement).

  Args:
    logical_to_physical: ``[E, max_replicas]`` int32 physical slot of each
      replica of each logical expert.
    num_replicas: ``[E]`` int32 replicas per expert (>= 1).

  Returns:
    ``topk_idx [N, K] -> [N, K]`` slots: copy ``k`` of token ``n`` goes to
    replica ``(n + k) % num_replicas`` (round robin; deterministic). Ids -1
    stay -1.
  """
  table = jnp.asarray(logical_to_physical, jnp.int32)
  counts = jnp.asarray(num_replicas, jnp.int32)

  def expert_map(topk_idx: jax.Array) -> jax.Array:
    n, k = topk_idx.shape
    safe = jnp.clip(topk_idx, 0, table.shape[0] - 1)
    turn = (jnp.arange(n)[:, None] + jnp.arange(k)[None, :]) % jnp.maximum(counts[safe], 1)
    return jnp.where(topk_idx >= 0, table[safe, turn], -1).astype(jnp.int32)

  return expert_map


def _mesh_axes(ep_axis) -> tuple[str, ...]:
  return (ep_axis,) if isinstance(ep_axis, str) else tuple(ep_axis)


def _to_spec(x: jax.Array, mesh, spec: P) -> jax.Array:
  """Explicit mesh axes need arguments already in shard_map's layout."""
  explicit = jax.sharding.AxisType.Explicit
  if all(t == explicit for t in mesh.axis_types):
    return jax.reshard(x, NamedSharding(mesh, spec))
  return x


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _init_params(key, hidden, intermediate, num_experts, num_slots, shared, dtype):
  """Normal(0, 1/fan_in) weights, in one compiled program."""
  shapes = {"router": ((hidden, num_experts), hidden),
            "w_gate": ((num_slots, intermediate, hidden), hidden),
            "w_up": ((num_slots, intermediate, hidden), hidden),
            "w_down": ((num_slots, hidden, intermediate), intermediate)}
  if shared:
    shapes.update(shared_gate=((hidden, shared), hidden), shared_up=((hidden, shared), hidden),
                  shared_down=((shared, hidden), shared))
  # One draw, sliced: XLA:CPU compiles a random draw per shape slowly.
  names = sorted(shapes)
  sizes = [math.prod(shapes[n][0]) for n in names]
  draw = jax.random.normal(key, (sum(sizes),), jnp.float32)
  params, start = {}, 0
  for name, size in zip(names, sizes):
    shape, fan_in = shapes[name]
    params[name] = (draw[start:start + size].reshape(shape) / np.sqrt(fan_in)).astype(dtype)
    start += size
  return params


class MoE(nnx.Module):
  """DeepSeek-V3's MoE layer (see the module docstring).

  Args:
    hidden: ``H``.
    intermediate: ``I``, each routed expert's intermediate size.
    num_experts: ``E`` logical experts.
    top_k, n_groups, topk_groups, routed_scaling_factor, score_func: routing
      (:func:`jaxinfra.moe.route`).
    num_shared_experts: shared experts (their MLP has
      ``num_shared_experts * shared_intermediate`` units; 0 for none).
    shared_intermediate: default ``intermediate``.
    num_slots: ``P`` physical expert slots (default ``E``).
    mesh, ep_axis: expert parallelism (both None: local). ``ep_axis``
      without ``mesh``: the layer is called inside an enclosing ``shard_map``
      that is manual over ``ep_axis`` (see the module docstring).
    mode: ``"normal"`` or ``"low_latency"`` (needs a single EP axis).
    fp8: FP8 dispatch and FP8 routed-expert GEMMs (``jaxinfra.gemm``; the
      compute dtype must then be float32, bfloat16 or float16).
    capacity_factor: None (dropless) or the buffers' factor over a balanced load.
    max_tokens_per_rank: low-latency ``T`` (default: the tokens per rank).
    dtype: compute dtype of the experts; param_dtype: parameters' dtype.
    backend, impl: passed to dispatch/permute (``impl`` also to the FP8 GEMMs).
    rngs: ``nnx.Rngs`` for the initial parameters.
  """

  def __init__(self, hidden: int, intermediate: int, num_experts: int, *, top_k: int = 8,
               n_groups: int = 8, topk_groups: int = 4, routed_scaling_factor: float = 2.5,
               score_func: str = "sigmoid", num_shared_experts: int = 1,
               shared_intermediate: int | None = None, num_slots: int | None = None,
               mesh: jax.sharding.Mesh | None = None, ep_axis=None, mode: str = "normal",
               fp8: bool = False, capacity_factor: float | None = None,
               max_tokens_per_rank: int | None = None, dtype=jnp.bfloat16,
               param_dtype=jnp.float32, backend: str = "auto", impl: str = "auto",
               rngs: nnx.Rngs):
    if mode not in MODES:
      raise ValueError(f"MoE: mode must be one of {MODES}, got {mode!r}")
    if mesh is not None and ep_axis is None:
      raise ValueError("MoE: a mesh needs ep_axis (the EP axis name); give ep_axis without a "
                       "mesh to run inside an enclosing shard_map")
    num_slots = num_experts if num_slots is None else num_slots
    if num_slots < num_experts:
      raise ValueError(f"MoE: num_slots={num_slots} must be >= num_experts={num_experts}")
    if mesh is not None:
      axes = _mesh_axes(ep_axis)
      missing = [a for a in axes if a not in mesh.axis_names]
      if missing:
        raise ValueError(f"MoE: ep_axis {ep_axis!r} not in the mesh axes {mesh.axis_names}")
      ranks = math.prod(mesh.shape[a] for a in axes)
      if num_slots % ranks:
        raise ValueError(f"MoE: num_slots={num_slots} must be divisible by the EP size {ranks}")
      if mode == "low_latency" and not isinstance(ep_axis, str):
        raise ValueError("MoE: low_latency mode needs a single EP axis name")
    elif mode == "low_latency" and (ep_axis is None or not isinstance(ep_axis, str)):
      raise ValueError("MoE: low_latency mode needs a single EP axis name (ep_axis)")
    if capacity_factor is not None and capacity_factor <= 0:
      raise ValueError(f"MoE: capacity_factor must be positive, got {capacity_factor}")
    self.hidden, self.intermediate = hidden, intermediate
    self.num_experts, self.num_slots = num_experts, num_slots
    self.top_k, self.n_groups, self.topk_groups = top_k, n_groups, topk_groups
    self.routed_scaling_factor, self.score_func = routed_scaling_factor, score_func
    self.mesh, self.ep_axis, self.mode, self.fp8 = mesh, ep_axis, mode, fp8
    self.capacity_factor, self.max_tokens_per_rank = capacity_factor, max_tokens_per_rank
    self.dtype, self.backend, self.impl = dtype, backend, impl

    shared = num_shared_experts * (shared_intermediate or intermediate)
    self.num_shared = shared
    params = _init_params(rngs.params(), hidden, intermediate, num_experts, num_slots, shared,
                          np.dtype(param_dtype))
    self.router = nnx.Param(params["router"])
    self.gate_bias = RouterBias(jnp.zeros((num_experts,), jnp.float32))
    self.w_gate = nnx.Param(params["w_gate"])
    self.w_up = nnx.Param(params["w_up"])
    self.w_down = nnx.Param(params["w_down"])
    if shared:
      self.shared_gate = nnx.Param(params["shared_gate"])
      self.shared_up = nnx.Param(params["shared_up"])
      self.shared_down = nnx.Param(params["shared_down"])

  # -- the pieces, as functions of arrays -------------------------------------------------------

  def _route(self, x, router, bias, expert_map, placement, first_token):
    acc = _validate.accum_dtype(self.dtype)
    logits = jnp.dot(x.astype(acc), router.astype(acc))
    topk_idx, topk_weights = routing.route(
        logits, bias=bias, top_k=self.top_k, n_groups=self.n_groups,
        topk_groups=self.topk_groups, routed_scaling_factor=self.routed_scaling_factor,
        score_func=self.score_func)
    if placement is not None:  # replicas share an expert's tokens by global token id
      slots = placement.route(topk_idx, first_token + jnp.arange(x.shape[0], dtype=jnp.int32))
    elif expert_map is not None:
      slots = expert_map(topk_idx)
    else:
      slots = topk_idx
    return topk_idx, slots, topk_weights

  def _shared(self, x, shared):
    if not self.num_shared:
      return jnp.zeros_like(x)
    gate, up, down = (w.astype(x.dtype) for w in shared)
    return jnp.dot(_swiglu(x @ gate, x @ up), down)

  def _experts(self, rows, group_sizes, experts):
    w_gate, w_up, w_down = experts
    linear = functools.partial(grouped_linear, group_sizes=group_sizes, fp8=self.fp8,
                               impl=self.impl)
    return linear(_swiglu(linear(rows, w_gate), linear(rows, w_up)), w_down)

  def _masked_experts(self, rows, scales, counts, experts):
    """``rows`` e4m3 with ``scales`` (FP8 dispatch), or in the compute dtype."""
    w_gate, w_up, w_down = experts
    linear = functools.partial(masked_grouped_linear, counts=counts, fp8=self.fp8,
                               out_dtype=self.dtype, impl=self.impl)
    gate = linear(rows, w_gate, x_scales=scales)
    up = linear(rows, w_up, x_scales=scales)
    return linear(_swiglu(gate, up), w_down)

  def _expert_rows(self, copies: int, tokens: int) -> int:
    """Rows of the local grouped GEMM: ``copies`` possible token copies, ``tokens`` per rank."""
    if self.capacity_factor is None:
      return copies
    return max(1, min(copies, math.ceil(self.capacity_factor * tokens * self.top_k)))

  def _counts(self, topk_idx, slots):
    per_expert = jnp.bincount(jnp.where(topk_idx >= 0, topk_idx, self.num_experts).reshape(-1),
                              length=self.num_experts + 1)[:self.num_experts]
    per_slot = jnp.bincount(jnp.where(slots >= 0, slots, self.num_slots).reshape(-1),
                            length=self.num_slots + 1)[:self.num_slots]
    return per_expert.astype(jnp.int32), per_slot.astype(jnp.int32)

  def _local(self, x, router, bias, experts, shared, expert_map, placement=None):
    topk_idx, slots, weights = self._route(x, router, bias, expert_map, placement, 0)
    h = x.astype(self.dtype)
    routed = permute_lib.permute(h, slots, self.num_slots,
                                 num_rows=self._expert_rows(slots.size, x.shape[0]), impl=self.impl)
    out = self._experts(routed.rows, routed.group_sizes, experts)
    y = permute_lib.unpermute(out, routed.row_id_map, weights, impl=self.impl)
    per_expert, per_slot = self._counts(topk_idx, slots)
    return y + self._shared(h, shared), MoEStats(per_expert, per_slot, routed.num_dropped)

  def _ep(self, x, router, bias, experts, shared, expert_map, placement=None):
    axes = _mesh_axes(self.ep_axis)
    axis = self.ep_axis if isinstance(self.ep_axis, str) else axes
    ranks = dispatch_lib.axis_size(axis)
    per_rank = self.num_slots // ranks
    n = x.shape[0]
    first_token = lax.axis_index(axes).astype(jnp.int32) * n  # rank r holds rows [r*n, (r+1)*n)
    topk_idx, slots, weights = self._route(x, router, bias, expert_map, placement, first_token)
    h = x.astype(self.dtype)
    if self.mode == "low_latency":
      tokens = self.max_tokens_per_rank or n
      sent = low_latency_lib.low_latency_dispatch(h, slots, axis_name=axis,
                                                  num_experts=self.num_slots,
                                                  max_tokens_per_rank=tokens, fp8=self.fp8,
                                                  impl=self.impl)
      # FP8: the dispatched e4m3 rows and their 1x128 scales feed the masked FP8 GEMM.
      out = self._masked_experts(sent.recv_x, sent.recv_scales, sent.recv_count, experts)
      y = low_latency_lib.low_latency_combine(out, slots, weights, sent.handle)
      dropped = jnp.zeros((), jnp.int32)
    else:
      capacity = n
      if self.capacity_factor is not None:
        capacity = max(1, min(n, math.ceil(self.capacity_factor * n * self.top_k / ranks)))
      sent = dispatch_lib.dispatch(h, slots, weights, axis_name=axis, num_experts=self.num_slots,
                                   capacity=capacity, fp8=self.fp8, dequantize=self.fp8,
                                   backend=self.backend, impl=self.impl)
      copies = sent.recv_x.shape[0] * min(self.top_k, per_rank)
      routed = permute_lib.permute(sent.recv_x, sent.recv_topk_idx, per_rank,
                                   num_rows=self._expert_rows(copies, n), impl=self.impl)
      out = self._experts(routed.rows, routed.group_sizes, experts)
      partial = permute_lib.unpermute(out, routed.row_id_map, sent.recv_topk_weights,
                                      impl=self.impl)
      y = dispatch_lib.combine(partial, sent.handle)
      dropped = sent.num_dropped + routed.num_dropped
    per_expert, per_slot = self._counts(topk_idx, slots)
    stats = MoEStats(*(lax.psum(v, axis) for v in (per_expert, per_slot, dropped)))
    return y + self._shared(h, shared), stats

  # -- public -----------------------------------------------------------------------------------

  def params(self) -> dict[str, jax.Array]:
    """The layer's arrays by name, for :meth:`apply` (``gate_bias`` included).

    Keys: ``router [H, E]``, ``gate_bias [E]``, ``w_gate``/``w_up [P, I, H]``,
    ``w_down [P, H, I]`` and, with shared experts, ``shared_gate``/
    ``shared_up [H, S]``, ``shared_down [S, H]``.
    """
    return {name: getattr(self, name)[...] for name in self._param_names()}

  def _param_names(self) -> tuple[str, ...]:
    names = ("router", "gate_bias", *_EXPERT_WEIGHTS)
    return names + (("shared_gate", "shared_up", "shared_down") if self.num_shared else ())

  def param_specs(self) -> dict[str, P]:
    """``PartitionSpec`` of each :meth:`params` array over the EP axes.

    Expert weights ``P(ep_axes)`` (slots split over the EP ranks), everything
    else replicated ``P()``. Use them as ``shard_map`` ``in_specs`` (or a
    pipeline's ``stage_specs``) when calling :meth:`apply` inside your own
    ``shard_map``.
    """
    if self.ep_axis is None:
      raise ValueError("MoE.param_specs: the layer has no ep_axis")
    split = P(_mesh_axes(self.ep_axis))
    return {name: split if name in _EXPERT_WEIGHTS else P() for name in self._param_names()}

  def __call__(self, x: jax.Array, *,
               expert_map: Callable[[jax.Array], jax.Array] | None = None,
               placement: ExpertPlacement | None = None) -> tuple[jax.Array, MoEStats]:
    """Applies the layer.

    Args:
      x: ``[N, H]`` tokens (flatten batch and sequence first); with a mesh,
        ``N`` must be divisible by the EP size (each rank gets ``N / R``
        tokens); with ``ep_axis`` and no mesh, this rank's tokens.
      expert_map: maps ``topk_idx [n, K]`` logical ids to physical slots in
        ``[0, P)`` (e.g. :func:`replicated_expert_map`); None: identity.
      placement: an EPLB placement (a single-layer
        :class:`jaxinfra.eplb.ExpertPlacement` with ``num_slots == P`` and
        ``num_experts == E``; index a stacked one: ``placement[layer]``).
        Token ``t`` (its global index in ``x``) sends its choice of expert
        ``e`` to replica ``t mod logcnt[e]`` (:meth:`ExpertPlacement.route`).
        The expert weights must be physical: slot ``p`` holds expert
        ``phy2log[p]`` (:func:`physical_expert_weights`). Excludes
        ``expert_map``.

    Returns:
      ``(y [N, H] in the compute dtype, MoEStats)``.
    """
    return self.apply(self.params(), x, expert_map=expert_map, placement=placement)

  def apply(self, params: dict[str, jax.Array], x: jax.Array, *,
            expert_map: Callable[[jax.Array], jax.Array] | None = None,
            placement: ExpertPlacement | None = None) -> tuple[jax.Array, MoEStats]:
    """The layer as a function of explicit arrays (no module state read or written).

    Args:
      params: a dict like :meth:`params`. Inside an enclosing ``shard_map``
        (``ep_axis`` without ``mesh``), this rank's local blocks: expert
        weights ``[P/R, ...]`` (specs from :meth:`param_specs`), the rest whole.
      x: as in :meth:`__call__`.
      expert_map, placement: as in :meth:`__call__`.

    Returns:
      ``(y, MoEStats)`` as in :meth:`__call__`; ``MoEStats`` are summed over
      the EP ranks (identical on every rank).
    """
    if x.ndim != 2 or x.shape[1] != self.hidden:
      raise ValueError(f"MoE: x must have shape [N, {self.hidden}], got {x.shape}")
    missing = sorted(set(self._param_names()) - set(params))
    if missing:
      raise ValueError(f"MoE.apply: params is missing {missing}")
    router, bias = params["router"], params["gate_bias"]
    experts = tuple(params[n] for n in _EXPERT_WEIGHTS)
    shared = (tuple(params[n] for n in ("shared_gate", "shared_up", "shared_down"))
              if self.num_shared else ())
    self._check_placement(placement, expert_map)
    if self.ep_axis is None:
      self._check_experts(experts, self.num_slots, "")
      return self._local(x, router, bias, experts, shared, expert_map, placement)
    if self.mesh is None:  # already inside a shard_map over the EP axes
      try:
        ranks = math.prod(dispatch_lib.axis_size(a) for a in _mesh_axes(self.ep_axis))
      except NameError:
        raise ValueError(f"MoE: ep_axis {self.ep_axis!r} without a mesh means the layer runs "
                         "inside a shard_map over that axis, but it is not bound here") from None
      if self.num_slots % ranks:
        raise ValueError(f"MoE: num_slots={self.num_slots} must be divisible by the EP size "
                         f"{ranks}")
      self._check_experts(experts, self.num_slots // ranks, " (this rank's slots)")
      self._check_placement_ranks(placement, ranks)
      return self._ep(x, router, bias, experts, shared, expert_map, placement)
    self._check_experts(experts, self.num_slots, "")
    axes = _mesh_axes(self.ep_axis)
    ranks = math.prod(self.mesh.shape[a] for a in axes)
    if x.shape[0] % ranks:
      raise ValueError(f"MoE: the number of tokens {x.shape[0]} (x shape {x.shape}) must be "
                       f"divisible by the EP size {ranks}")
    self._check_placement_ranks(placement, ranks)
    split, whole = P(axes), P()

    def body(x, router, bias, experts, shared, placement):
      return self._ep(x, router, bias, experts, shared, expert_map, placement)

    run = jax.shard_map(
        body, mesh=self.mesh,
        in_specs=(split, whole, whole, (split,) * 3, (whole,) * len(shared), whole),
        out_specs=(split, MoEStats(whole, whole, whole)))
    args = (_to_spec(x, self.mesh, split), _to_spec(router, self.mesh, whole),
            _to_spec(bias, self.mesh, whole),
            tuple(_to_spec(w, self.mesh, split) for w in experts),
            tuple(_to_spec(w, self.mesh, whole) for w in shared),
            jax.tree_util.tree_map(lambda a: _to_spec(a, self.mesh, whole), placement))
    return run(*args)

  def _check_placement(self, placement, expert_map) -> None:
    if placement is None:
      return
    if expert_map is not None:
      raise ValueError("MoE: give placement or expert_map, not both")
    if not isinstance(placement, ExpertPlacement):
      raise ValueError(f"MoE: placement must be a jaxinfra.eplb.ExpertPlacement, got "
                       f"{type(placement).__name__}")
    if placement.num_layers is not None:
      raise ValueError(f"MoE: placement has {placement.num_layers} layers; pass this layer's "
                       "(placement[layer])")
    if (placement.num_experts, placement.num_slots) != (self.num_experts, self.num_slots):
      raise ValueError(f"MoE: placement is for {placement.num_experts} experts in "
                       f"{placement.num_slots} slots, the layer has num_experts="
                       f"{self.num_experts}, num_slots={self.num_slots}")

  @staticmethod
  def _check_placement_ranks(placement, ranks: int) -> None:
    if placement is not None and placement.num_gpus != ranks:
      raise ValueError(f"MoE: placement is for num_gpus={placement.num_gpus}, the EP size is "
                       f"{ranks}")

  def _check_experts(self, experts, slots: int, where: str) -> None:
    want = {"w_gate": (slots, self.intermediate, self.hidden),
            "w_up": (slots, self.intermediate, self.hidden),
            "w_down": (slots, self.hidden, self.intermediate)}
    for name, w in zip(_EXPERT_WEIGHTS, experts):
      if tuple(w.shape) != want[name]:
        raise ValueError(f"MoE: {name} must have shape {want[name]}{where}, got {w.shape}")

  def update_bias(self, stats: MoEStats, rate: float = 1e-3) -> None:
    """Aux-loss-free balancing step from a call's ``tokens_per_expert``."""
    self.gate_bias[...] = routing.update_bias(self.gate_bias[...], stats.tokens_per_expert, rate)
