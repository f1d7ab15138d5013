"""Runs a pipeline schedule as one jitted ``shard_map`` program over a mesh axis.

``pipeline_step`` computes the loss and the parameter gradients of a model cut
into stages, with any schedule of ``jaxinfra.pipeline.SCHEDULES``. The whole
step is one SPMD program: a ``lax.scan`` over the ticks of the schedule's static
tick table; at each tick every rank picks its op with ``lax.switch`` (forward,
full backward, input-gradient backward, deferred weight gradient, overlapped
forward + backward, or idle), and two ``lax.ppermute``s (to r+1 and to r-1)
carry the activations and gradients made in that tick to the neighbours.

The model:

* ``stage_fn(stage_params, x) -> y``: one stage; ``x`` and ``y`` are the
  activation of one micro-batch and must have the same shape and dtype.
  ``params.stages`` stacks the stages' parameters on a leading axis.
* ``embed_fn(embed_params, inputs_mb) -> x`` (optional; default: the inputs are
  the activations) runs before the first stage, and ``loss_fn(head_params, y,
  labels_mb) -> scalar`` after the last, on the ranks that hold those stages
  (both end ranks for DualPipe, rank 0 for DualPipeV). The embedding runs for
  all micro-batches at once before the scan, and its gradient once after it
  from each micro-batch's stage-0 input gradient (so a large, sparsely used
  table is not touched on every tick).
* The loss is the mean of ``loss_fn`` over all micro-batches (and over the
  batch shards, with ``batch_axes``); gradients are those of that mean.

Residuals: by default each forward's VJP residuals (what ``jax.vjp`` keeps) are
stashed in fixed-size buffers until the chunk's backward, so a backward costs a
backward; the weight-gradient half of a split backward (zero bubble) keeps
them, with the output gradient, until its deferred ``W``. ``remat=True`` keeps
only each chunk's stage input and recomputes the forward in the backward. The
stash reads the residuals out of the function ``jax.vjp`` returns (a pytree);
if a JAX version stops exposing them, the executor falls back to ``remat``
with a warning. Parameters are never stashed: they are read again when needed.
Other residuals computed from parameters alone (e.g. ``w.T`` or ``w`` cast to
bfloat16) are stashed per chunk; compute such things inside a
``jax.checkpoint`` or precompute them into the parameters.

The split itself is XLA's dead-code elimination of one VJP: the input-gradient
op (I) keeps only the ``dx`` path, the weight-gradient op (W) only the ``dW``
path. W therefore recomputes the cotangents inside the stage that its weight
gradients need (for a stack of dense layers, all but the first layer's input
gradient), so I + W costs more than B. DualPipe's ``WeightGradStore`` avoids
this with layers that store (input, output-gradient) pairs; a per-layer store
is not implemented here. ``jaxinfra bench pipeline`` measures I and W.

Overlap (DualPipe's ``F&B``): a tick that pairs the forward of one chunk with
the backward of another computes both in the same branch of the ``switch``,
so XLA's scheduler may run each one's collectives (the expert-parallel
all-to-all of MoE stages) under the other's compute. A model can take over
these ticks by passing ``overlapped_forward_backward``::

    def overlapped_forward_backward(forward_fn, forward_args,
                                    backward_fn, backward_args, cotangent):
      out = forward_fn(*forward_args)              # chunk A's forward
      _, vjp = jax.vjp(backward_fn, *backward_args)
      return out, vjp(cotangent)                   # chunk B's gradients

``forward_fn`` / ``backward_fn`` are the two chunks' functions
``fn(params, x) -> y``: the stage, followed by the loss for a last-stage chunk
(then ``y`` is the micro-batch's loss); ``x`` is the chunk's input activation
(the embedded micro-batch for stage 0), ``params`` is ``(stage_params,
head_params)`` (``head_params`` is ``None`` except for last-stage chunks). The
hook must return ``forward_fn``'s output and the ``jax.vjp`` gradients
``(d_params, d_x)`` of ``backward_fn`` at ``backward_args`` and
``cotangent``; how it interleaves the two (splitting them into attention /
dispatch / experts / combine pieces, ordering them with
``jax.lax.optimization_barrier``) is the model's business. Like DualPipe's
hook, the backward inside it is never split; with a hook the executor keeps
stage inputs and recomputes (``remat``), since the hook recomputes its
backward chunk's forward from ``backward_args``. The hook is traced once per
kind of F&B tick.

Other mesh axes: the program is a ``shard_map`` over every axis of ``mesh``.
``batch_axes`` names the axes the batch is split over (data or expert
parallel); ``stage_specs`` gives each stage-parameter leaf its
``PartitionSpec`` over the non-pipeline axes (e.g. experts over ``"ep"``), so
``stage_fn`` sees its local shards and may use collectives over those axes
(``lax.all_to_all(..., "ep", ...)``). A leaf's gradient is summed over the
batch axes its spec does not name; embedding and head parameters are
replicated over the non-pipeline axes.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxinfra.pipeline import _plan
from jaxinfra.pipeline.schedules import Schedule, make_schedule, stages_for


class PipelineParams(NamedTuple):
  """The parameters of a pipelined model.

  Attributes:
    stages: pytree; every leaf ``[num_stages, ...]`` (stage s at index s).
    embed: pytree or ``None``; ``embed_fn``'s parameters (first stage).
    head: pytree or ``None``; ``loss_fn``'s parameters (last stage).
  """
  stages: Any
  embed: Any = None
  head: Any = None


def default_overlapped_forward_backward(forward_fn: Callable, forward_args: tuple,
                                        backward_fn: Callable, backward_args: tuple,
                                        cotangent: Any) -> tuple[Any, tuple]:
  """Chunk A's forward and chunk B's backward in one program region."""
  out = forward_fn(*forward_args)
  _, vjp = jax.vjp(backward_fn, *backward_args)
  return out, vjp(cotangent)


def pipeline_step(stage_fn: Callable, params: Any, inputs: jax.Array, labels: Any,
                  loss_fn: Callable, *, mesh: jax.sharding.Mesh, axis: str = "pp",
                  schedule: str = "dualpipev", num_chunks: int,
                  embed_fn: Callable | None = None, batch_axes: Sequence[str] = (),
                  stage_specs: Any = None, overlapped_forward_backward: Callable | None = None,
                  remat: bool = False) -> tuple[jax.Array, Any]:
  """Loss and gradients of one pipelined training step.

  Args:
    stage_fn: ``stage_fn(stage_params, x) -> y``, ``x``/``y`` one micro-batch's
      activation, same shape and dtype.
    params: a :class:`PipelineParams`, or a pytree of stacked stage parameters
      (leaves ``[num_stages, ...]``). ``num_stages`` is the mesh axis size,
      or twice it for ``dualpipev``.
    inputs: ``[batch, ...]``, split into ``num_chunks`` micro-batches along
      axis 0 (per batch shard). DualPipe feeds the first half of the
      micro-batches in at rank 0 and the second half at the last rank.
    labels: pytree of ``[batch, ...]`` arrays, split like ``inputs``.
    loss_fn: ``loss_fn(head_params, y, labels_mb) -> scalar`` (``head_params``
      is ``params.head``, possibly ``None``).
    mesh: the device mesh; ``axis`` is its pipeline axis.
    axis: name of the pipeline mesh axis.
    schedule: ``"gpipe"``, ``"1f1b"``, ``"zb1p"``, ``"dualpipe"`` or ``"dualpipev"``.
    num_chunks: micro-batches per step (dualpipe: even and >= 2 ranks;
      dualpipev: >= 2 ranks).
    embed_fn: ``embed_fn(embed_params, inputs_mb) -> x``; default identity.
    batch_axes: mesh axes the batch dimension is sharded over.
    stage_specs: pytree like one stage's parameters of ``PartitionSpec`` over
      the non-pipeline axes (default: replicated).
    overlapped_forward_backward: optional hook for F&B ticks (module docstring).
    remat: recompute each chunk's forward in its backward instead of stashing
      residuals.

  Returns:
    ``(loss, grads)``: the mean loss (float scalar) and gradients shaped like
    ``params`` (for DualPipe, the two copies of each stage summed).
  """
  config = _config(stage_fn, loss_fn, embed_fn, mesh, axis, schedule, num_chunks, batch_axes,
                   stage_specs, overlapped_forward_backward, remat, forward_only=False)
  wrap = isinstance(params, PipelineParams)
  params = params if wrap else PipelineParams(params)
  loss, grads = _run_jit(config, params, inputs, labels)
  return loss, (grads if wrap else grads.stages)


def pipeline_forward(stage_fn: Callable, params: Any, inputs: jax.Array, *,
                     mesh: jax.sharding.Mesh, axis: str = "pp", schedule: str = "dualpipev",
                     num_chunks: int, embed_fn: Callable | None = None,
                     labels: Any = None, loss_fn: Callable | None = None,
                     batch_axes: Sequence[str] = (), stage_specs: Any = None
                     ) -> tuple[jax.Array, jax.Array | None]:
  """Inference: the schedule's forwards only.

  Arguments as in :func:`pipeline_step`. Returns ``(outputs, loss)``:
  ``outputs`` ``[batch, ...]`` are the last stage's outputs (before
  ``loss_fn``) in batch order; ``loss`` is the mean of ``loss_fn`` if both
  ``labels`` and ``loss_fn`` are given, else ``None``.
  """
  if (labels is None) != (loss_fn is None):
    raise ValueError("pipeline_forward: give both labels and loss_fn, or neither")
  config = _config(stage_fn, loss_fn, embed_fn, mesh, axis, schedule, num_chunks, batch_axes,
                   stage_specs, None, False, forward_only=True)
  params = params if isinstance(params, PipelineParams) else PipelineParams(params)
  return _run_jit(config, params, inputs, labels)


# --- configuration ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
  stage_fn: Callable
  loss_fn: Callable | None
  embed_fn: Callable | None
  mesh: jax.sharding.Mesh
  axis: str
  schedule: str
  num_chunks: int
  batch_axes: tuple[str, ...]
  stage_specs: tuple[Any, Any]  # (treedef, leaves) or (None, None)
  hook: Callable | None
  remat: bool
  forward_only: bool


def _config(stage_fn, loss_fn, embed_fn, mesh, axis, schedule, num_chunks, batch_axes,
            stage_specs, hook, remat, *, forward_only) -> _Config:
  if not isinstance(mesh, jax.sharding.Mesh):
    raise ValueError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
  if axis not in mesh.axis_names:
    raise ValueError(f"mesh has no axis {axis!r} (its axes: {mesh.axis_names}); the pipeline "
                     "needs a mesh axis named by `axis`")
  batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
  for a in batch_axes:
    if a not in mesh.axis_names or a == axis:
      raise ValueError(f"batch_axes: {a!r} must be a mesh axis other than the pipeline axis "
                       f"{axis!r}; mesh axes: {mesh.axis_names}")
  if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
    raise ValueError(f"num_chunks must be a positive int, got {num_chunks!r}")
  if stage_specs is None:
    specs = (None, None)
  else:
    leaves, treedef = jax.tree_util.tree_flatten(stage_specs, is_leaf=lambda x: isinstance(x, P))
    specs = (treedef, tuple(leaves))
  return _Config(stage_fn, loss_fn, embed_fn, mesh, axis, schedule, num_chunks, batch_axes,
                 specs, hook, bool(remat or hook is not None), forward_only)


@functools.lru_cache(maxsize=64)
def _cached_plan(name: str, num_ranks: int, num_chunks: int, remat: bool,
                 forward_only: bool) -> _plan.Plan:
  schedule = make_schedule(name, num_ranks, num_chunks)
  return _plan.make_plan(schedule.forward_only() if forward_only else schedule, remat=remat)


class _StashUnavailable(Exception):
  """jax.vjp's result does not expose its residuals as arrays on this JAX."""


def split_residuals(vjp: Callable, params: Any) -> tuple[Any, list[int | None], list[jax.Array]]:
  """Splits the function ``jax.vjp(fn, params, x)`` returned into what a stash keeps.

  Returns ``(treedef, param_of, stashed)``: the function's pytree structure;
  for each of its leaves, the index among ``params``'s leaves of the
  parameter it is, or ``None``; and the leaves that are not parameters (the
  residuals to stash). Raises ``_StashUnavailable`` if the function does not
  flatten into arrays on this JAX.
  """
  leaves, treedef = jax.tree_util.tree_flatten(vjp)
  if not leaves or any(not isinstance(leaf, jax.Array) for leaf in leaves):
    raise _StashUnavailable("jax.vjp's function does not flatten into arrays")
  ids = {id(leaf): i for i, leaf in enumerate(jax.tree_util.tree_leaves(params))}
  param_of = [ids.get(id(leaf)) for leaf in leaves]
  return treedef, param_of, [leaf for leaf, k in zip(leaves, param_of) if k is None]


@functools.partial(jax.jit, static_argnums=0)
def _run_jit(config: _Config, params: PipelineParams, inputs, labels):
  try:
    return _run(config, params, inputs, labels)
  except _StashUnavailable as e:
    warnings.warn(f"jaxinfra.pipeline: cannot stash VJP residuals ({e}); recomputing the "
                  "forward in the backward (remat=True)", RuntimeWarning, stacklevel=2)
    return _run(dataclasses.replace(config, remat=True), params, inputs, labels)


def _leaf_specs(config: _Config, stages: Any) -> list[P]:
  leaves, treedef = jax.tree_util.tree_flatten(stages)
  if config.stage_specs[0] is None:
    return [P()] * len(leaves)
  spec_treedef, specs = config.stage_specs
  if spec_treedef != treedef:
    raise ValueError(f"stage_specs must have the structure of one stage's parameters "
                     f"({treedef}), got {spec_treedef}")
  return list(specs)


def _spec_axes(spec: P) -> set[str]:
  out = set()
  for entry in spec:
    if entry is None:
      continue
    out.update(entry if isinstance(entry, tuple) else (entry,))
  return out


def _run(config: _Config, params: PipelineParams, inputs, labels):
  mesh, axis = config.mesh, config.axis
  num_ranks = mesh.shape[axis]
  try:
    plan = _cached_plan(config.schedule, num_ranks, config.num_chunks, config.remat,
                        config.forward_only)
  except ValueError as e:
    raise ValueError(f"mesh axis {axis!r} has {num_ranks} devices: {e}") from None
  schedule = plan.schedule
  num_stages = stages_for(config.schedule, num_ranks)
  stage_leaves = jax.tree_util.tree_leaves(params.stages)
  if not stage_leaves:
    raise ValueError("params.stages has no arrays")
  for leaf in stage_leaves:
    if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != num_stages:
      raise ValueError(f"params.stages: every leaf needs a leading stage axis of size "
                       f"{num_stages} ({config.schedule} on {num_ranks} ranks), got a leaf of "
                       f"shape {jnp.shape(leaf)}")
  batch_size = math.prod(mesh.shape[a] for a in config.batch_axes)
  if jnp.ndim(inputs) < 1 or jnp.shape(inputs)[0] % (batch_size * config.num_chunks):
    raise ValueError(f"inputs: the batch (axis 0) must split into {batch_size} batch shard(s) x "
                     f"{config.num_chunks} micro-batches, got shape {jnp.shape(inputs)}")
  for leaf in jax.tree_util.tree_leaves(labels):
    if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != jnp.shape(inputs)[0]:
      raise ValueError(f"labels: every leaf needs the batch size of inputs "
                       f"({jnp.shape(inputs)[0]}) on axis 0, got shape {jnp.shape(leaf)}")

  specs = _leaf_specs(config, params.stages)
  slot_stages = np.asarray(schedule.slot_stages(), np.int32)  # [ranks, slots]
  stage_treedef = jax.tree_util.tree_structure(params.stages)
  # [stages, ...] -> [ranks, slots, ...]: gathered where every device sees the stage axis.
  stages_rl = jax.tree_util.tree_unflatten(stage_treedef, [
      _reshard(mesh, leaf, P(None, *spec))[slot_stages]
      for leaf, spec in zip(jax.tree_util.tree_leaves(params.stages), specs)])
  rl_specs = jax.tree_util.tree_unflatten(stage_treedef, [P(axis, None, *s) for s in specs])
  batch_spec = P(config.batch_axes or None)
  body = functools.partial(_body, config, plan, specs)
  if config.forward_only:
    out_specs = (batch_spec, P())
  else:
    out_specs = (P(), PipelineParams(rl_specs, P(), P()))
  in_specs = (rl_specs, P(), P(), batch_spec, batch_spec)
  args = (stages_rl, params.embed, params.head, inputs, labels)
  args = jax.tree_util.tree_map(  # explicit-sharding meshes want the layouts given up front
      lambda spec, a: jax.tree_util.tree_map(lambda x: _reshard(mesh, x, spec), a),
      in_specs, args, is_leaf=lambda x: isinstance(x, P))
  result = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(*args)
  if config.forward_only:
    outputs, loss = result
    return outputs, (loss if config.loss_fn is not None else None)
  loss, grads = result
  # [ranks, slots, ...] -> [stages, ...], each stage from its path-0 copy.
  canonical = np.asarray([r * schedule.num_slots + s for r, s in schedule.placement[0]])
  stage_grads = jax.tree_util.tree_unflatten(stage_treedef, [
      _reshard(mesh, g, P(None, None, *spec)).reshape((-1,) + g.shape[2:])[canonical]
      for g, spec in zip(jax.tree_util.tree_leaves(grads.stages), specs)])
  return loss, PipelineParams(stage_grads, grads.embed, grads.head)


def _get(buf: jax.Array, index) -> jax.Array:
  """``buf[index]`` for a traced scalar index (a plain dynamic slice)."""
  return lax.dynamic_index_in_dim(buf, index, keepdims=False)


def _put(buf: jax.Array, index, value) -> jax.Array:
  """``buf.at[index].set(value)`` for a traced scalar index, in place."""
  return lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), index, 0)


def _reshard(mesh: jax.sharding.Mesh, x, spec: P) -> jax.Array:
  """``x`` laid out as ``spec``: a reshard on explicit axes, a constraint on auto ones."""
  types = dict(zip(mesh.axis_names, mesh.axis_types))
  explicit = [t == jax.sharding.AxisType.Explicit for t in types.values()]
  sharding = jax.sharding.NamedSharding(mesh, spec)
  if any(explicit) and all(types[a] == jax.sharding.AxisType.Explicit for a in _spec_axes(spec)):
    return jax.reshard(jnp.asarray(x), sharding)
  return lax.with_sharding_constraint(jnp.asarray(x), sharding)


# --- the per-device program ---------------------------------------------------------------------
#
# The loop state (the big buffers) never goes through the `switch`: a branch reads
# what it needs from it and returns a fixed set of small results (an activation
# to write here or there, residuals to stash, one slot's weight gradient), which
# the tick writes with dynamic_update_slice at indices from its row (a trash slot
# when there is nothing to write). Threading the buffers through the branches
# would make XLA copy every buffer on every tick.


@dataclasses.dataclass
class _Template:
  """How a chunk kind's ``jax.vjp`` function flattens, and where its residuals go.

  ``param_of[i]``: index of leaf i among the chunk's parameter leaves (not
  stashed: read again when needed), or ``None`` for a stashed leaf.
  ``layout[j] = (dtype, offset, shape)`` of stashed leaf j in its dtype's
  flat stash row.
  """
  treedef: Any
  param_of: list[int | None]
  stashed: list[jax.ShapeDtypeStruct]
  layout: list[tuple[str, int, tuple[int, ...]]] = dataclasses.field(default_factory=list)


class _Device:
  """The program of one device (traced once, inside the shard_map body)."""

  def __init__(self, config: _Config, plan: _plan.Plan, specs: list[P], stages, embed, head,
               inputs, labels):
    self.config, self.plan, self.specs = config, plan, specs
    self.schedule: Schedule = plan.schedule
    self.stages = jax.tree_util.tree_map(lambda a: a[0], stages)  # [slots, ...]
    self.embed, self.head = embed, head
    chunks = config.num_chunks
    split = lambda a: a.reshape((chunks, a.shape[0] // chunks) + a.shape[1:])
    self.inputs = split(inputs)
    self.labels = jax.tree_util.tree_map(split, labels)
    self.training = not config.forward_only
    self.embed_fn = config.embed_fn or (lambda _, x: x)
    self.act = jax.eval_shape(self.embed_fn, embed, self.inputs[0])
    if not isinstance(self.act, jax.ShapeDtypeStruct):
      raise ValueError(f"embed_fn must return one array (the activation), got {self.act}")
    out = jax.eval_shape(config.stage_fn, self.slot_params(0), self.act)
    if not isinstance(out, jax.ShapeDtypeStruct) or (out.shape, out.dtype) != (
        self.act.shape, self.act.dtype):
      raise ValueError(
          "stage_fn: every stage must return an activation of the shape and dtype of its input "
          f"(the pipeline's activation {self.act.shape} {self.act.dtype}, from embed_fn or the "
          f"input micro-batch), so that stage outputs do not differ between stages; got {out}")
    self.loss_dtype = None
    if config.loss_fn is not None:
      loss = jax.eval_shape(config.loss_fn, head, self.act,
                            jax.tree_util.tree_map(lambda a: a[0], self.labels))
      if not isinstance(loss, jax.ShapeDtypeStruct) or loss.shape != ():
        raise ValueError(f"loss_fn must return a scalar, got {loss}")
      self.loss_dtype = loss.dtype
    self.num_batch = math.prod(config.mesh.shape[a] for a in config.batch_axes)
    first_ranks = np.zeros(self.schedule.num_ranks, bool)
    for path in self.schedule.placement:
      first_ranks[path[0][0]] = True
    self.holds_first = jnp.asarray(first_ranks)[lax.axis_index(config.axis)]
    self.templates: dict[_plan.Kind, _Template] = {}
    self.stash_width: dict[str, int] = {}
    if self.training and not config.remat:
      for kind in plan.stash_kinds:
        self.templates[kind] = self._template(kind)
      self._layout()

  # chunk functions

  def slot_params(self, slot: int):
    return jax.tree_util.tree_map(lambda a: a[slot], self.stages)

  def chunk(self, kind: _plan.Kind, mb):
    """``(fn, params)``: the chunk's function ``fn(params, x)`` and its parameters.

    ``params`` is ``(stage, head)``; the head (and ``loss_fn``) only for a
    last-stage chunk of a training step.
    """
    slot, _, last = kind
    with_loss = last and self.training
    lab = jax.tree_util.tree_map(lambda a: a[mb], self.labels) if with_loss else None
    def fn(prm, x):
      stage, head = prm
      y = self.config.stage_fn(stage, x)
      return self.config.loss_fn(head, y, lab) if with_loss else y
    return fn, (self.slot_params(slot), self.head if with_loss else None)

  def embed_all(self):
    """``[chunks, *act]``: every micro-batch embedded, on the ranks holding a first stage."""
    embed = lambda: jax.vmap(self.embed_fn, in_axes=(None, 0))(self.embed, self.inputs)
    zeros = lambda: jnp.zeros((self.config.num_chunks,) + self.act.shape, self.act.dtype)
    return lax.cond(self.holds_first, embed, zeros)

  # residual stash

  def _template(self, kind: _plan.Kind) -> _Template:
    found = {}
    def trace(mb, x):  # traced like a forward branch: dynamic micro-batch, traced input
      fn, prm = self.chunk(kind, mb)
      _, vjp = jax.vjp(fn, prm, x)
      treedef, param_of, stashed = split_residuals(vjp, prm)
      found["treedef"], found["param_of"] = treedef, param_of
      return stashed
    shapes = jax.eval_shape(trace, jax.ShapeDtypeStruct((), jnp.int32), self.act)
    return _Template(found["treedef"], found["param_of"], list(shapes))

  def _layout(self) -> None:
    """Packs each kind's stashed leaves into one flat row per dtype."""
    for t in self.templates.values():
      offsets: dict[str, int] = {}
      for leaf in t.stashed:
        dtype = np.dtype(leaf.dtype).name
        t.layout.append((dtype, offsets.get(dtype, 0), leaf.shape))
        offsets[dtype] = offsets.get(dtype, 0) + math.prod(leaf.shape)
      for dtype, size in offsets.items():
        self.stash_width[dtype] = max(self.stash_width.get(dtype, 0), size)

  def pack(self, kind, stashed) -> dict[str, jax.Array]:
    parts: dict[str, list[jax.Array]] = {d: [] for d in self.stash_width}
    for (dtype, _, _), leaf in zip(self.templates[kind].layout, stashed):
      parts[dtype].append(leaf.reshape(-1))
    rows = {}
    for dtype, width in self.stash_width.items():
      flat = jnp.concatenate(parts[dtype]) if parts[dtype] else jnp.zeros((0,), dtype)
      rows[dtype] = jnp.pad(flat, (0, width - flat.shape[0]))
    return rows

  def unpack(self, kind, rows: dict[str, jax.Array]) -> list[jax.Array]:
    return [lax.slice_in_dim(rows[dtype], offset, offset + math.prod(shape)).reshape(shape)
            for dtype, offset, shape in self.templates[kind].layout]

  # state and the per-tick results

  def init_state(self) -> dict[str, Any]:
    act, plan, chunks = self.act, self.plan, self.config.num_chunks
    zeros = lambda n: jnp.zeros((n,) + act.shape, act.dtype)
    state = {"acts": zeros(plan.act_cap + 1), "grads": zeros(plan.grad_cap + 1),
             "edge": zeros(chunks + 1)}  # training: input grads of stage 0; else: outputs
    if self.training:
      state["stash"] = {d: jnp.zeros((plan.stash_cap + 1, w), d)
                        for d, w in self.stash_width.items()}
      state["acc"] = jax.tree_util.tree_map(jnp.zeros_like, self.stages)
      state["acc_head"] = jax.tree_util.tree_map(jnp.zeros_like, self.head)
    if self.loss_dtype is not None:
      state["loss"] = jnp.zeros((), self.loss_dtype)
    return state

  def empty_result(self) -> dict[str, Any]:
    """What an idle branch returns; other branches fill in their parts."""
    act, plan = self.act, self.plan
    zero = jnp.zeros(act.shape, act.dtype)
    index = lambda i: jnp.asarray(i, jnp.int32)
    plus, minus = plan.channels
    out = {"plus": jnp.zeros((plus,) + act.shape, act.dtype) if plus else None,
           "minus": jnp.zeros((minus,) + act.shape, act.dtype) if minus else None,
           "act": (zero, index(plan.act_cap)), "grad": (zero, index(plan.grad_cap)),
           "edge": (zero, index(self.config.num_chunks))}
    if self.training:
      out["stash"] = ({d: jnp.zeros((w,), d) for d, w in self.stash_width.items()},
                      index(plan.stash_cap))
      out["dstage"] = (jax.tree_util.tree_map(jnp.zeros_like, self.slot_params(0)), index(0))
      out["dhead"] = jax.tree_util.tree_map(jnp.zeros_like, self.head)
    if self.loss_dtype is not None:
      out["loss"] = jnp.zeros((), self.loss_dtype)
    return out

  def route(self, out, dest, value, index, pool):
    """Sends ``value`` to a neighbour (channel ``index``) or keeps it in ``pool``."""
    if dest in ("+", "-"):
      name = "plus" if dest == "+" else "minus"
      return dict(out, **{name: _put(out[name], index, value)})
    if dest == "local":
      return dict(out, **{pool: (value, index)})
    return out

  # op pieces

  def forward_input(self, state, x0, row, kind):
    fn, prm = self.chunk(kind, row[_plan.F_MB])
    x = _get(x0, row[_plan.F_MB]) if kind[1] else _get(state["acts"], row[_plan.F_IN])
    return fn, prm, x

  def forward_output(self, out, row, fkey, y, vjp, prm):
    kind, dest = fkey
    if vjp is not None:  # stash the residuals
      t = self.templates[kind]
      _, param_of, stashed = split_residuals(vjp, prm)
      if param_of != t.param_of or [(a.shape, a.dtype) for a in stashed] != [
          (s.shape, s.dtype) for s in t.stashed]:
        raise ValueError("stage_fn's VJP residuals differ between two traces of the same "
                         "chunk; pass remat=True")
      out = dict(out, stash=(self.pack(kind, stashed), row[_plan.F_RES]))
    if not kind[2]:
      return self.route(out, dest, y, row[_plan.F_OUT], "act")
    mb = row[_plan.F_MB]
    if self.training:
      return dict(out, loss=out["loss"] + y)
    out = dict(out, edge=(y, mb))
    if self.loss_dtype is not None:
      lab = jax.tree_util.tree_map(lambda a: a[mb], self.labels)
      out["loss"] = out["loss"] + self.config.loss_fn(self.head, y, lab)
    return out

  def forward(self, state, x0, out, row, fkey):
    fn, prm, x = self.forward_input(state, x0, row, fkey[0])
    if self.training and not self.config.remat:
      y, vjp = jax.vjp(fn, prm, x)
    else:
      y, vjp = fn(prm, x), None
    return self.forward_output(out, row, fkey, y, vjp, prm)

  def cotangent(self, state, row, kind):
    if kind[2]:
      return jnp.asarray(1.0 / (self.config.num_chunks * self.num_batch), self.loss_dtype)
    return _get(state["grads"], row[_plan.B_G])

  def backward_input(self, state, x0, row, kind):
    """``(fn, params, x)`` of the chunk to differentiate, its input read back."""
    fn, prm = self.chunk(kind, row[_plan.B_MB])
    x = _get(x0, row[_plan.B_MB]) if kind[1] else _get(state["acts"], row[_plan.B_RES])
    return fn, prm, x

  def backward_vjp(self, state, x0, row, kind):
    """The chunk's VJP function, from the stash or by recomputing its forward."""
    if self.config.remat:
      fn, prm, x = self.backward_input(state, x0, row, kind)
      return jax.vjp(fn, prm, x)[1]
    t = self.templates[kind]
    rows = {d: _get(buf, row[_plan.B_RES]) for d, buf in state["stash"].items()}
    stashed = iter(self.unpack(kind, rows))
    params = jax.tree_util.tree_leaves(self.chunk(kind, row[_plan.B_MB])[1])
    leaves = [params[k] if k is not None else next(stashed) for k in t.param_of]
    return jax.tree_util.tree_unflatten(t.treedef, leaves)

  def backward_output(self, out, row, bkey, grads, split):
    (kind, dest), ((dstage, dhead), dx) = bkey, grads
    if split != "input":  # the weight gradient
      out = dict(out, dstage=(dstage, jnp.asarray(kind[0], jnp.int32)))
      if kind[2]:
        out["dhead"] = dhead
    if split == "weight":
      return out
    if kind[1]:  # stage 0: the embedding's output gradient
      return dict(out, edge=(dx, row[_plan.B_MB]))
    return self.route(out, dest, dx, row[_plan.B_OUT], "grad")

  def backward(self, state, x0, out, row, bkey, split):
    grads = self.backward_vjp(state, x0, row, bkey[0])(self.cotangent(state, row, bkey[0]))
    return self.backward_output(out, row, bkey, grads, split)

  def forward_backward(self, state, x0, out, row, fkey, bkey):
    """F&B: one chunk's forward and another's backward in one region."""
    f_fn, f_prm, f_x = self.forward_input(state, x0, row, fkey[0])
    g = self.cotangent(state, row, bkey[0])
    vjp = None
    if self.config.hook is not None:
      b_fn, b_prm, b_x = self.backward_input(state, x0, row, bkey[0])
      y, grads = self.config.hook(f_fn, (f_prm, f_x), b_fn, (b_prm, b_x), g)
    else:
      b_vjp = self.backward_vjp(state, x0, row, bkey[0])
      if self.config.remat:
        y = f_fn(f_prm, f_x)
      else:
        y, vjp = jax.vjp(f_fn, f_prm, f_x)
      grads = b_vjp(g)
    out = self.backward_output(out, row, bkey, grads, "full")
    return self.forward_output(out, row, fkey, y, vjp, f_prm)

  def branch(self, key) -> Callable:
    def run(state, x0, row):
      out = self.empty_result()
      if key[0] == "F":
        out = self.forward(state, x0, out, row, key[1])
      elif key[0] == "B":
        out = self.backward(state, x0, out, row, key[1], key[2])
      elif key[0] == "W":
        out = self.backward(state, x0, out, row, (key[1], None), "weight")
      elif key[0] == "FB":
        out = self.forward_backward(state, x0, out, row, key[1], key[2])
      return out
    return run

  def tick(self, x0, state, rows_t):
    config, plan = self.config, self.plan
    row = rows_t[lax.axis_index(config.axis)]
    out = lax.switch(row[_plan.BRANCH], [self.branch(key) for key in plan.branches],
                     state, x0, row)
    state = dict(state)
    for name, pool in (("act", "acts"), ("grad", "grads"), ("edge", "edge")):
      state[pool] = _put(state[pool], out[name][1], out[name][0])
    if "loss" in state:
      state["loss"] = state["loss"] + out["loss"]
    if self.training:
      rows, index = out["stash"]
      state["stash"] = {d: _put(buf, index, rows[d]) for d, buf in state["stash"].items()}
      dstage, slot = out["dstage"]
      state["acc"] = jax.tree_util.tree_map(lambda a, d: _put(a, slot, _get(a, slot) + d),
                                            state["acc"], dstage)
      state["acc_head"] = jax.tree_util.tree_map(jnp.add, state["acc_head"], out["dhead"])
    ranks = self.schedule.num_ranks
    for sent, cols, perm in (
        (out["plus"], plan.in_plus, [(r, r + 1) for r in range(ranks - 1)]),
        (out["minus"], plan.in_minus, [(r + 1, r) for r in range(ranks - 1)])):
      if sent is None:
        continue
      received = lax.ppermute(sent, config.axis, perm)
      for c, (act_col, grad_col) in enumerate(cols):
        state["acts"] = _put(state["acts"], row[act_col], received[c])
        state["grads"] = _put(state["grads"], row[grad_col], received[c])
    return state, None

  def finish(self, state):
    config, schedule = self.config, self.schedule
    axes = (config.axis, *config.batch_axes)
    chunks = config.num_chunks
    scale = 1.0 / (chunks * self.num_batch)
    loss = lax.psum(state["loss"], axes) * scale if "loss" in state else jnp.zeros(())
    if not self.training:
      outputs = lax.psum(state["edge"][:chunks], config.axis)
      return outputs.reshape((-1,) + outputs.shape[2:]), loss
    acc = state["acc"]
    if schedule.name == "dualpipe":  # the mirror pair (r, P-1-r) holds the same two stages
      ranks = schedule.num_ranks
      other = lax.ppermute(acc, config.axis, [(r, ranks - 1 - r) for r in range(ranks)])
      acc = jax.tree_util.tree_map(lambda a, o: a + o[::-1], acc, other)
    leaves, treedef = jax.tree_util.tree_flatten(acc)
    reduced = []
    for leaf, spec in zip(leaves, self.specs):
      over = tuple(a for a in config.batch_axes if a not in _spec_axes(spec))
      reduced.append((lax.psum(leaf, over) if over else leaf)[None])
    head = jax.tree_util.tree_map(lambda g: lax.psum(g, axes), state["acc_head"])
    return loss, PipelineParams(jax.tree_util.tree_unflatten(treedef, reduced),
                                self.embed_grads(state["edge"][:chunks], axes), head)

  def embed_grads(self, dx0, axes):
    """The embedding's gradient, once per step from every micro-batch's stage-0 input grad."""
    if not jax.tree_util.tree_leaves(self.embed):
      return jax.tree_util.tree_map(jnp.zeros_like, self.embed)
    def grads():
      embed_all = lambda e: jax.vmap(self.embed_fn, in_axes=(None, 0))(e, self.inputs)
      return jax.vjp(embed_all, self.embed)[1](dx0)[0]
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, self.embed)
    return jax.tree_util.tree_map(lambda g: lax.psum(g, axes),
                                  lax.cond(self.holds_first, grads, zeros))


def _body(config: _Config, plan: _plan.Plan, specs: list[P], stages, embed, head, inputs,
          labels):
  device = _Device(config, plan, specs, stages, embed, head, inputs, labels)
  x0 = device.embed_all()
  state, _ = lax.scan(functools.partial(device.tick, x0), device.init_state(),
                      jnp.asarray(plan.rows))
  return device.finish(state)
