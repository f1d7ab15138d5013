"""DeepSeek-V3 as functions for ``jaxinfra.pipeline.pipeline_step`` (DualPipeV and friends).

:func:`pipeline_parts` cuts a :class:`~models.deepseek_v3.model.DeepSeekV3` into
the executor's pieces::

    parts = pipeline_parts(model, num_stages=2 * mesh.shape["pipe"], ep_axis="expert")
    loss, grads = jaxinfra.pipeline.pipeline_step(
        parts.stage_fn, parts.params, tokens, parts.labels(targets), parts.loss_fn,
        mesh=mesh, axis="pipe", schedule="dualpipev", num_chunks=4,
        embed_fn=parts.embed_fn, batch_axes=("data", "expert"),
        stage_specs=parts.stage_specs)
    grads = parts.tie_grads(grads)                     # tied embedding: sum both copies
    loads, mtp_loads = parts.loads(grads)              # tokens per expert of the step
    # tx = optax.masked(optax.adamw(...), parts.trainable_mask(parts.params)): biases untouched
    updates, opt_state = tx.update(parts.trainable(grads), opt_state, params)
    params = parts.update_bias(optax.apply_updates(params, updates), grads)

Every piece is a pure function of pytrees of arrays (pure dicts of the
model's ``nnx.State``, see ``nnx.to_pure_dict``):

* ``params.embed`` = ``{"embed": token embedding, "dense_layers": the
  first n_dense_layers blocks}``; ``embed_fn(embed, tokens [mb, S]) -> x
  [mb, S, D]`` (compute dtype).
* ``params.stages`` = the stacked MoE layers, every leaf reshaped from
  ``[n_moe_layers, ...]`` to ``[num_stages, layers_per_stage, ...]``
  (stage ``s`` holds layers ``s * L .. s * L + L - 1``); ``stage_fn(stage,
  x) -> x`` scans over its ``L`` layers.
* ``params.head`` = ``{"norm", "head", "mtp", "embed"}``; ``loss_fn(head,
  y, labels) -> scalar`` is the final norm, the output head and the MTP
  module (its own MoE block runs locally: head parameters are replicated
  over the non-pipeline axes), returning ``CE + mtp_loss_weight * MTP CE``
  (:func:`models.deepseek_v3.model.heads_loss`) of one micro-batch.
  ``labels`` = ``{"targets" [B, S] int32, "mask" [B, S] float32}``
  (:meth:`Parts.labels`). The executor averages ``loss_fn`` over
  micro-batches and batch shards, so with a mask the loss is the mean of
  per-micro-batch means; without padding it equals the model's loss.
* ``stage_specs``: ``PartitionSpec(None, ep_axis)`` for the routed experts'
  leaves (``w_gate, w_up, w_down``: ``[L, E, ...]`` per stage, experts over
  ``ep_axis``), replicated otherwise.

Expert parallelism: with ``ep_axis`` the MoE layers in ``stage_fn`` run the
DeepEP-style dispatch/combine over that axis inside the executor's
``shard_map`` (``jaxinfra.moe.MoE`` built with ``ep_axis`` and no mesh); the batch
must be split over ``ep_axis`` (pass it in ``batch_axes``), so each EP rank
routes its own tokens. Build the model without a mesh.

Tied embedding: the executor keeps ``embed`` and ``head`` apart, so the table
has two copies (``params.embed["embed"]``, ``params.head["embed"]``: MTP
reads the next tokens' embeddings). :meth:`Parts.tie_grads` replaces both
copies' gradients by their sum, the gradient of the tied table; applied to
both copies, any elementwise optimizer (AdamW) keeps them equal, as they
start equal. For global-norm clipping use :meth:`Parts.global_norm`, which
counts the table once and skips the biases.

Expert loads: every MoE block ends in :func:`~models.deepseek_v3.model.load_probe`,
so the gradient of each ``gate_bias`` leaf is that layer's tokens per expert,
summed by the executor over micro-batches and batch shards (each EP rank
reports its own tokens' counts). :meth:`Parts.loads` reads them;
:meth:`Parts.update_bias` applies the aux-loss-free step; the optimizer must
skip these leaves (:meth:`Parts.trainable_mask` for ``optax.masked``;
:meth:`Parts.trainable` zeroes their gradients) and :meth:`Parts.update_bias`
applies the step from the loads after the optimizer update.

Back to the model: :meth:`Parts.to_pure` / :meth:`Parts.to_model` for
parameters, :meth:`Parts.grads_to_pure` for gradients (tied table summed,
biases holding the loads).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxinfra.moe import routing
from jaxinfra.pipeline import PipelineParams

from models.deepseek_v3 import model as model_lib

_EXPERT_LEAVES = ("w_gate", "w_up", "w_down")


def _map_named(fn, tree):
  """``fn(path_names, leaf)`` over a pure dict, ``path_names`` the keys as strings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: fn(tuple(str(getattr(k, "key", k)) for k in path), leaf), tree)


def _is_bias(names: tuple[str, ...]) -> bool:
  return bool(names) and names[-1] == "gate_bias"


@dataclasses.dataclass(frozen=True, eq=False)
class PipelineFunctions:
  """The functions of a model cut for the pipeline executor (no arrays).

  Hashed by identity (the executor's ``jit`` keys on ``stage_fn`` etc.), so
  reuse one object across steps to reuse the compiled step.

  Attributes:
    num_stages, layers_per_stage: the cut.
    ep_axis: the EP mesh axis of ``stage_fn`` (or None: local experts).
    stage_specs: ``PartitionSpec`` per leaf of one stage (None without EP).
  """

  num_stages: int
  layers_per_stage: int
  ep_axis: str | None
  stage_specs: Any
  _graphdefs: dict
  _config: Any

  # -- the executor's functions -----------------------------------------------------------------

  def embed_fn(self, embed: dict, tokens: jax.Array) -> jax.Array:
    """``tokens [mb, S]`` int32 -> ``x [mb, S, D]``: embedding and the dense layers."""
    gd = self._graphdefs
    x = nnx.merge(gd["embed"], embed["embed"])(tokens)
    positions = model_lib.default_positions(tokens)
    for block in nnx.merge(gd["dense_layers"], embed["dense_layers"]):
      x, _ = block(x, positions)
    return x

  def stage_fn(self, stage: dict, x: jax.Array) -> jax.Array:
    """``x [mb, S, D]`` -> ``[mb, S, D]``: this stage's ``layers_per_stage`` MoE layers."""
    positions = model_lib.default_positions(x[..., 0])
    blocks = nnx.merge(self._graphdefs["moe_layers"], stage)

    def layer(block, x, _):
      y, _ = block(x, positions)
      return y, None

    return model_lib.scan_blocks(blocks, x, layer, remat=self._config.remat)[0]

  def loss_fn(self, head: dict, y: jax.Array, labels: dict) -> jax.Array:
    """One micro-batch's loss from the last stage's ``y [mb, S, D]``: float32 scalar."""
    gd = self._graphdefs
    norm, out = nnx.merge(gd["norm"], head["norm"]), nnx.merge(gd["head"], head["head"])
    logits = out(norm(y)).astype(jnp.float32)
    targets, mask = labels["targets"], labels["mask"]
    mtp_logits = None
    if "mtp" in head:
      mtp = nnx.merge(gd["mtp"], head["mtp"])
      emb = nnx.merge(gd["embed"], head["embed"])(targets).astype(y.dtype)
      h, _ = mtp(y, emb, model_lib.default_positions(targets))
      mtp_logits = out(h).astype(jnp.float32)
    return model_lib.heads_loss(self._config, logits, mtp_logits, targets, mask)[0]

  @staticmethod
  def labels(targets: jax.Array, mask: jax.Array | None = None) -> dict:
    """``{"targets": int32 [B, S], "mask": float32 [B, S]}`` (mask default: ones)."""
    targets = jnp.asarray(targets)
    if mask is None:
      mask = jnp.ones(targets.shape, jnp.float32)
    return {"targets": targets.astype(jnp.int32), "mask": jnp.asarray(mask, jnp.float32)}

  # -- gradients and the bias ---------------------------------------------------------------------

  def tie_grads(self, grads: PipelineParams) -> PipelineParams:
    """Both embedding copies get the sum of their gradients (the tied table's)."""
    if "embed" not in grads.head:
      return grads
    total = jax.tree_util.tree_map(jnp.add, grads.embed["embed"], grads.head["embed"])
    return PipelineParams(grads.stages, dict(grads.embed, embed=total),
                          dict(grads.head, embed=total))

  def loads(self, grads: PipelineParams) -> tuple[jax.Array, jax.Array | None]:
    """``(tokens per expert [n_moe_layers, E], MTP's [1, E] or None)``, float32, of the step."""
    moe = grads.stages["ffn"]["gate_bias"]
    moe = jnp.round(moe.reshape(-1, moe.shape[-1]))
    mtp = grads.head["mtp"]["block"]["ffn"]["gate_bias"][None] if "mtp" in grads.head else None
    return moe, mtp

  def trainable(self, grads: PipelineParams) -> PipelineParams:
    """``grads`` with the ``gate_bias`` leaves zeroed (they are not optimized)."""
    return _map_named(lambda n, g: jnp.zeros_like(g) if _is_bias(n) else g, grads)

  def trainable_mask(self, params: PipelineParams) -> PipelineParams:
    """``True`` for optimized leaves, ``False`` for the ``gate_bias`` leaves
    (e.g. ``optax.masked(optax.adamw(...), mask)``, so weight decay never
    touches the biases)."""
    return _map_named(lambda n, _: not _is_bias(n), params)

  def global_norm(self, grads: PipelineParams) -> jax.Array:
    """L2 norm of the model's gradient: the tied table once, no biases."""
    head = {k: v for k, v in grads.head.items() if k != "embed"}
    tree = PipelineParams(grads.stages, grads.embed, head)
    leaves = jax.tree_util.tree_leaves(self.trainable(tree))
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in leaves))

  def update_bias(self, params: PipelineParams, grads: PipelineParams,
                  rate: float | None = None) -> PipelineParams:
    """The aux-loss-free step (``jaxinfra.moe.update_bias``) of every MoE layer's
    bias from the step's loads (the bias gradients); other leaves unchanged."""
    rate = self._config.bias_update_rate if rate is None else rate
    step = jax.vmap(functools.partial(routing.update_bias, rate=rate))

    def update(bias, load):
      return step(bias.reshape(-1, bias.shape[-1]), load.reshape(-1, load.shape[-1])
                  ).reshape(bias.shape)

    flat_g = {tuple(str(getattr(k, "key", k)) for k in path): g
              for path, g in jax.tree_util.tree_leaves_with_path(grads)}
    def leaf(path, p):
      names = tuple(str(getattr(k, "key", k)) for k in path)
      return update(p, flat_g[names]) if _is_bias(names) else p
    return jax.tree_util.tree_map_with_path(leaf, params)

  # -- back to the model ------------------------------------------------------------------------

  def to_pure(self, params: PipelineParams) -> dict:
    """The model's pure state dict (``nnx.to_pure_dict`` layout) from ``params``."""
    n_moe = self.num_stages * self.layers_per_stage
    pure = {"embed": params.embed["embed"], "dense_layers": params.embed["dense_layers"],
            "moe_layers": jax.tree_util.tree_map(
                lambda a: a.reshape((n_moe,) + a.shape[2:]), params.stages),
            "norm": params.head["norm"], "head": params.head["head"]}
    if "mtp" in params.head:
      pure["mtp"] = params.head["mtp"]
    return pure

  def to_model(self, params: PipelineParams) -> model_lib.DeepSeekV3:
    """A :class:`DeepSeekV3` holding ``params`` (for evaluation, serving, checkpoints)."""
    return nnx.merge(self._graphdefs["model"], self.to_pure(params))

  def grads_to_pure(self, grads: PipelineParams) -> dict:
    """Gradients in the model's pure-dict layout: the tied table's summed
    gradient, ``gate_bias`` leaves holding the loads."""
    return self.to_pure(self.tie_grads(grads))


@dataclasses.dataclass(frozen=True, eq=False)
class Parts:
  """:func:`pipeline_parts`'s result: ``params`` and the functions.

  Attributes:
    params: :class:`jaxinfra.pipeline.PipelineParams` (pure dicts of arrays).
    functions: :class:`PipelineFunctions`; its attributes and methods
      (``stage_fn``, ``embed_fn``, ``loss_fn``, ``stage_specs``, ``labels``,
      ``tie_grads``, ``loads``, ``trainable``, ``trainable_mask``, ``global_norm``,
      ``update_bias``, ``to_pure``, ``to_model``, ``grads_to_pure``, ...)
      are also reachable as ``parts.<name>``.
  """

  params: PipelineParams
  functions: PipelineFunctions

  def __getattr__(self, name: str):
    if name.startswith("__"):
      raise AttributeError(name)
    return getattr(self.functions, name)


def pipeline_parts(model: model_lib.DeepSeekV3, num_stages: int, *,
                   ep_axis: str | None = None) -> Parts:
  """Cuts ``model`` into ``num_stages`` pipeline stages of its MoE layers.

  Args:
    model: a :class:`DeepSeekV3` built without a mesh (its arrays are
      copied into ``Parts.params``; the model itself is not kept).
    num_stages: pipeline stages (``jaxinfra.pipeline.stages_for(schedule,
      ranks)``: twice the pipeline ranks for DualPipeV).
    ep_axis: the mesh axis of expert parallelism inside ``stage_fn``
      (also a batch axis of the step), or None.

  Returns:
    :class:`Parts`.

  Raises:
    ValueError: the MoE layers do not split into ``num_stages`` equal stages,
      the model was built with a mesh, or it has no MoE layer.
  """
  config = model.config
  n_moe = config.n_moe_layers
  if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
    raise ValueError(f"pipeline_parts: num_stages must be a positive int, got {num_stages!r}")
  if n_moe == 0 or n_moe % num_stages:
    raise ValueError(f"pipeline_parts: the {n_moe} MoE layers (n_layers={config.n_layers} - "
                     f"n_dense_layers={config.n_dense_layers}) do not split into num_stages="
                     f"{num_stages} equal stages")
  ffn = model.moe_layers.ffn
  if ffn.mesh is not None or ffn.ep_axis is not None:
    raise ValueError("pipeline_parts: build the model without mesh and ep_axis (local experts); "
                     "the stages run expert parallelism over pipeline_parts' ep_axis")
  if ep_axis is not None and not isinstance(ep_axis, str):
    raise ValueError(f"pipeline_parts: ep_axis must be one mesh axis name, got {ep_axis!r}")
  lps = n_moe // num_stages
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  graphdefs = {"model": graphdef}
  for name in ("embed", "dense_layers", "moe_layers", "norm", "head", "mtp"):
    sub = getattr(model, name)
    if sub is not None:
      graphdefs[name] = nnx.graphdef(sub)
  if ep_axis is not None:  # the stages' MoE runs inside the executor's shard_map over ep_axis
    graphdefs["moe_layers"] = nnx.graphdef(nnx.eval_shape(
        lambda: model_lib.stacked_blocks(config, lps, nnx.Rngs(0), ep_axis=ep_axis)))
  stages = jax.tree_util.tree_map(lambda a: a.reshape((num_stages, lps) + a.shape[1:]),
                                  pure["moe_layers"])
  embed = {"embed": pure["embed"], "dense_layers": pure["dense_layers"]}
  head = {"norm": pure["norm"], "head": pure["head"]}
  if model.mtp is not None:
    head.update(mtp=pure["mtp"], embed=pure["embed"])
  specs = None
  if ep_axis is not None:
    one_stage = jax.tree_util.tree_map(lambda a: a[0], stages)
    specs = _map_named(lambda n, _: P(None, ep_axis) if n[-1] in _EXPERT_LEAVES else P(),
                       one_stage)
  return Parts(PipelineParams(stages, embed, head),
               PipelineFunctions(num_stages, lps, ep_axis, specs, graphdefs, config))


__all__ = ["Parts", "PipelineFunctions", "pipeline_parts"]
