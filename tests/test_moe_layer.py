"""The NNX MoE layer: NumPy reference, EP (single-level, two-level, low-latency,
FP8, EPLB placement) equals one device, stats, bias updates, bad arguments."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import _moe_checks as checks
from jaxinfra import moe
from jaxinfra.testing.numerics import calc_diff
from test_moe_routing import ref_route


@pytest.fixture(scope="module")
def mesh():
  return checks.mesh_1d()


def _silu(v):
  return v / (1 + np.exp(-v))


def test_local_layer_matches_numpy_reference():
  cfg = checks.layer_config(hidden=128, intermediate=32)
  model = moe.MoE(**cfg, rngs=nnx.Rngs(1))
  bias = np.linspace(0.05, -0.05, checks.E).astype(np.float32)
  model.gate_bias[...] = jnp.asarray(bias)
  x = np.random.default_rng(0).standard_normal((24, 128)).astype(np.float32)
  y, stats = nnx.jit(lambda m, x: m(x))(model, x)
  p = {k: np.asarray(getattr(model, k)[...], np.float64)
       for k in ("router", "w_gate", "w_up", "w_down", "shared_gate", "shared_up", "shared_down")}
  x64 = x.astype(np.float64)
  idx, w = ref_route(x64 @ p["router"], bias.astype(np.float64), checks.K, checks.N_GROUPS,
                     checks.TOPK_GROUPS, 2.5)
  want = _silu(x64 @ p["shared_gate"]) * (x64 @ p["shared_up"]) @ p["shared_down"]
  for t in range(x.shape[0]):
    for e, weight in zip(idx[t], w[t]):
      h = _silu(p["w_gate"][e] @ x64[t]) * (p["w_up"][e] @ x64[t])
      want[t] += weight * (p["w_down"][e] @ h)
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5 * np.abs(want).max())
  np.testing.assert_array_equal(stats.tokens_per_expert, np.bincount(idx.ravel(), minlength=64))
  assert int(stats.num_dropped) == 0


def _assert_equal_to_one_device(result, grads=True):
  assert result["forward_close"], result["forward_max_rel"]
  assert result["tokens_per_expert_equal"]
  assert result["dropped"] == 0
  if grads:
    assert result["grads_close"], result["grads_max_rel"]
    assert result["grad_names"] == ["router", "shared_down", "shared_gate", "shared_up",
                                    "w_down", "w_gate", "w_up"]  # never the router bias


def test_ep_layer_equals_one_device_forward_and_gradients(mesh):
  result = checks.check_layer(mesh, "ep")
  _assert_equal_to_one_device(result)
  assert result["tokens_per_expert_total"] == 8 * 16 * checks.K


@pytest.mark.slow
def test_two_level_ep_layer_equals_one_device():
  result = checks.check_layer(checks.mesh_2d(), ("node", "local"))
  _assert_equal_to_one_device(result)


@pytest.mark.slow
def test_low_latency_layer_equals_one_device(mesh):
  result = checks.check_layer(mesh, "ep", mode="low_latency", grads=False)
  _assert_equal_to_one_device(result, grads=False)


@pytest.mark.slow
def test_replicated_placement_equals_identity(mesh):
  # 80 slots; experts 0..15 have a second replica (same weights) in slots 64..79.
  result = checks.check_layer(mesh, "ep", num_slots=80,
                              expert_map=(None, checks.replicated_map()))
  _assert_equal_to_one_device(result)
  slots = np.asarray(result["tokens_per_slot"])
  assert slots[64:].sum() > 0  # the replicas took load
  assert not result["tokens_per_slot_equal"]


@pytest.mark.slow
def test_fp8_dispatch_layer_is_close_and_differentiable(mesh):
  cfg = checks.layer_config(dtype=jnp.bfloat16)
  exact = moe.MoE(**cfg, mesh=mesh, ep_axis="ep", rngs=nnx.Rngs(0))
  fp8 = moe.MoE(**cfg, mesh=mesh, ep_axis="ep", fp8=True, rngs=nnx.Rngs(0))
  x = checks.put(np.random.default_rng(1).standard_normal((128, 128)).astype(np.float32), mesh,
                 jax.sharding.PartitionSpec("ep"))

  def loss(model, x):
    y, _ = model(x)
    return jnp.sum(y.astype(jnp.float32) ** 2), y

  step = nnx.jit(nnx.value_and_grad(loss, has_aux=True))
  (_, y_exact), g_exact = step(exact, x)
  (_, y_fp8), g_fp8 = step(fp8, x)
  assert calc_diff(checks.fetch(y_fp8), checks.fetch(y_exact)) < 1e-3
  assert calc_diff(checks.fetch(g_fp8.w_gate[...]), checks.fetch(g_exact.w_gate[...])) < 2e-3


def test_capacity_factor_drops_and_counts(mesh):
  cfg = checks.layer_config()
  model = moe.MoE(**cfg, mesh=mesh, ep_axis="ep", capacity_factor=0.25, rngs=nnx.Rngs(0))
  x = checks.put(np.random.default_rng(2).standard_normal((128, 128)).astype(np.float32), mesh,
                 jax.sharding.PartitionSpec("ep"))
  y, stats = nnx.jit(lambda m, x: m(x))(model, x)
  assert int(checks.fetch(stats.num_dropped)) > 0
  assert int(checks.fetch(stats.tokens_per_expert).sum()) == 128 * checks.K
  assert np.isfinite(checks.fetch(y)).all()


def test_update_bias_follows_the_load():
  model = moe.MoE(**checks.layer_config(), rngs=nnx.Rngs(0))
  x = np.random.default_rng(3).standard_normal((64, 128)).astype(np.float32)
  _, stats = nnx.jit(lambda m, x: m(x))(model, x)
  load = np.asarray(stats.tokens_per_expert)
  model.update_bias(stats, rate=0.01)
  np.testing.assert_allclose(model.gate_bias[...], -0.01 * np.sign(load - load.mean()))


@pytest.mark.parametrize("kwargs, message", [
    (dict(mode="fast"), "mode must be one of"),
    (dict(mode="low_latency"), "low_latency mode needs a single EP axis name"),
    (dict(num_slots=60), "num_slots=60 must be >= num_experts=64"),
    (dict(capacity_factor=0.0), "capacity_factor must be positive"),
])
def test_layer_rejects_bad_arguments(kwargs, message):
  with pytest.raises(ValueError, match=message):
    moe.MoE(**checks.layer_config(), rngs=nnx.Rngs(0), **kwargs)


def test_layer_rejects_bad_mesh_and_inputs(mesh):
  with pytest.raises(ValueError, match="num_slots=68 must be divisible by the EP size 8"):
    moe.MoE(**checks.layer_config(), mesh=mesh, ep_axis="ep", num_slots=68, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="a mesh needs ep_axis"):
    moe.MoE(**checks.layer_config(), mesh=mesh, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="ep_axis 'x' not in the mesh axes"):
    moe.MoE(**checks.layer_config(), mesh=mesh, ep_axis="x", rngs=nnx.Rngs(0))
  model = moe.MoE(**checks.layer_config(), mesh=mesh, ep_axis="ep", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"x must have shape \[N, 128\], got \(4, 64\)"):
    model(jnp.zeros((4, 64)))
  with pytest.raises(ValueError, match="tokens 12 .* must be divisible by the EP size 8"):
    model(jnp.zeros((12, 128)))
