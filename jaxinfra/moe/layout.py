"""Dispatch layout: where each token goes (DeepEP's ``get_dispatch_layout``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxinfra.moe import _validate


def check_topk_idx(op: str, topk_idx) -> jax.Array:
  return _validate.array(op, "topk_idx", topk_idx, ndim=2, dims="[N, K]", kind="int")


def check_routing(op: str, topk_idx, topk_weights) -> tuple[jax.Array, jax.Array]:
  """``topk_idx [N, K]`` integer and ``topk_weights [N, K]`` float of the same shape."""
  topk_idx = check_topk_idx(op, topk_idx)
  topk_weights = _validate.array(op, "topk_weights", topk_weights, ndim=2, dims="[N, K]",
                                 kind="float")
  _validate.same_shape(op, ("topk_idx", "topk_weights"), topk_idx, topk_weights)
  return topk_idx, topk_weights


def experts_per_rank(op: str, num_experts: int, num_ranks: int) -> int:
  num_experts = _validate.positive_int(op, "num_experts", num_experts)
  num_ranks = _validate.positive_int(op, "num_ranks", num_ranks)
  if num_experts % num_ranks:
    raise ValueError(f"{op}: num_experts={num_experts} must be divisible by the number of EP "
                     f"ranks {num_ranks}")
  return num_experts // num_ranks


def valid_ids(topk_idx: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
  """``(ids, num_invalid)``: ids outside ``[-1, E)`` become -1 and are counted."""
  ok = (topk_idx >= 0) & (topk_idx < num_experts)
  num_invalid = jnp.sum(~ok & (topk_idx != -1), dtype=jnp.int32)
  return jnp.where(ok, topk_idx, -1).astype(jnp.int32), num_invalid


def token_in_rank(ids: jax.Array, experts_per: int, num_ranks: int) -> jax.Array:
  """``[N, R]`` bool: whether any of a token's (valid) experts lives on rank r."""
  rank = jnp.where(ids >= 0, ids // experts_per, -1)
  return jnp.any(rank[:, :, None] == jnp.arange(num_ranks, dtype=jnp.int32), axis=1)


def dispatch_layout(topk_idx: jax.Array, num_experts: int,
                    num_ranks: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Counts tokens per rank and per expert; a token counts once per rank.

  Rank ``r`` hosts experts ``[r * E/R, (r+1) * E/R)``.

  Args:
    topk_idx: ``[N, K]`` integer expert ids, -1 for "no expert". Ids outside
      ``[-1, E)`` are treated as -1 (``dispatch`` counts them).
    num_experts: ``E``, divisible by ``num_ranks``.
    num_ranks: ``R``, the EP size.

  Returns:
    ``(num_tokens_per_rank [R] int32, num_tokens_per_expert [E] int32,
    is_token_in_rank [N, R] bool)``.
  """
  op = "dispatch_layout"
  topk_idx = check_topk_idx(op, topk_idx)
  per = experts_per_rank(op, num_experts, num_ranks)
  ids, _ = valid_ids(topk_idx, num_experts)
  in_rank = token_in_rank(ids, per, num_ranks)
  per_expert = jnp.bincount(jnp.where(ids >= 0, ids, num_experts).reshape(-1),
                            length=num_experts + 1)[:num_experts]
  return (jnp.sum(in_rank, axis=0, dtype=jnp.int32), per_expert.astype(jnp.int32), in_rank)
