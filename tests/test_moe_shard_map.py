"""The MoE layer inside an enclosing shard_map (ep_axis without a mesh) and its
functional form ``MoE.apply``: equal to the layer's own shard_map mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import _moe_checks as checks
from jaxinfra import moe

EP = 4


def _meshes():
  explicit = jax.sharding.AxisType.Explicit
  ep = jax.make_mesh((EP,), ("ep",), axis_types=(explicit,), devices=jax.devices()[:EP])
  pp_ep = jax.make_mesh((2, EP), ("pp", "ep"), axis_types=(explicit,) * 2)
  return ep, pp_ep


def _grads_and_outputs(apply, params, x, target):
  def loss(params):
    y, stats = apply(params, x)
    return jnp.sum((y - target) ** 2), (y, stats)
  (_, (y, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return y, stats, grads


@pytest.mark.parametrize("outer", ["ep", "pp_ep"])
def test_layer_inside_an_enclosing_shard_map_equals_its_own_shard_map(outer):
  ep_mesh, pp_ep_mesh = _meshes()
  mesh = ep_mesh if outer == "ep" else pp_ep_mesh
  cfg = checks.layer_config()
  own = moe.MoE(**cfg, mesh=ep_mesh, ep_axis="ep", rngs=nnx.Rngs(0))
  inner = moe.MoE(**cfg, ep_axis="ep", rngs=nnx.Rngs(0))  # same weights (same seed)
  bias = jnp.asarray(np.linspace(-0.05, 0.05, checks.E), jnp.float32)
  own.gate_bias[...] = bias
  inner.gate_bias[...] = bias
  rng = np.random.default_rng(3)
  x = rng.standard_normal((EP * 16, cfg["hidden"])).astype(np.float32)
  target = rng.standard_normal(x.shape).astype(np.float32)

  specs = inner.param_specs()
  assert specs["w_gate"] == P(("ep",)) and specs["router"] == P()
  stats_specs = moe.MoEStats(P(), P(), P())
  manual = jax.shard_map(lambda p, x: inner.apply(p, x), mesh=mesh, in_specs=(specs, P("ep")),
                         out_specs=(P("ep"), stats_specs))
  params = {k: checks.put(np.asarray(v), mesh, specs[k]) for k, v in inner.params().items()}
  y, stats, grads = _grads_and_outputs(manual, params,
                                       checks.put(x, mesh, P("ep")), checks.put(target, mesh,
                                                                                P("ep")))
  y_ref, stats_ref, grads_ref = _grads_and_outputs(
      own.apply, own.params(), checks.put(x, ep_mesh, P("ep")),
      checks.put(target, ep_mesh, P("ep")))

  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)
  for a, b in zip(stats, stats_ref):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(stats.tokens_per_expert.sum()) == x.shape[0] * checks.K
  assert sorted(grads) == sorted(grads_ref)
  for name in grads:
    ref = np.asarray(grads_ref[name])
    np.testing.assert_allclose(np.asarray(grads[name]), ref, rtol=1e-5,
                               atol=1e-6 * max(np.abs(ref).max(), 1e-30), err_msg=name)
  assert np.abs(np.asarray(grads["w_gate"])).max() > 0
  np.testing.assert_array_equal(np.asarray(grads["gate_bias"]), 0)  # never a gradient target


def test_call_equals_apply_on_params_and_nnx_merge_inside_shard_map():
  """``layer(x)`` is ``layer.apply(layer.params(), x)``; ``nnx.merge`` works inside too."""
  ep_mesh, _ = _meshes()
  cfg = checks.layer_config()
  inner = moe.MoE(**cfg, ep_axis="ep", rngs=nnx.Rngs(0))
  own = moe.MoE(**cfg, mesh=ep_mesh, ep_axis="ep", rngs=nnx.Rngs(0))
  x = np.random.default_rng(4).standard_normal((EP * 8, cfg["hidden"])).astype(np.float32)
  graphdef, state = nnx.split(inner)
  state_specs = jax.tree.map(lambda _: P(), state)
  for name in ("w_gate", "w_up", "w_down"):
    state_specs[name] = jax.tree.map(lambda _: P("ep"), state[name])

  def body(state, x):
    return nnx.merge(graphdef, state)(x)

  run = jax.jit(jax.shard_map(body, mesh=ep_mesh, in_specs=(state_specs, P("ep")),
                              out_specs=(P("ep"), moe.MoEStats(P(), P(), P()))))
  state = jax.tree.map(lambda v, s: checks.put(np.asarray(v), ep_mesh, s), state, state_specs)
  y, _ = run(state, checks.put(x, ep_mesh, P("ep")))
  y_ref, _ = nnx.jit(lambda m, x: m(x))(own, checks.put(x, ep_mesh, P("ep")))
  np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-6, atol=1e-6)


def test_inner_mode_rejects_unbound_axis_and_wrong_local_shapes():
  ep_mesh, _ = _meshes()
  inner = moe.MoE(**checks.layer_config(), ep_axis="ep", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="not bound here"):
    inner(jnp.zeros((8, 128)))
  whole = {k: P() for k in inner.params()}  # expert weights not split: wrong local shapes
  run = jax.shard_map(lambda p, x: inner.apply(p, x)[0], mesh=ep_mesh,
                      in_specs=(whole, P("ep")), out_specs=P("ep"))
  with pytest.raises(ValueError, match=r"w_gate must have shape \(16, 64, 128\) \(this rank"):
    jax.eval_shape(run, inner.params(), checks.put(np.zeros((32, 128), np.float32), ep_mesh,
                                                   P("ep")))
  with pytest.raises(ValueError, match="params is missing"):
    inner.apply({}, jnp.zeros((8, 128)))
