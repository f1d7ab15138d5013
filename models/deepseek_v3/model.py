"""DeepSeek-V3 in Flax NNX, assembled from jaxinfra ops.

Layout (DeepSeek-V3 sizes from :mod:`models.deepseek_v3.config`)::

    tokens [B, S] -> embed [V, D]
      -> n_dense_layers x Block(MLA, dense SwiGLU MLP)           (dense_layers, a list)
      -> n_moe_layers  x Block(MLA, jaxinfra.moe.MoE)            (moe_layers, STACKED)
      -> norm -> head [D, V] -> logits [B, S, V] (float32)
    MTP (n_mtp_layers = 1): eh_proj([enorm(embed(next token)) ; hnorm(h)])
      -> Block(MLA, MoE) -> norm -> the same head -> mtp_logits [B, S, V]

* Attention: :class:`jaxinfra.mla.MultiHeadLatentAttention` (YaRN RoPE from
  ``jaxinfra.rope``, expanded form for training/prefill through
  ``mla_prefill``, absorbed form over the paged latent cache for decode).
* Blocks are pre-norm residual: ``x += attn(attn_norm(x))``,
  ``x += ffn(ffn_norm(x))`` (RMSNorm).
* MoE: :class:`jaxinfra.moe.MoE`: shared + routed SwiGLU experts,
  group-limited sigmoid routing with the aux-loss-free bias (a
  ``RouterBias`` variable, never a gradient target).
* The MoE layers are ONE :class:`Block` module whose every leaf has a leading
  ``[n_moe_layers]`` axis (built with ``nnx.vmap``; run with a ``lax.scan``
  over layers), so the pipeline reshapes them into ``[stages,
  layers_per_stage, ...]`` for free (:mod:`models.deepseek_v3.pipeline`).
* MTP shares the embedding table and the output head with the main model
  (DeepSeek-V3 report, section 2.2). Its position ``i`` combines the main
  model's last hidden state ``h_i`` (before the final norm) with the
  embedding of token ``i + 1`` and predicts token ``i + 2``.
* Linear layers (attention projections, dense MLPs, ``eh_proj``) follow
  ``config.linear``: ``"dense"`` (``nnx.Linear``), ``"fp8"``
  (``jaxinfra.gemm.Fp8Dense``, FP8 GEMMs forward and backward) or
  ``"fp8_weights"`` (:class:`Fp8WeightLinear`: e4m3 weights with 128 x 128
  ``weight_scale_inv`` blocks as in DeepSeek's checkpoint, serving only).
  ``wkv_b`` (absorbed by decode), the router, the experts and the output
  head stay in ``param_dtype``.

Load probe (expert loads out of a pipelined step): every MoE block applies
:func:`load_probe` to its output. It is the identity on the activation, and
its backward returns the layer's per-expert token counts as the *gradient of
the routing bias*. So ``jax.grad`` of any loss w.r.t. the ``gate_bias``
leaves gives the tokens per expert of that forward (summed over whatever
the gradient is summed over: micro-batches, batch shards), which is all the
aux-loss-free update needs. The bias has no other gradient (routing selects
with ``stop_gradient(scores + bias)``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jaxinfra import gemm
from jaxinfra import quant
from jaxinfra import moe as moe_lib
from jaxinfra.mla import attention as mla_attention
from jaxinfra.moe import routing

from models.deepseek_v3 import config as config_lib
from models.deepseek_v3.config import Config


# --- linear layers --------------------------------------------------------------------------------


class Fp8WeightLinear(nnx.Module):
  """``y = x @ dequant(weight)^T`` with e4m3 weights as DeepSeek's checkpoint stores them.

  ``weight [out, in]`` float8_e4m3fn and ``weight_scale_inv [ceil(out/128),
  ceil(in/128)]`` float32 (the dequantized weight is ``weight * scale`` per
  128 x 128 block). The activation is quantized per token (1 x 128) and
  multiplied with one :func:`jaxinfra.gemm.fp8_gemm`. Forward only (serving).
  """

  def __init__(self, in_features: int, out_features: int, *, dtype=jnp.bfloat16,
               impl: str = "auto", rngs: nnx.Rngs):
    self.in_features, self.out_features, self.dtype, self.impl = (in_features, out_features,
                                                                   dtype, impl)
    w = jax.random.normal(rngs.params(), (out_features, in_features), jnp.float32)
    wq, scale = quant.quantize_per_block(w / np.sqrt(in_features), impl="xla")
    self.weight = nnx.Param(wq)
    self.weight_scale_inv = nnx.Param(scale)

  def __call__(self, x: jax.Array) -> jax.Array:
    """``x [..., in]`` -> ``[..., out]`` in ``dtype``."""
    lead = x.shape[:-1]
    xq, xs = quant.quantize_per_token(x.reshape(-1, x.shape[-1]).astype(jnp.float32),
                                      impl=self.impl)
    out_dtype = jnp.bfloat16 if np.dtype(self.dtype) == jnp.bfloat16 else jnp.float32
    y = gemm.fp8_gemm(xq, xs, self.weight[...], self.weight_scale_inv[...], out_dtype=out_dtype,
                      impl=self.impl)
    return y.reshape(*lead, self.out_features).astype(self.dtype)


def linear_factory(config: Config, rngs: nnx.Rngs) -> Callable[[int, int], nnx.Module]:
  """``make(in_features, out_features)`` for ``config.linear`` (no bias)."""
  dtype, param_dtype = config.compute_dtype, config.weight_dtype
  if config.linear == "dense":
    return lambda i, o: nnx.Linear(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
  if config.linear == "fp8":
    return lambda i, o: gemm.Fp8Dense(i, o, use_bias=False, dtype=dtype, param_dtype=param_dtype,
                                      rngs=rngs)
  return lambda i, o: Fp8WeightLinear(i, o, dtype=dtype, rngs=rngs)


def _norm(config: Config, dim: int, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(dim, epsilon=config.norm_eps, dtype=config.compute_dtype,
                     param_dtype=config.weight_dtype, rngs=rngs)


# --- load probe -----------------------------------------------------------------------------------


@jax.custom_vjp
def load_probe(y: jax.Array, bias: jax.Array, counts: jax.Array) -> jax.Array:
  """Identity on ``y`` whose backward gives ``bias`` the gradient ``counts``.

  Args:
    y: the MoE layer's output (any shape); the cotangent passes through.
    bias: ``[E]`` float32 routing bias (the ``gate_bias`` leaf).
    counts: ``[E]`` tokens per expert of this forward (any number type).

  Returns:
    ``y``. Backward: ``(dy, counts as bias.dtype, 0)``, whatever ``dy`` is, so
    the bias "gradient" is the forward's load, summed by every reduction the
    caller applies to gradients. ``y`` must reach the loss (the output of an
    MoE block always does), so its cotangent is never a symbolic zero that
    would prune this backward.
  """
  del bias, counts
  return y


def _probe_fwd(y, bias, counts):
  return y, (counts.astype(bias.dtype), counts)


def _probe_bwd(res, g):
  counts_f, counts = res
  zero = (np.zeros(counts.shape, jax.dtypes.float0)
          if not jnp.issubdtype(counts.dtype, jnp.inexact) else jnp.zeros_like(counts))
  return g, counts_f, zero


load_probe.defvjp(_probe_fwd, _probe_bwd)


def _swiglu(gate: jax.Array, up: jax.Array) -> jax.Array:
  return (jax.nn.silu(gate.astype(jnp.float32)) * up.astype(jnp.float32)).astype(gate.dtype)


# --- blocks ---------------------------------------------------------------------------------------


class MLP(nnx.Module):
  """SwiGLU MLP: ``down_proj(silu(gate_proj(x)) * up_proj(x))``."""

  def __init__(self, dim: int, inter_dim: int, linear: Callable[[int, int], nnx.Module]):
    self.gate_proj = linear(dim, inter_dim)
    self.up_proj = linear(dim, inter_dim)
    self.down_proj = linear(inter_dim, dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(_swiglu(self.gate_proj(x), self.up_proj(x)))


class Block(nnx.Module):
  """One transformer layer: MLA attention, then a dense MLP or the MoE.

  Args:
    config: model sizes.
    moe: MoE layer (True) or dense SwiGLU MLP (False).
    rngs: parameter initialization.
    mesh, ep_axis, moe_mode: passed to ``jaxinfra.moe.MoE``: expert
      parallelism through the layer's own ``shard_map`` (mesh and ep_axis),
      inside an enclosing ``shard_map`` (ep_axis only), or local (neither);
      ``moe_mode="low_latency"`` for decode.
  """

  def __init__(self, config: Config, *, moe: bool, rngs: nnx.Rngs, mesh=None, ep_axis=None,
               moe_mode: str = "normal"):
    c = config
    linear = linear_factory(c, rngs)
    self.is_moe = moe
    self.attn_norm = _norm(c, c.dim, rngs)
    self.attn = mla_attention.MultiHeadLatentAttention(
        c.mla, rngs=rngs, dtype=c.compute_dtype, param_dtype=c.weight_dtype, projection=linear)
    self.ffn_norm = _norm(c, c.dim, rngs)
    if moe:
      self.ffn = moe_lib.MoE(
          c.dim, c.moe_inter_dim, c.n_routed_experts, top_k=c.n_activated_experts,
          n_groups=c.n_expert_groups, topk_groups=c.n_limited_groups,
          routed_scaling_factor=c.route_scale, score_func=c.score_func,
          num_shared_experts=c.n_shared_experts, mesh=mesh, ep_axis=ep_axis, mode=moe_mode,
          fp8=c.fp8_dispatch, capacity_factor=c.capacity_factor, dtype=c.compute_dtype,
          param_dtype=c.weight_dtype, rngs=rngs)
    else:
      self.ffn = MLP(c.dim, c.inter_dim, linear)

  def ffn_forward(self, x: jax.Array) -> tuple[jax.Array, moe_lib.MoEStats | None]:
    """``x [b, s, D]`` (already normed) -> ``(ffn(x), stats or None)``.

    The MoE output goes through :func:`load_probe` with the tokens per expert
    that this call's gradient reductions should sum to the step's load: the
    layer's counts, or, inside an enclosing ``shard_map`` over the EP axis
    (``ep_axis`` without a mesh, where the counts are already summed over the
    EP ranks and the batch is split over them), the counts divided by the EP
    size, so the sum over the EP ranks is the count once (exact for powers
    of two; :meth:`Parts.loads` rounds).
    """
    if not self.is_moe:
      return self.ffn(x), None
    flat = x.reshape(-1, x.shape[-1])
    y, stats = self.ffn(flat)
    mesh = self.ffn.mesh
    if mesh is not None and all(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
      # The layer returns the tokens split over EP: back to the input's layout.
      want = jax.typeof(flat).sharding
      if not want.mesh.axis_names:
        want = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      y = jax.reshard(y, want)
    counts = stats.tokens_per_expert
    if self.ffn.ep_axis is not None and self.ffn.mesh is None:
      ranks = np.prod([lax.axis_size(a) for a in ((self.ffn.ep_axis,) if isinstance(
          self.ffn.ep_axis, str) else self.ffn.ep_axis)])
      counts = counts.astype(jnp.float32) / np.float32(ranks)
    y = load_probe(y, self.ffn.gate_bias[...], counts)
    return y.reshape(x.shape), stats

  def __call__(self, x: jax.Array, positions: jax.Array, *, segment_ids=None
               ) -> tuple[jax.Array, moe_lib.MoEStats | None]:
    """``x [b, s, D]``, ``positions [b, s]`` -> ``(x [b, s, D], stats or None)``."""
    x = x + self.attn(self.attn_norm(x), positions, segment_ids=segment_ids).astype(x.dtype)
    y, stats = self.ffn_forward(self.ffn_norm(x))
    return x + y.astype(x.dtype), stats

  def prefill(self, x, positions, cache, seq_ids, lengths):
    """Training form that also writes the layer's latents into ``cache``."""
    a, cache, ok = self.attn(self.attn_norm(x), positions, cache=cache, seq_ids=seq_ids,
                             lengths=lengths)
    x = x + a.astype(x.dtype)
    y, stats = self.ffn_forward(self.ffn_norm(x))
    return x + y.astype(x.dtype), stats, cache, ok

  def decode(self, x, cache, seq_ids):
    """Absorbed-form attention over the paged cache (appends ``x``'s tokens)."""
    a, cache, ok = self.attn.decode(self.attn_norm(x), cache, seq_ids)
    x = x + a.astype(x.dtype)
    y, stats = self.ffn_forward(self.ffn_norm(x))
    return x + y.astype(x.dtype), stats, cache, ok


def stacked_blocks(config: Config, count: int, rngs: nnx.Rngs, **block_kwargs) -> Block:
  """``count`` MoE blocks as one :class:`Block` whose leaves are ``[count, ...]``."""

  @nnx.split_rngs(splits=count)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return Block(config, moe=True, rngs=rngs, **block_kwargs)

  return make(rngs)


def scan_blocks(stacked: Block, x: Any, fn: Callable, xs: Any = None, *, remat: bool = False):
  """``lax.scan`` of ``fn(block, carry, x_l) -> (carry, y_l)`` over a stacked block's layers.

  Returns ``(carry, ys)`` with ``ys`` stacked over layers (like ``lax.scan``).
  """
  graphdef, state = nnx.split(stacked)

  def body(carry, layer):
    layer_state, x_l = layer
    return fn(nnx.merge(graphdef, layer_state), carry, x_l)

  if remat:
    body = jax.checkpoint(body)
  return lax.scan(body, x, (state, xs))


class MTP(nnx.Module):
  """DeepSeek-V3's multi-token-prediction module (one depth).

  ``h' = eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)])``, one MoE
  :class:`Block`, then ``norm``; the caller applies the shared output head.
  """

  def __init__(self, config: Config, *, rngs: nnx.Rngs, **block_kwargs):
    c = config
    self.enorm = _norm(c, c.dim, rngs)
    self.hnorm = _norm(c, c.dim, rngs)
    self.eh_proj = linear_factory(c, rngs)(2 * c.dim, c.dim)
    self.block = Block(c, moe=True, rngs=rngs, **block_kwargs)
    self.norm = _norm(c, c.dim, rngs)

  def __call__(self, h: jax.Array, next_emb: jax.Array, positions: jax.Array
               ) -> tuple[jax.Array, moe_lib.MoEStats]:
    """``h, next_emb [b, s, D]``, ``positions [b, s]`` -> ``(normed [b, s, D], stats)``."""
    x = self.eh_proj(jnp.concatenate([self.enorm(next_emb), self.hnorm(h)], axis=-1))
    x, stats = self.block(x.astype(h.dtype), positions)
    return self.norm(x), stats


class ModelOutput(NamedTuple):
  """What :class:`DeepSeekV3` returns.

  Attributes:
    logits: ``[B, S, V]`` float32, position ``i`` predicts token ``i + 1``.
    mtp_logits: ``[B, S, V]`` float32 (``None`` without MTP): position ``i``
      predicts token ``i + 2`` from ``h_i`` and the embedding of
      ``next_tokens[:, i]``.
    stats: ``MoEStats`` of the MoE layers, leaves ``[n_moe_layers, ...]``.
    mtp_stats: ``MoEStats`` of the MTP layer, leaves ``[1, ...]`` (or None).
  """
  logits: jax.Array
  mtp_logits: jax.Array | None
  stats: moe_lib.MoEStats
  mtp_stats: moe_lib.MoEStats | None


class DeepSeekV3(nnx.Module):
  """DeepSeek-V3 (see the module docstring).

  Args:
    config: a :class:`Config` (``CONFIGS["tiny" | "small" | "671b"]``).
    rngs: parameter initialization.
    mesh, ep_axis, moe_mode: expert parallelism of every MoE layer through
      its own ``shard_map`` (None: local experts). For the pipeline build the
      model without a mesh: the executor's ``shard_map`` provides EP.

  Variables: ``nnx.Param`` (trained) and ``jaxinfra.moe.RouterBias`` (the
  ``gate_bias`` leaves, updated by :meth:`update_bias`).
  """

  def __init__(self, config: Config, *, rngs: nnx.Rngs, mesh=None, ep_axis=None,
               moe_mode: str = "normal"):
    c = config
    if c.n_mtp_layers > 1:
      raise ValueError(f"DeepSeekV3: n_mtp_layers={c.n_mtp_layers}; only 0 or 1 MTP module is "
                       f"implemented (DeepSeek-V3 uses 1)")
    self.config = c
    kw = dict(mesh=mesh, ep_axis=ep_axis, moe_mode=moe_mode)
    self.embed = nnx.Embed(c.vocab_size, c.dim, dtype=c.compute_dtype,
                           param_dtype=c.weight_dtype, rngs=rngs)
    self.dense_layers = nnx.List([Block(c, moe=False, rngs=rngs)
                                  for _ in range(c.n_dense_layers)])
    self.moe_layers = stacked_blocks(c, c.n_moe_layers, rngs, **kw) if c.n_moe_layers else None
    self.norm = _norm(c, c.dim, rngs)
    self.head = nnx.Linear(c.dim, c.vocab_size, use_bias=False, dtype=c.compute_dtype,
                           param_dtype=c.weight_dtype, rngs=rngs)
    self.mtp = MTP(c, rngs=rngs, **kw) if c.n_mtp_layers else None

  # -- pieces (also used by the pipeline and decode) -------------------------------------------

  def check_tokens(self, op: str, tokens: jax.Array) -> jax.Array:
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"DeepSeekV3.{op}: tokens must be an integer [B, S] array, got "
                       f"{tokens.dtype} with shape {tokens.shape}")
    return tokens

  def logits(self, h: jax.Array) -> jax.Array:
    """Final norm and output head: ``h [..., D]`` -> float32 ``[..., V]``."""
    return self.head(self.norm(h)).astype(jnp.float32)

  def mtp_logits(self, h: jax.Array, next_tokens: jax.Array, positions: jax.Array
                 ) -> tuple[jax.Array, moe_lib.MoEStats]:
    """MTP: ``h [B, S, D]`` (pre-norm hidden), ``next_tokens [B, S]`` -> float32 logits."""
    out, stats = self.mtp(h, self.embed(next_tokens).astype(h.dtype), positions)
    return self.head(out).astype(jnp.float32), jax.tree_util.tree_map(lambda a: a[None], stats)

  def hidden(self, tokens: jax.Array, *, segment_ids=None
             ) -> tuple[jax.Array, moe_lib.MoEStats]:
    """Embedding and all layers: ``tokens [B, S]`` -> ``(h [B, S, D], stacked stats)``."""
    tokens = self.check_tokens("hidden", tokens)
    positions = default_positions(tokens)
    x = self.embed(tokens)
    for block in self.dense_layers:
      x, _ = block(x, positions, segment_ids=segment_ids)
    return self.run_moe_layers(x, positions, segment_ids=segment_ids)

  def run_moe_layers(self, x, positions, *, segment_ids=None):
    """The stacked MoE layers over ``x [B, S, D]`` -> ``(x, stats [n_moe, ...])``."""
    def layer(block, x, _):
      return block(x, positions, segment_ids=segment_ids)
    return scan_blocks(self.moe_layers, x, layer, remat=self.config.remat)

  def __call__(self, tokens: jax.Array, next_tokens: jax.Array | None = None, *,
               segment_ids: jax.Array | None = None) -> ModelOutput:
    """Logits of every position, MTP logits and the MoE layers' statistics.

    Args:
      tokens: int32 ``[B, S]``.
      next_tokens: int32 ``[B, S]``, the token after each position (the
        targets); default ``tokens`` shifted left by one, the last position
        getting token 0 (its MTP logits are then meaningless; the loss never
        uses them).
      segment_ids: optional int32 ``[B, S]`` for packed documents (attention
        stays within a segment).

    Returns:
      :class:`ModelOutput`.
    """
    tokens = self.check_tokens("__call__", tokens)
    h, stats = self.hidden(tokens, segment_ids=segment_ids)
    logits = self.logits(h)
    if self.mtp is None:
      return ModelOutput(logits, None, stats, None)
    if next_tokens is None:
      next_tokens = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], axis=1)
    mtp, mtp_stats = self.mtp_logits(h, next_tokens, default_positions(tokens))
    return ModelOutput(logits, mtp, stats, mtp_stats)

  def update_bias(self, stats: moe_lib.MoEStats, mtp_stats: moe_lib.MoEStats | None = None,
                  rate: float | None = None) -> None:
    """Aux-loss-free bias step of every MoE layer from its ``tokens_per_expert``.

    Args:
      stats: leaves ``[n_moe_layers, ...]`` (from :class:`ModelOutput` or the
        pipeline's loads); ``mtp_stats``: ``[1, ...]`` or None.
      rate: default ``config.bias_update_rate``.
    """
    rate = self.config.bias_update_rate if rate is None else rate
    step = jax.vmap(functools.partial(routing.update_bias, rate=rate))
    moe = self.moe_layers.ffn
    moe.gate_bias[...] = step(moe.gate_bias[...], stats.tokens_per_expert)
    if self.mtp is not None and mtp_stats is not None:
      b = self.mtp.block.ffn.gate_bias
      b[...] = step(b[...][None], mtp_stats.tokens_per_expert)[0]


def default_positions(tokens: jax.Array) -> jax.Array:
  """``0..S-1`` for every row of ``tokens [B, S]``: int32 ``[B, S]``."""
  b, s = tokens.shape
  return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None
                  ) -> jax.Array:
  """Mean token cross-entropy: ``logits [..., V]`` float, ``targets [...]`` int,
  optional ``mask [...]`` (weights; the mean is over its sum). float32 scalar."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  if mask is None:
    return jnp.mean(nll)
  mask = mask.astype(jnp.float32)
  return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class LossAux(NamedTuple):
  """Side outputs of :func:`loss`: the two cross-entropies and the MoE stats."""
  ce: jax.Array
  mtp_ce: jax.Array
  stats: moe_lib.MoEStats
  mtp_stats: moe_lib.MoEStats | None


def heads_loss(config: Config, logits: jax.Array, mtp_logits: jax.Array | None,
               targets: jax.Array, mask: jax.Array | None) -> tuple[jax.Array, jax.Array,
                                                                      jax.Array]:
  """``(total, ce, mtp_ce)``: next-token CE + ``mtp_loss_weight`` x MTP CE.

  MTP position ``i`` predicts ``targets[:, i + 1]`` (the last position has no
  MTP target).
  """
  ce = cross_entropy(logits, targets, mask)
  if mtp_logits is None:
    return ce, ce, jnp.zeros((), jnp.float32)
  mtp_mask = None if mask is None else mask[:, 1:]
  mtp_ce = cross_entropy(mtp_logits[:, :-1], targets[:, 1:], mtp_mask)
  return ce + np.float32(config.mtp_loss_weight) * mtp_ce, ce, mtp_ce


def loss(model: DeepSeekV3, tokens: jax.Array, targets: jax.Array,
         mask: jax.Array | None = None) -> tuple[jax.Array, LossAux]:
  """Training loss: ``CE(logits, targets) + mtp_loss_weight * CE(mtp_logits, targets[:, 1:])``.

  Args:
    model: the model.
    tokens: int32 ``[B, S]`` inputs.
    targets: int32 ``[B, S]``, the next token of each position (MTP reads
      their embeddings: position ``i`` sees ``targets[:, i]`` and predicts
      ``targets[:, i + 1]``).
    mask: optional ``[B, S]`` weights (0 for padding).

  Returns:
    ``(loss float32 scalar, LossAux)``.
  """
  targets = model.check_tokens("loss", targets)
  if targets.shape != tokens.shape:
    raise ValueError(f"loss: targets shape {targets.shape} must equal tokens shape "
                     f"{tokens.shape}")
  out = model(tokens, targets)
  total, ce, mtp_ce = heads_loss(model.config, out.logits, out.mtp_logits, targets, mask)
  return total, LossAux(ce, mtp_ce, out.stats, out.mtp_stats)


def build(config: Config | str, *, seed: int = 0, **kwargs) -> DeepSeekV3:
  """``DeepSeekV3(config, rngs=nnx.Rngs(seed), **kwargs)``; ``config`` may be a name."""
  if isinstance(config, str):
    config = config_lib.get_config(config)
  return DeepSeekV3(config, rngs=nnx.Rngs(seed), **kwargs)


__all__ = ["Block", "DeepSeekV3", "Fp8WeightLinear", "LossAux", "MLP", "MTP", "ModelOutput",
           "build", "cross_entropy", "default_positions", "heads_loss", "linear_factory",
           "load_probe", "loss", "scan_blocks", "stacked_blocks"]


class ParamCount(NamedTuple):
  """Parameter counts of a config (``nnx.Param`` leaves; the routing biases excluded).

  Attributes:
    main: the main model (embedding, layers, final norm, output head).
    mtp: the MTP module's own parameters (it shares embedding and head).
    mtp_checkpoint: the MTP module as DeepSeek's checkpoint stores it, with
      its copies of the embedding and the output head (layer ``n_layers``).
    activated: main-model parameters one token uses (all but the routed
      experts it is not sent to).
  """
  main: int
  mtp: int
  mtp_checkpoint: int
  activated: int

  @property
  def total_checkpoint(self) -> int:
    """``main + mtp_checkpoint``: the size of the Hugging Face checkpoint."""
    return self.main + self.mtp_checkpoint


def abstract_model(config: Config) -> DeepSeekV3:
  """The model with ``jax.ShapeDtypeStruct`` leaves (``nnx.eval_shape``): no memory."""
  return nnx.eval_shape(lambda: DeepSeekV3(config, rngs=nnx.Rngs(0)))


def param_count(config: Config) -> ParamCount:
  """Counts the parameters of ``config`` from the abstract model (:func:`abstract_model`)."""
  model = abstract_model(config)
  size = lambda tree: sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))
  params = lambda module: nnx.state(module, nnx.Param) if module is not None else {}
  mtp = size(params(model.mtp))
  main = size(params(model)) - mtp
  shared = size(params(model.embed)) + size(params(model.head))
  per_expert = 3 * config.dim * config.moe_inter_dim
  idle = config.n_moe_layers * (config.n_routed_experts - config.n_activated_experts) * per_expert
  return ParamCount(main, mtp, mtp + shared, main - idle)
