"""DeepSeek-V3 routing: group-limited top-k on bias-adjusted scores.

``route`` follows DeepSeek-V3's gate (the inference code's ``Gate.forward``):

1. ``scores = sigmoid(logits)`` (or softmax) in float32 (float64 for float64
   logits).
2. Selection uses ``scores + bias`` (the aux-loss-free balancing bias).
3. Experts form ``n_groups`` contiguous groups; a group's score is the sum of
   its two largest biased scores; the ``topk_groups`` best groups stay
   eligible, the others are masked out.
4. ``top_k`` experts are chosen among the eligible ones by biased score.
5. Weights are the *unbiased* scores of the chosen experts, normalized to sum
   to one, then multiplied by ``routed_scaling_factor``.

Ties are broken towards the lower index (``jax.lax.top_k``), so routing is
deterministic. ``update_bias`` is the aux-loss-free bias update and
``sequence_aux_loss`` the complementary sequence-wise balance loss
(DeepSeek-V3 report, eqs. 16-20).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfra.moe import _validate

SCORE_FUNCS = ("sigmoid", "softmax")


def _scores(op: str, logits: jax.Array, score_func: str) -> jax.Array:
  if score_func not in SCORE_FUNCS:
    raise ValueError(f"{op}: score_func must be one of {SCORE_FUNCS}, got {score_func!r}")
  logits = logits.astype(_validate.accum_dtype(logits.dtype))
  return jax.nn.sigmoid(logits) if score_func == "sigmoid" else jax.nn.softmax(logits, axis=-1)


def route(scores_logits: jax.Array, *, bias: jax.Array | None = None, top_k: int = 8,
          n_groups: int = 8, topk_groups: int = 4, routed_scaling_factor: float = 2.5,
          score_func: str = "sigmoid") -> tuple[jax.Array, jax.Array]:
  """DeepSeek-V3's group-limited expert selection.

  Args:
    scores_logits: ``[N, E]`` router logits (any float dtype; computed in float32,
      or float64 for float64 logits).
    bias: ``[E]`` expert bias for selection only (None: zeros).
    top_k: experts per token ``K``.
    n_groups: expert groups (``E % n_groups == 0``); 1 disables group limiting.
    topk_groups: groups kept per token.
    routed_scaling_factor: multiplies the normalized weights.
    score_func: ``"sigmoid"`` (DeepSeek-V3) or ``"softmax"``.

  Returns:
    ``(topk_idx [N, K] int32, topk_weights [N, K] float32)`` (float64 weights
    for float64 logits): expert ids in
    descending biased score, and their weights (each row sums to
    ``routed_scaling_factor``). Differentiable in ``scores_logits`` through
    the weights.
  """
  op = "route"
  logits = _validate.array(op, "scores_logits", scores_logits, ndim=2, dims="[N, E]",
                           kind="float")
  n, e = logits.shape
  top_k = _validate.positive_int(op, "top_k", top_k)
  n_groups = _validate.positive_int(op, "n_groups", n_groups)
  topk_groups = _validate.positive_int(op, "topk_groups", topk_groups)
  if e % n_groups:
    raise ValueError(f"{op}: the number of experts {e} (scores_logits shape {logits.shape}) must "
                     f"be divisible by n_groups={n_groups}")
  group_size = e // n_groups
  if topk_groups > n_groups:
    raise ValueError(f"{op}: topk_groups={topk_groups} exceeds n_groups={n_groups}")
  if top_k > topk_groups * group_size:
    raise ValueError(f"{op}: top_k={top_k} exceeds the {topk_groups * group_size} experts in "
                     f"topk_groups={topk_groups} groups of {group_size}")
  if n_groups > 1 and group_size < 2:
    raise ValueError(f"{op}: groups need at least 2 experts (the group score sums the top 2), "
                     f"got {e} experts in {n_groups} groups")
  scores = _scores(op, logits, score_func)
  if bias is None:
    biased = scores
  else:
    bias = _validate.array(op, "bias", bias, ndim=1, dims="[E]", kind="float")
    if bias.shape != (e,):
      raise ValueError(f"{op}: bias must have shape ({e},), got {bias.shape}")
    biased = scores + bias.astype(scores.dtype)
  selection = jax.lax.stop_gradient(biased)
  if n_groups > 1:
    grouped = selection.reshape(n, n_groups, group_size)
    group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)
    _, top_groups = jax.lax.top_k(group_scores, topk_groups)
    keep = jnp.zeros((n, n_groups), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
    selection = jnp.where(keep[:, :, None], grouped, -jnp.inf).reshape(n, e)
  _, topk_idx = jax.lax.top_k(selection, top_k)
  weights = jnp.take_along_axis(scores, topk_idx, axis=1)
  weights = weights / (jnp.sum(weights, axis=1, keepdims=True) + scores.dtype.type(1e-20))
  return topk_idx.astype(jnp.int32), weights * scores.dtype.type(routed_scaling_factor)


def update_bias(bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
  """Aux-loss-free balancing: ``bias - rate * sign(load - mean load)``.

  Overloaded experts (more tokens than the mean) get their bias lowered by
  ``rate``, underloaded ones raised; balanced ones keep theirs.

  Args:
    bias: ``[E]`` float.
    tokens_per_expert: ``[E]`` token counts over the step (e.g. summed over the
      data-parallel group).
    rate: the bias update speed (DeepSeek-V3: 0.001).

  Returns:
    ``[E]`` float32, the new bias.
  """
  op = "update_bias"
  bias = _validate.array(op, "bias", bias, ndim=1, dims="[E]", kind="float")
  load = _validate.array(op, "tokens_per_expert", tokens_per_expert, ndim=1, dims="[E]")
  _validate.same_shape(op, ("bias", "tokens_per_expert"), bias, load)
  load = load.astype(jnp.float32)
  return bias.astype(jnp.float32) - np.float32(rate) * jnp.sign(load - jnp.mean(load))


def sequence_aux_loss(scores_logits: jax.Array, topk_idx: jax.Array, *, alpha: float,
                      score_func: str = "sigmoid") -> jax.Array:
  """DeepSeek-V3's sequence-wise balance loss, averaged over sequences.

  ``L = alpha * sum_i f_i * P_i`` per sequence, with
  ``f_i = E / (K * T) * #{t : expert i in topk_t}`` and
  ``P_i = mean_t s'_{i,t}``, ``s'`` the scores normalized over all experts.

  Args:
    scores_logits: ``[B, T, E]`` router logits.
    topk_idx: ``[B, T, K]`` the selected experts (ids outside ``[0, E)`` are
      ignored).
    alpha: the loss weight (DeepSeek-V3: 0.0001).
    score_func: as in :func:`route`.

  Returns:
    float32 scalar, differentiable in ``scores_logits``.
  """
  op = "sequence_aux_loss"
  logits = _validate.array(op, "scores_logits", scores_logits, ndim=3, dims="[B, T, E]",
                           kind="float")
  topk_idx = _validate.array(op, "topk_idx", topk_idx, ndim=3, dims="[B, T, K]", kind="int")
  if topk_idx.shape[:2] != logits.shape[:2]:
    raise ValueError(f"{op}: topk_idx shape {topk_idx.shape} does not match scores_logits shape "
                     f"{logits.shape} in [B, T]")
  b, t, e = logits.shape
  k = topk_idx.shape[2]
  scores = _scores(op, logits, score_func)
  normalized = scores / jnp.sum(scores, axis=-1, keepdims=True)
  p = jnp.mean(normalized, axis=1)  # [B, E]
  valid = (topk_idx >= 0) & (topk_idx < e)
  counts = jnp.zeros((b, e + 1), jnp.float32).at[
      jnp.arange(b)[:, None, None], jnp.where(valid, topk_idx, e)].add(1.0)[:, :e]
  f = counts * (e / (k * t))
  return np.float32(alpha) * jnp.mean(jnp.sum(f * p, axis=-1))
