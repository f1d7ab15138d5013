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


def _fp8_step(model, x):
  def loss(model, x):
    y, _ = model(x)
    return jnp.sum(y.astype(jnp.float32) ** 2), y
  return nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model, x)


@pytest.mark.slow
@pytest.mark.parametrize("ep", [False, True])
def test_fp8_layer_is_close_to_float32_and_differentiable(mesh, ep):
  """FP8 dispatch + FP8 grouped GEMMs (DeepSeek-V3's recipe) vs the float32 layer.

  Bounds: DeepGEMM's calc_diff < 1e-3 for the output (measured 8.9e-4: three
  FP8 GEMMs in a row, each operand rounded to e4m3); the gradients go through
  the FP8 dgrad and wgrad GEMMs as well (measured below 3.1e-3).
  """
  cfg = checks.layer_config(dtype=jnp.bfloat16, intermediate=128)
  kw = dict(mesh=mesh, ep_axis="ep") if ep else {}
  exact = moe.MoE(**dict(cfg, dtype=jnp.float32), **kw, rngs=nnx.Rngs(0))
  fp8 = moe.MoE(**cfg, **kw, fp8=True, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).standard_normal((128, 128)).astype(np.float32)
  if ep:
    x = checks.put(x, mesh, jax.sharding.PartitionSpec("ep"))
  (_, y_exact), g_exact = _fp8_step(exact, x)
  (_, y_fp8), g_fp8 = _fp8_step(fp8, x)
  assert y_fp8.dtype == jnp.bfloat16
  assert calc_diff(checks.as_f32(checks.fetch(y_fp8)), checks.fetch(y_exact)) < 1e-3
  for name in ("w_gate", "w_up", "w_down", "router", "shared_gate"):
    got, want = checks.fetch(getattr(g_fp8, name)[...]), checks.fetch(getattr(g_exact, name)[...])
    assert got.dtype == np.float32 and np.isfinite(got).all(), name  # master-weight gradients
    assert calc_diff(got, want) < 5e-3, name


def test_fp8_grouped_linear_uses_the_fp8_gemms():
  """grouped_linear(fp8=True) is jaxinfra.gemm's FP8 grouped GEMM: within DeepGEMM's bound
  of the float32 product, bitwise equal to fp8_grouped_linear, differentiable."""
  from jaxinfra import gemm  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  sizes = jnp.asarray([5, 0, 17, 9], jnp.int32)
  x = jnp.asarray(rng.standard_normal((40, 256)), jnp.bfloat16)  # rows past 31: no expert
  w = jnp.asarray(rng.standard_normal((4, 96, 256)) / 16, jnp.float32)
  y = jax.jit(lambda x, w: moe.grouped_linear(x, w, sizes, fp8=True))(x, w)
  exact = moe.grouped_linear(x.astype(jnp.float32), w, sizes)
  assert y.dtype == jnp.bfloat16
  assert calc_diff(checks.as_f32(y), exact) < 1e-3
  np.testing.assert_array_equal(checks.as_f32(y)[31:], 0)
  np.testing.assert_array_equal(checks.as_f32(y), checks.as_f32(gemm.fp8_grouped_linear(x, w, sizes)))
  loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) ** 2)
  gx, gw = jax.jit(jax.grad(loss(lambda x, w: moe.grouped_linear(x, w, sizes, fp8=True)),
                            argnums=(0, 1)))(x, w)
  rx, rw = jax.grad(loss(lambda x, w: moe.grouped_linear(x, w, sizes)), argnums=(0, 1))(
      x.astype(jnp.float32), w)
  assert gw.dtype == jnp.float32
  assert calc_diff(checks.as_f32(gx), rx) < 2e-3 and calc_diff(gw, rw) < 2e-3


def test_fp8_masked_grouped_linear_takes_dispatched_e4m3_rows():
  from jaxinfra import quant  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((3, 16, 256)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 128, 256)) / 16, jnp.float32)
  counts = jnp.asarray([16, 0, 7], jnp.int32)
  exact = moe.masked_grouped_linear(x, w, counts)
  y = moe.masked_grouped_linear(x, w, counts, fp8=True)
  assert calc_diff(y, exact) < 1e-3
  np.testing.assert_array_equal(y[1], 0)
  np.testing.assert_array_equal(y[2, 7:], 0)
  q, s = quant.quantize_per_token(x)
  direct = moe.masked_grouped_linear(q, w, counts, x_scales=s, out_dtype=jnp.float32)
  np.testing.assert_array_equal(direct, y)  # the e4m3 rows go in as they are
  with pytest.raises(ValueError, match="needs x_scales"):
    moe.masked_grouped_linear(q, w, counts)


@pytest.mark.slow
def test_fp8_low_latency_layer_is_close_to_float32(mesh):
  cfg = checks.layer_config(dtype=jnp.bfloat16, intermediate=128)
  exact = moe.MoE(**dict(cfg, dtype=jnp.float32), mesh=mesh, ep_axis="ep", rngs=nnx.Rngs(0))
  fp8 = moe.MoE(**cfg, mesh=mesh, ep_axis="ep", mode="low_latency", fp8=True, rngs=nnx.Rngs(0))
  x = checks.put(np.random.default_rng(1).standard_normal((128, 128)).astype(np.float32), mesh,
                 jax.sharding.PartitionSpec("ep"))
  y, _ = nnx.jit(lambda m, x: m(x))(fp8, x)
  y_exact, _ = nnx.jit(lambda m, x: m(x))(exact, x)
  assert calc_diff(checks.as_f32(checks.fetch(y)), checks.fetch(y_exact)) < 1e-3


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


@pytest.mark.slow
def test_eplb_placement_equals_the_unreplicated_layer(mesh):
  """An EPLB placement (64 experts in 80 slots over ep=8, replicas of the hot experts)."""
  from jaxinfra import eplb  # pylint: disable=g-import-not-at-top
  cfg = checks.layer_config()
  loads = eplb.zipf_loads(1, checks.E, seed=3)[0]
  placement = eplb.ExpertPlacement.create(loads, 80, checks.N_GROUPS, 1, 8)
  assert int(placement.logcnt.max()) > 1
  plain = moe.MoE(**cfg, mesh=mesh, ep_axis="ep", rngs=nnx.Rngs(0))
  placed = moe.MoE(**cfg, mesh=mesh, ep_axis="ep", num_slots=80, rngs=nnx.Rngs(5))
  bias = jnp.asarray(np.linspace(-0.05, 0.05, checks.E), jnp.float32)
  plain.gate_bias[...] = bias
  for name, w in plain.params().items():
    if name not in ("w_gate", "w_up", "w_down"):
      getattr(placed, name)[...] = w
  phys = moe.physical_expert_weights(
      placement, {n: plain.params()[n] for n in ("w_gate", "w_up", "w_down")})
  for name, w in phys.items():
    assert w.shape[0] == 80
    getattr(placed, name)[...] = w
  x = np.random.default_rng(8).standard_normal((128, 128)).astype(np.float32)
  xs = checks.put(x, mesh, jax.sharding.PartitionSpec("ep"))
  y_ref, stats_ref = nnx.jit(lambda m, x: m(x))(plain, xs)
  y, stats = nnx.jit(lambda m, x, p: m(x, placement=p))(placed, xs, placement)
  y_ref, y = np.asarray(y_ref), np.asarray(y)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
  np.testing.assert_array_equal(stats.tokens_per_expert, stats_ref.tokens_per_expert)
  # Per-slot loads: the placement's routing of the same logical choices, by global token id.
  logits = jnp.dot(jnp.asarray(x), plain.router[...])
  idx, _ = jax.jit(lambda l, b: moe.route(l, bias=b, top_k=checks.K, n_groups=checks.N_GROUPS,
                                          topk_groups=checks.TOPK_GROUPS))(logits, bias)
  np.testing.assert_array_equal(stats_ref.tokens_per_expert,
                                np.bincount(np.asarray(idx).ravel(), minlength=checks.E))
  want = np.bincount(np.asarray(placement.route(idx, np.arange(128))).ravel(), minlength=80)
  np.testing.assert_array_equal(stats.tokens_per_slot, want)
  replicated = np.flatnonzero(np.asarray(placement.logcnt) > 1)
  for e in replicated:  # every replica of a loaded replicated expert takes tokens
    slots = np.asarray(placement.log2phy)[e, :int(placement.logcnt[e])]
    if np.asarray(stats.tokens_per_expert)[e] >= len(slots):
      assert (np.asarray(stats.tokens_per_slot)[slots] > 0).all()
  # The local (no EP) layer with the same placement agrees too.
  local = moe.MoE(**cfg, num_slots=80, rngs=nnx.Rngs(5))
  for name, w in placed.params().items():
    getattr(local, name)[...] = jnp.asarray(np.asarray(w))  # unsharded copies
  y_local, stats_local = nnx.jit(lambda m, x, p: m(x, placement=p))(local, x, placement)
  np.testing.assert_allclose(y_local, y_ref, rtol=1e-5, atol=1e-5 * np.abs(y_ref).max())
  np.testing.assert_array_equal(stats_local.tokens_per_slot, want)


def test_placement_bad_arguments(mesh):
  from jaxinfra import eplb  # pylint: disable=g-import-not-at-top
  model = moe.MoE(**checks.layer_config(), mesh=mesh, ep_axis="ep", num_slots=80,
                  rngs=nnx.Rngs(0))
  x = jnp.zeros((16, 128))
  four = eplb.ExpertPlacement.create(np.ones(checks.E), 80, checks.N_GROUPS, 1, 4)
  with pytest.raises(ValueError, match="placement is for num_gpus=4, the EP size is 8"):
    model(x, placement=four)
  wrong = eplb.ExpertPlacement.unreplicated(checks.E, 8)
  with pytest.raises(ValueError, match="64 experts in 64 slots, the layer has"):
    model(x, placement=wrong)
  with pytest.raises(ValueError, match="placement or expert_map, not both"):
    model(x, placement=four, expert_map=lambda i: i)
  with pytest.raises(ValueError, match=r"w_gate must have shape \[64, ...\]"):
    moe.physical_expert_weights(wrong, {"w_gate": jnp.zeros((60, 2))})
