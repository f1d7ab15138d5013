"""jaxinfra.moe routing: DeepSeek-V3 group-limited top-k, bias update, aux loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfra import moe


def ref_route(logits, bias, top_k, n_groups, topk_groups, scale, score_func="sigmoid"):
  """float64 NumPy transcription of DeepSeek-V3's Gate.forward."""
  logits = np.asarray(logits, np.float64)
  if score_func == "sigmoid":
    scores = 1 / (1 + np.exp(-logits))
  else:
    z = np.exp(logits - logits.max(1, keepdims=True))
    scores = z / z.sum(1, keepdims=True)
  n, e = scores.shape
  biased = scores + bias
  idx = np.zeros((n, top_k), np.int64)
  weights = np.zeros((n, top_k))
  for t in range(n):
    groups = biased[t].reshape(n_groups, -1)
    group_score = np.sort(groups, axis=1)[:, -2:].sum(1)
    keep = np.argsort(-group_score, kind="stable")[:topk_groups]
    masked = np.full(e, -np.inf)
    for g in keep:
      masked[g * (e // n_groups):(g + 1) * (e // n_groups)] = groups[g]
    chosen = np.argsort(-masked, kind="stable")[:top_k]
    w = scores[t, chosen]
    idx[t], weights[t] = chosen, w / w.sum() * scale
  return idx, weights


@pytest.mark.parametrize("e, top_k, n_groups, topk_groups", [(64, 8, 8, 4), (256, 8, 8, 4),
                                                             (32, 4, 4, 2), (16, 3, 1, 1)])
def test_route_matches_deepseek_reference(e, top_k, n_groups, topk_groups):
  rng = np.random.default_rng(e + top_k)
  logits = rng.standard_normal((96, e)).astype(np.float32)
  bias = (rng.standard_normal(e) * 0.3).astype(np.float32)
  idx, weights = jax.jit(lambda l, b: moe.route(
      l, bias=b, top_k=top_k, n_groups=n_groups, topk_groups=topk_groups,
      routed_scaling_factor=2.5))(logits, bias)
  want_idx, want_w = ref_route(logits, bias.astype(np.float64), top_k, n_groups, topk_groups, 2.5)
  assert idx.dtype == jnp.int32 and weights.dtype == jnp.float32
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(weights, want_w, rtol=2e-6)
  np.testing.assert_allclose(np.asarray(weights).sum(1), 2.5, rtol=1e-6)
  # Group limiting: every token's experts come from at most topk_groups groups.
  groups = np.asarray(idx) // (e // n_groups)
  assert max(len(set(row)) for row in groups) <= topk_groups


def test_route_softmax_and_bias_only_affects_selection():
  rng = np.random.default_rng(1)
  logits = rng.standard_normal((40, 32)).astype(np.float32)
  bias = np.zeros(32, np.float32)
  bias[5] = 10.0  # expert 5 always selected, but its weight comes from the unbiased score
  idx, weights = jax.jit(lambda l, b: moe.route(
      l, bias=b, top_k=4, n_groups=4, topk_groups=2, routed_scaling_factor=1.0,
      score_func="softmax"))(logits, bias)
  want_idx, want_w = ref_route(logits, bias, 4, 4, 2, 1.0, "softmax")
  np.testing.assert_array_equal(idx, want_idx)
  np.testing.assert_allclose(weights, want_w, rtol=2e-6)
  assert (np.asarray(idx)[:, 0] == 5).all()


def test_route_ties_break_to_lower_index_and_is_deterministic():
  logits = np.zeros((3, 16), np.float32)
  idx, weights = jax.jit(lambda l: moe.route(l, top_k=4, n_groups=4, topk_groups=2,
                                             routed_scaling_factor=1.0))(logits)
  np.testing.assert_array_equal(idx, np.tile([0, 1, 2, 3], (3, 1)))
  np.testing.assert_allclose(weights, 0.25)


def test_route_gradient_flows_through_weights():
  rng = np.random.default_rng(2)
  logits = rng.standard_normal((8, 16)).astype(np.float32)
  probe = rng.standard_normal((8, 4)).astype(np.float32)

  @jax.jit
  def f(l):
    return jnp.sum(moe.route(l, top_k=4, n_groups=4, topk_groups=2)[1] * probe)

  grad = jax.jit(jax.grad(f))(logits)
  eps = 1e-3
  direction = rng.standard_normal(logits.shape).astype(np.float32)
  numeric = (f(logits + eps * direction) - f(logits - eps * direction)) / (2 * eps)
  np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=2e-2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_groups=5), r"64 .*divisible by n_groups=5"),
    (dict(topk_groups=9), "topk_groups=9 exceeds n_groups=8"),
    (dict(top_k=20, topk_groups=2), "top_k=20 exceeds the 16 experts"),
    (dict(score_func="relu"), "score_func must be one of"),
    (dict(bias=np.zeros(63, np.float32)), r"bias must have shape \(64,\)"),
    (dict(top_k=0), "top_k must be a positive int"),
])
def test_route_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    moe.route(np.zeros((4, 64), np.float32), **kwargs)
  with pytest.raises(ValueError, match=r"scores_logits must have shape \[N, E\]"):
    moe.route(np.zeros((64,), np.float32))


def test_update_bias_moves_towards_balance():
  bias = np.array([0.0, 0.5, -0.5, 0.0], np.float32)
  load = np.array([10, 2, 4, 4])  # mean 5
  new = moe.update_bias(bias, load, 0.01)
  np.testing.assert_allclose(new, [-0.01, 0.51, -0.49, 0.01], rtol=1e-6)
  np.testing.assert_array_equal(moe.update_bias(bias, np.full(4, 3), 0.01), bias)
  with pytest.raises(ValueError, match="tokens_per_expert must have bias's shape"):
    moe.update_bias(bias, np.ones(5), 0.01)


def test_sequence_aux_loss_matches_formula():
  rng = np.random.default_rng(3)
  b, t, e, k = 2, 12, 16, 4
  logits = rng.standard_normal((b, t, e)).astype(np.float32)
  idx = jax.jit(jax.vmap(lambda l: moe.route(l, top_k=k, n_groups=4, topk_groups=2)[0]))(logits)
  idx = np.asarray(idx)
  loss = jax.jit(lambda l, i: moe.sequence_aux_loss(l, i, alpha=0.01))(logits, idx)
  s = 1 / (1 + np.exp(-logits.astype(np.float64)))
  want = 0.0
  for i in range(b):
    f = np.array([e / (k * t) * np.sum(idx[i] == j) for j in range(e)])
    p = (s[i] / s[i].sum(-1, keepdims=True)).mean(0)
    want += 0.01 * np.sum(f * p) / b
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  # Perfectly balanced routing with uniform scores gives alpha.
  uniform = np.zeros((1, 4, 4), np.float32)
  balanced = np.array([[[0], [1], [2], [3]]])
  np.testing.assert_allclose(moe.sequence_aux_loss(uniform, balanced, alpha=0.5), 0.5, rtol=1e-6)
  grad = jax.jit(jax.grad(lambda l: moe.sequence_aux_loss(l, idx, alpha=1.0)))(logits)
  assert grad.shape == logits.shape and np.isfinite(grad).all() and np.abs(grad).max() > 0
