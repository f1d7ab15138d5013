"""The DeepSeek-V3 MoE layer (Flax NNX): router, shared experts, routed experts, EP.

``MoE(...)(x)`` takes tokens ``x [N, H]`` and returns ``(y [N, H], MoEStats)``:

1. Router: ``logits = x @ router [H, E]`` in float32, then
   :func:`jaxinfra.moe.route` (group-limited top-k, selection bias
   ``gate_bias``, a :class:`RouterBias` variable updated by
   :meth:`MoE.update_bias`, never by gradients).
2. Placement: logical expert ids map to *physical slots* (``num_slots``
   experts' weights, ``[P, ...]``). The default is the identity (``P = E``);
   an EPLB placement is plugged in with ``expert_map`` (see
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
bf16 combine). Until ``jaxinfra.gemm`` lands, the grouped GEMMs run in the
compute dtype through ``jax.lax.ragged_dot``.
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

from jaxinfra import quant
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
                   fp8: bool = False) -> jax.Array:
  """The routed experts' grouped GEMM: ``out[rows of g] = x[rows of g] @ w[g].T``.

  The one place the MoE layer multiplies by expert weights (normal mode);
  ``jaxinfra.gemm.fp8_grouped_linear`` has this signature and replaces the
  body when it lands (``fp8`` is ignored until then). Today: on CPU the
  scan-based :func:`jaxinfra.moe.grouped.gmm` (XLA:CPU's ``ragged_dot``
  builds ``[experts, rows, k]`` intermediates), elsewhere
  ``jax.lax.ragged_dot``.

  Args:
    x: ``[M, k]`` rows grouped contiguously by expert.
    w: ``[G, n, k]`` expert weights.
    group_sizes: ``[G]`` int32 rows per expert; rows after their sum give 0.
    fp8: use the FP8 grouped GEMM (not yet available: runs in ``x``'s dtype).

  Returns:
    ``[M, n]`` in ``x``'s dtype (float32 accumulation).
  """
  del fp8
  w_kn = jnp.swapaxes(w, 1, 2).astype(x.dtype)

  def ragged(x, w_kn, group_sizes):
    out = lax.ragged_dot(x, w_kn, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(x.dtype)

  def scanned(x, w_kn, group_sizes):
    return grouped.gmm(x, w_kn, group_sizes)

  return lax.platform_dependent(x, w_kn, group_sizes, cpu=scanned, default=ragged)


def masked_grouped_linear(x: jax.Array, w: jax.Array, counts: jax.Array, *,
                          fp8: bool = False) -> jax.Array:
  """The low-latency experts' GEMM on the masked layout.

  ``x [G, M, k]``, ``w [G, n, k]``, ``counts [G]`` (rows of each expert that
  hold tokens) -> ``[G, M, n]``, rows at or past ``counts[g]`` zero. The
  switch point for ``grouped_fp8_gemm_masked``; ``fp8`` is ignored until then.
  """
  del fp8
  out = jnp.einsum("gmk,gnk->gmn", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
  live = jnp.arange(x.shape[1])[None, :, None] < counts[:, None, None]
  return jnp.where(live, out, 0).astype(x.dtype)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


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
    fp8: FP8 dispatch (and FP8 grouped GEMMs once ``jaxinfra.gemm`` lands).
    capacity_factor: None (dropless) or the buffers' factor over a balanced load.
    max_tokens_per_rank: low-latency ``T`` (default: the tokens per rank).
    dtype: compute dtype of the experts; param_dtype: parameters' dtype.
    backend, impl: passed to dispatch/permute.
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

  def _route(self, x, router, bias, expert_map):
    logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
    topk_idx, topk_weights = routing.route(
        logits, bias=bias, top_k=self.top_k, n_groups=self.n_groups,
        topk_groups=self.topk_groups, routed_scaling_factor=self.routed_scaling_factor,
        score_func=self.score_func)
    slots = topk_idx if expert_map is None else expert_map(topk_idx)
    return topk_idx, slots, topk_weights

  def _shared(self, x, shared):
    if not self.num_shared:
      return jnp.zeros_like(x)
    gate, up, down = (w.astype(x.dtype) for w in shared)
    return jnp.dot(_swiglu(x @ gate, x @ up), down)

  def _experts(self, rows, group_sizes, experts):
    w_gate, w_up, w_down = experts
    gate = grouped_linear(rows, w_gate, group_sizes, fp8=self.fp8)
    up = grouped_linear(rows, w_up, group_sizes, fp8=self.fp8)
    return grouped_linear(_swiglu(gate, up), w_down, group_sizes, fp8=self.fp8)

  def _masked_experts(self, rows, counts, experts):
    w_gate, w_up, w_down = experts
    gate = masked_grouped_linear(rows, w_gate, counts, fp8=self.fp8)
    up = masked_grouped_linear(rows, w_up, counts, fp8=self.fp8)
    return masked_grouped_linear(_swiglu(gate, up), w_down, counts, fp8=self.fp8)

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

  def _local(self, x, router, bias, experts, shared, expert_map):
    topk_idx, slots, weights = self._route(x, router, bias, expert_map)
    h = x.astype(self.dtype)
    routed = permute_lib.permute(h, slots, self.num_slots,
                                 num_rows=self._expert_rows(slots.size, x.shape[0]), impl=self.impl)
    out = self._experts(routed.rows, routed.group_sizes, experts)
    y = permute_lib.unpermute(out, routed.row_id_map, weights, impl=self.impl)
    per_expert, per_slot = self._counts(topk_idx, slots)
    return y + self._shared(h, shared), MoEStats(per_expert, per_slot, routed.num_dropped)

  def _ep(self, x, router, bias, experts, shared, expert_map):
    axes = _mesh_axes(self.ep_axis)
    axis = self.ep_axis if isinstance(self.ep_axis, str) else axes
    ranks = dispatch_lib.axis_size(axis)
    per_rank = self.num_slots // ranks
    topk_idx, slots, weights = self._route(x, router, bias, expert_map)
    h = x.astype(self.dtype)
    n = h.shape[0]
    if self.mode == "low_latency":
      tokens = self.max_tokens_per_rank or n
      sent = low_latency_lib.low_latency_dispatch(h, slots, axis_name=axis,
                                                  num_experts=self.num_slots,
                                                  max_tokens_per_rank=tokens, fp8=self.fp8,
                                                  impl=self.impl)
      rows = sent.recv_x
      if self.fp8:
        rows = quant.dequantize_per_token(rows, sent.recv_scales, out_dtype=self.dtype)
      out = self._masked_experts(rows, sent.recv_count, experts)
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
    names = ("router", "gate_bias", "w_gate", "w_up", "w_down")
    if self.num_shared:
      names += ("shared_gate", "shared_up", "shared_down")
    return {name: getattr(self, name)[...] for name in names}

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
    return {name: split if name in _EXPERT_WEIGHTS else P() for name in self.params()}

  def __call__(self, x: jax.Array, *,
               expert_map: Callable[[jax.Array], jax.Array] | None = None
               ) -> tuple[jax.Array, MoEStats]:
    """Applies the layer.

    Args:
      x: ``[N, H]`` tokens (flatten batch and sequence first); with a mesh,
        ``N`` must be divisible by the EP size (each rank gets ``N / R``
        tokens); with ``ep_axis`` and no mesh, this rank's tokens.
      expert_map: maps ``topk_idx [n, K]`` logical ids to physical slots in
        ``[0, P)`` (e.g. :func:`replicated_expert_map`); None: identity.

    Returns:
      ``(y [N, H] in the compute dtype, MoEStats)``.
    """
    return self.apply(self.params(), x, expert_map=expert_map)

  def apply(self, params: dict[str, jax.Array], x: jax.Array, *,
            expert_map: Callable[[jax.Array], jax.Array] | None = None
            ) -> tuple[jax.Array, MoEStats]:
    """The layer as a function of explicit arrays (no module state read or written).

    Args:
      params: a dict like :meth:`params`. Inside an enclosing ``shard_map``
        (``ep_axis`` without ``mesh``), this rank's local blocks: expert
        weights ``[P/R, ...]`` (specs from :meth:`param_specs`), the rest whole.
      x: as in :meth:`__call__`.
      expert_map: as in :meth:`__call__`.

    Returns:
      ``(y, MoEStats)`` as in :meth:`__call__`; ``MoEStats`` are summed over
      the EP ranks (identical on every rank).
    """
    if x.ndim != 2 or x.shape[1] != self.hidden:
      raise ValueError(f"MoE: x must have shape [N, {self.hidden}], got {x.shape}")
    missing = sorted(set(self.params()) - set(params))
    if missing:
      raise ValueError(f"MoE.apply: params is missing {missing}")
    router, bias = params["router"], params["gate_bias"]
    experts = tuple(params[n] for n in _EXPERT_WEIGHTS)
    shared = (tuple(params[n] for n in ("shared_gate", "shared_up", "shared_down"))
              if self.num_shared else ())
    if self.ep_axis is None:
      self._check_experts(experts, self.num_slots, "")
      return self._local(x, router, bias, experts, shared, expert_map)
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
      return self._ep(x, router, bias, experts, shared, expert_map)
    self._check_experts(experts, self.num_slots, "")
    axes = _mesh_axes(self.ep_axis)
    ranks = math.prod(self.mesh.shape[a] for a in axes)
    if x.shape[0] % ranks:
      raise ValueError(f"MoE: the number of tokens {x.shape[0]} (x shape {x.shape}) must be "
                       f"divisible by the EP size {ranks}")
    split, whole = P(axes), P()

    def body(x, router, bias, experts, shared):
      return self._ep(x, router, bias, experts, shared, expert_map)

    run = jax.shard_map(
        body, mesh=self.mesh,
        in_specs=(split, whole, whole, (split,) * 3, (whole,) * len(shared)),
        out_specs=(split, MoEStats(whole, whole, whole)))
    args = (_to_spec(x, self.mesh, split), _to_spec(router, self.mesh, whole),
            _to_spec(bias, self.mesh, whole),
            tuple(_to_spec(w, self.mesh, split) for w in experts),
            tuple(_to_spec(w, self.mesh, whole) for w in shared))
    return run(*args)

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
