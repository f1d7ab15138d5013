"""The pipeline executor with real MoE stages (``jaxinfra.moe.MoE`` layers, expert
parallel over "ep") on a (pp=2, ep=4) mesh, against an unpipelined, unsharded
float64 reference MoE written here (dense over experts)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxinfra import moe
from jaxinfra import pipeline as pl
from jaxinfra.testing.numerics import calc_diff

EP, HIDDEN, INTER, EXPERTS, TOP_K, GROUPS, TOPK_GROUPS = 4, 32, 16, 16, 4, 4, 2
SCALE = 2.5


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _layer():
  return moe.MoE(HIDDEN, INTER, EXPERTS, top_k=TOP_K, n_groups=GROUPS, topk_groups=TOPK_GROUPS,
                 routed_scaling_factor=SCALE, num_shared_experts=1, ep_axis="ep",
                 dtype=jnp.float64, param_dtype=jnp.float64, rngs=nnx.Rngs(0))


def _stacked_params(num_stages):
  """``{name: [stages, ...]}``, every stage its own weights and a nonzero selection bias."""
  stages = []
  for s in range(num_stages):
    layer = moe.MoE(HIDDEN, INTER, EXPERTS, top_k=TOP_K, n_groups=GROUPS,
                    topk_groups=TOPK_GROUPS, num_shared_experts=1, dtype=jnp.float64,
                    param_dtype=jnp.float64, rngs=nnx.Rngs(10 + s))
    params = layer.params()
    params["gate_bias"] = jnp.asarray(np.random.default_rng(s).standard_normal(EXPERTS) * 0.05)
    stages.append(params)
  return jax.tree.map(lambda *a: jnp.stack(a), *stages)


def _silu(v):
  return v * jax.nn.sigmoid(v)


def reference_moe(p, x):
  """DeepSeek-V3's MoE on all tokens, dense over experts, float64 throughout.

  The (discrete) expert selection comes from ``moe.route``; the weights are
  recomputed here from float64 sigmoid scores.
  """
  logits = x @ p["router"]
  idx, _ = moe.route(logits, bias=p["gate_bias"], top_k=TOP_K, n_groups=GROUPS,
                     topk_groups=TOPK_GROUPS, routed_scaling_factor=SCALE)
  scores = jax.nn.sigmoid(logits)
  chosen = jnp.take_along_axis(scores, idx, axis=1)
  weights = chosen / jnp.sum(chosen, axis=1, keepdims=True) * SCALE
  combine = jnp.zeros_like(scores).at[jnp.arange(x.shape[0])[:, None], idx].add(weights)
  gate = jnp.einsum("nh,eih->nei", x, p["w_gate"])
  up = jnp.einsum("nh,eih->nei", x, p["w_up"])
  experts = jnp.einsum("nei,ehi->neh", _silu(gate) * up, p["w_down"])
  routed = jnp.einsum("ne,neh->nh", combine, experts)
  shared = (_silu(x @ p["shared_gate"]) * (x @ p["shared_up"])) @ p["shared_down"]
  return routed + shared


def mse(_, y, target):
  return jnp.mean((y - target) ** 2)


@pytest.mark.slow  # ~1-2 minutes each on 2 cores (compiling the MoE stages into the schedule)
@pytest.mark.parametrize("schedule", ["dualpipev", "1f1b"])
def test_moe_stages_on_a_pp_ep_mesh_match_the_float64_reference(x64, schedule):
  del x64
  ranks, chunks, micro = 2, 4, 8
  num_stages = pl.stages_for(schedule, ranks)
  layer = _layer()

  def stage_fn(p, x):  # this ep rank's micro-batch tokens, this rank's expert slots
    y, _ = layer.apply(p, x)
    return x + y

  stages = _stacked_params(num_stages)
  rng = np.random.default_rng(1)
  batch = EP * chunks * micro  # tokens split over ep, then into micro-batches
  x = jnp.asarray(rng.standard_normal((batch, HIDDEN)))
  target = jnp.asarray(rng.standard_normal((batch, HIDDEN)))

  @jax.jit
  def reference(stages):
    y = x
    for s in range(num_stages):  # per-token outputs: the batch's order does not matter
      y = y + reference_moe(jax.tree.map(lambda a, s=s: a[s], stages), y)
    return mse(None, y, target)

  ref_loss, ref_grads = jax.value_and_grad(reference)(stages)
  mesh = jax.make_mesh((ranks, EP), ("pp", "ep"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  loss, grads = pl.pipeline_step(stage_fn, stages, x, target, mse, mesh=mesh,
                                 schedule=schedule, num_chunks=chunks, batch_axes=("ep",),
                                 stage_specs=layer.param_specs())
  assert loss.dtype == jnp.float64
  assert calc_diff(loss, ref_loss) < 1e-12
  assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
  assert sorted(grads) == sorted(ref_grads)
  np.testing.assert_array_equal(grads["gate_bias"], 0)  # selection only: no gradient
  np.testing.assert_array_equal(ref_grads["gate_bias"], 0)
  for name in sorted(set(grads) - {"gate_bias"}):
    g, r = np.asarray(grads[name]), np.asarray(ref_grads[name])
    assert g.shape == r.shape and g.dtype == np.float64
    assert calc_diff(g, r) < 1e-12, name
    # float64 end to end (the MoE accumulates in float64 for float64 inputs).
    np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12 * np.abs(r).max(), err_msg=name)
