"""jaxinfra.eplb.ExpertPlacement and relayout on 8 CPU devices: a plain-JAX MoE
routed through replicas equals the unreplicated one; relayout equals re-gathering
from logical weights; routing, pytree behavior, LoadTracker, and bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxinfra import eplb

EXPERTS, SLOTS, GPUS = 16, 32, 8      # 4 slots per device, 16 redundant
D, F, K, TOKENS = 16, 24, 4, 96


def ep_mesh():
  return jax.make_mesh((GPUS,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,))


def placement(seed=0, layers=None, drift=0.0):
  w = eplb.zipf_loads(layers or 1, EXPERTS, exponent=1.2, seed=seed)
  if drift:
    w = eplb.drift(w, drift, seed=seed + 100)
  p = eplb.ExpertPlacement.create(w if layers else w[0], SLOTS, 4, 2, GPUS, max_replicas=GPUS)
  return p


# --- a small MoE, written here ------------------------------------------------------------------


def moe_reference(x, gate, idx, w1, w2):
  """float64 NumPy: out[t] = sum_k gate[t,k] * relu(x[t] @ w1[e]) @ w2[e]."""
  x, gate, w1, w2 = (np.asarray(a, np.float64) for a in (x, gate, w1, w2))
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    for k in range(idx.shape[1]):
      e = int(idx[t, k])
      out[t] += gate[t, k] * (np.maximum(x[t] @ w1[e], 0) @ w2[e])
  return out


@jax.jit
def moe_dense(x, gate, idx, w1, w2):
  """Unreplicated plain-JAX MoE (fp32): every expert on every token, masked."""
  h = jnp.maximum(jnp.einsum("td,edf->tef", x, w1), 0)
  y = jnp.einsum("tef,efd->ted", h, w2)
  weight = (jax.nn.one_hot(idx, w1.shape[0]) * gate[..., None]).sum(1)       # [T, E]
  return jnp.einsum("te,ted->td", weight, y)


def moe_replicated(x, gate, idx, token_ids, w1_phys, w2_phys, place, mesh):
  """Expert-parallel MoE over physical slots: route to replicas, each device runs
  its local slots on the tokens sent to them, psum over the EP axis."""
  k = place.slots_per_gpu

  def body(x, gate, idx, token_ids, w1, w2, place):
    slot = place.route(idx, token_ids)                                         # [T, K]
    me = jax.lax.axis_index("ep")
    local = slot - me * k
    weight = (jax.nn.one_hot(local, k) * gate[..., None]).sum(1)               # [T, k]
    h = jnp.maximum(jnp.einsum("td,sdf->tsf", x, w1), 0)
    y = jnp.einsum("tsf,sfd->tsd", h, w2)
    return jax.lax.psum(jnp.einsum("ts,tsd->td", weight, y), "ep")

  spec = place.partition_spec("ep")
  fn = jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), P(), P(), spec, spec, P()),
                     out_specs=P())
  return fn(x, gate, idx, token_ids, w1_phys, w2_phys, place)


@jax.jit
def moe_inputs(seed=0):
  keys = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(keys[0], (TOKENS, D), jnp.float32)
  logits = jax.random.normal(keys[1], (TOKENS, EXPERTS)) * 2.0
  gate, idx = jax.lax.top_k(jax.nn.softmax(logits), K)
  w1 = jax.random.normal(keys[2], (EXPERTS, D, F), jnp.float32) / np.sqrt(D)
  w2 = jax.random.normal(keys[3], (EXPERTS, F, D), jnp.float32) / np.sqrt(F)
  return x, gate, idx, w1, w2


def test_replicated_moe_equals_unreplicated():
  mesh = ep_mesh()
  place = placement(seed=0)
  assert (np.asarray(place.logcnt) > 1).sum() >= 8           # replicated experts
  x, gate, idx, w1, w2 = moe_inputs()
  want = moe_dense(x, gate, idx, w1, w2)
  np.testing.assert_allclose(want, moe_reference(x, gate, idx, w1, w2), rtol=1e-5, atol=1e-5)
  sharding = place.sharding(mesh, "ep")
  w1p, w2p = jax.device_put(jax.jit(place.physical_weights)((w1, w2)), sharding)
  token_ids = jnp.arange(TOKENS)
  got = jax.jit(functools.partial(moe_replicated, mesh=mesh))(x, gate, idx, token_ids, w1p, w2p,
                                                             place)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Tokens really went to more than one replica of the replicated experts.
  slot = np.asarray(jax.jit(eplb.ExpertPlacement.route)(place, idx, token_ids))
  phy2log = np.asarray(place.phy2log)
  used = {int(s) for s in slot.ravel()}
  for e in np.nonzero(np.asarray(place.logcnt) > 1)[0]:
    replicas = set(np.nonzero(phy2log == e)[0].tolist())
    if (np.asarray(idx) == e).sum() >= 2 * len(replicas):
      assert replicas <= used


def test_route_spreads_evenly_and_masks_invalid():
  place = placement(seed=1)
  log2phy, logcnt = np.asarray(place.log2phy), np.asarray(place.logcnt)
  e = int(np.argmax(logcnt))
  tokens = jnp.arange(10 * logcnt[e])
  route = jax.jit(eplb.ExpertPlacement.route)
  slot = np.asarray(route(place, jnp.full((tokens.size, 1), e), tokens))[:, 0]
  np.testing.assert_array_equal(slot, log2phy[e, np.asarray(tokens) % logcnt[e]])
  assert np.bincount(slot, minlength=SLOTS)[log2phy[e, :logcnt[e]]].tolist() == [10] * logcnt[e]
  out = route(place, jnp.array([[-1, EXPERTS, 0]]), jnp.array([3]))
  assert out[0, 0] == -1 and out[0, 1] == -1 and 0 <= out[0, 2] < SLOTS
  assert np.asarray(place.phy2log)[int(out[0, 2])] == 0
  np.testing.assert_array_equal(jax.jit(place.device_of)(jnp.array([-1, 0, 5, 31])),
                                [-1, 0, 1, 7])
  # Broadcasting token ids and a jitted, vmapped call.
  idx = jnp.arange(12).reshape(2, 3, 2) % EXPERTS
  ids = jnp.arange(3)
  np.testing.assert_array_equal(route(place, idx, ids), route(place, idx, ids[None]))


def test_stacked_placement_in_scan_and_physical_weights():
  layers = 3
  place = placement(seed=2, layers=layers)
  assert place.num_layers == layers and place.slots_per_gpu == SLOTS // GPUS
  w = jax.random.normal(jax.random.key(1), (layers, EXPERTS, 5))
  phys = jax.jit(eplb.ExpertPlacement.physical_weights)(place, w)
  want = np.stack([np.asarray(w[l])[np.asarray(place.phy2log[l])] for l in range(layers)])
  np.testing.assert_array_equal(phys, want)
  np.testing.assert_array_equal(jax.jit(eplb.ExpertPlacement.physical_weights)(place[1], w[1]),
                                want[1])
  assert place.partition_spec("ep") == P(None, "ep")
  assert place[0].partition_spec("ep") == P("ep")
  tree = jax.jit(eplb.ExpertPlacement.physical_weights)(place, {"a": w, "b": w[..., :2]})
  np.testing.assert_array_equal(tree["b"], want[..., :2])

  def step(carry, layer_place):
    return carry, layer_place.route(jnp.array([[0, 1]]), jnp.array([7]))
  _, routed = jax.jit(lambda p: jax.lax.scan(step, 0, p))(place)
  log2phy, logcnt = np.asarray(place.log2phy), np.asarray(place.logcnt)
  for l in range(layers):
    np.testing.assert_array_equal(routed[l][0], log2phy[l, [0, 1], 7 % logcnt[l, [0, 1]]])
  leaves, treedef = jax.tree_util.tree_flatten(place)
  again = jax.tree_util.tree_unflatten(treedef, leaves)
  assert again.num_gpus == GPUS and len(leaves) == 3


@pytest.mark.parametrize("capacity", [None, 1, 2])
@pytest.mark.parametrize("stacked", [False, True])
def test_relayout_equals_regather(capacity, stacked):
  mesh = ep_mesh()
  layers = 3 if stacked else None
  old = placement(seed=3, layers=layers)
  new = placement(seed=3, layers=layers, drift=0.6)
  shape = ((layers,) if stacked else ()) + (EXPERTS, 4, 3)
  w = jax.random.normal(jax.random.key(2), shape)
  # Some new slots must come from other devices.
  k = SLOTS // GPUS
  o, n = (np.asarray(p.phy2log).reshape(-1, GPUS, k) for p in (old, new))
  remote = sum(e not in o[l, d] for l in range(len(o)) for d in range(GPUS) for e in n[l, d])
  assert remote > 0
  fn = jax.jit(lambda wp, a, b: eplb.relayout(wp, a, b, mesh=mesh, capacity=capacity))
  gather = jax.jit(eplb.ExpertPlacement.physical_weights)
  src = jax.device_put(gather(old, w), old.sharding(mesh))
  got = fn(src, old, new)
  np.testing.assert_array_equal(got, gather(new, w))
  spec = tuple(got.sharding.spec) + (None,) * got.ndim
  assert spec[:got.ndim] == tuple(old.partition_spec("ep")) + (None,) * (
      got.ndim - len(old.partition_spec("ep")))


def test_relayout_pytree_and_identity():
  mesh = ep_mesh()
  old = placement(seed=4)
  w = {"w1": np.arange(EXPERTS * 6.0).reshape(EXPERTS, 2, 3), "b": np.arange(EXPERTS * 1.0)}
  gather = lambda p: jax.tree_util.tree_map(lambda a: a[np.asarray(p.phy2log)], w)
  src = gather(old)
  same = eplb.relayout(src, old, old, mesh=mesh)
  jax.tree_util.tree_map(np.testing.assert_array_equal, same, src)
  new = placement(seed=5)
  got = eplb.relayout(src, old, new, mesh=mesh)
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, gather(new))


def test_placement_bad_input():
  place = placement(seed=0)
  mesh = ep_mesh()
  with pytest.raises(ValueError, match="num_gpus=8 but mesh axis 'ep' has size 4"):
    place.sharding(jax.make_mesh((4, 2), ("ep", "x")), "ep")
  with pytest.raises(ValueError, match="mesh has no axis 'tp'"):
    place.sharding(mesh, "tp")
  with pytest.raises(ValueError, match=r"w_logical must have shape \(16,\)"):
    place.physical_weights(jnp.zeros((15, 3)))
  with pytest.raises(ValueError, match="topk_idx must be an integer array"):
    place.route(jnp.zeros((4, 2)), jnp.arange(4))
  with pytest.raises(ValueError, match="token_ids .* must broadcast"):
    place.route(jnp.zeros((4, 2), int), jnp.arange(5))
  with pytest.raises(ValueError, match="single-layer placement"):
    placement(layers=2).route(jnp.zeros((4, 2), int), jnp.arange(4))
  with pytest.raises(ValueError, match="divisible by num_gpus"):
    eplb.ExpertPlacement(np.arange(12), np.arange(12)[:, None], np.ones(12, int), num_gpus=8)
  with pytest.raises(ValueError, match="logcnt does not count"):
    eplb.ExpertPlacement(np.arange(16), np.arange(16)[:, None], np.full(16, 2), num_gpus=8)
  with pytest.raises(ValueError, match="log2phy and phy2log disagree"):
    eplb.ExpertPlacement(np.arange(16), np.roll(np.arange(16), 1)[:, None], np.ones(16, int),
                         num_gpus=8)
  with pytest.raises(ValueError, match="outside"):
    eplb.ExpertPlacement(np.arange(16) + 1, np.arange(16)[:, None], np.ones(16, int), num_gpus=8)
  with pytest.raises(ValueError, match="old and new placements differ"):
    eplb.relayout(jnp.zeros((SLOTS, 2)), place, placement(layers=2), mesh=mesh)
  with pytest.raises(ValueError, match=r"w_physical must have shape \(32,\)"):
    eplb.relayout(jnp.zeros((16, 2)), place, place, mesh=mesh)
  with pytest.raises(ValueError, match="capacity must be an int in"):
    eplb.relayout(jnp.zeros((SLOTS, 2)), place, place, mesh=mesh, capacity=9)


def test_unreplicated_placement():
  place = eplb.ExpertPlacement.unreplicated(EXPERTS, GPUS, num_layers=2)
  np.testing.assert_array_equal(place.phy2log[1], np.arange(EXPERTS))
  np.testing.assert_array_equal(
      jax.jit(eplb.ExpertPlacement.route)(place[0], jnp.array([[3, 5]]), jnp.array([9])),
      [[3, 5]])


# --- load tracking ------------------------------------------------------------------------------


def test_expert_counts():
  idx = jnp.array([[0, 3], [3, -1], [7, 2], [8, 3]])
  np.testing.assert_array_equal(jax.jit(eplb.expert_counts, static_argnums=1)(idx, 8),
                                [1, 0, 1, 3, 0, 0, 0, 1])
  stacked = jax.jit(jax.vmap(lambda i: eplb.expert_counts(i, 8)))(jnp.stack([idx, idx % 2]))
  assert stacked.shape == (2, 8) and stacked[1].tolist() == [3, 5, 0, 0, 0, 0, 0, 0]  # -1 % 2 == 1


def test_load_tracker_ema():
  rng = np.random.default_rng(0)
  tracker = eplb.LoadTracker(6, num_layers=2, decay=0.8)
  np.testing.assert_array_equal(tracker.loads, np.zeros((2, 6)))
  history = [rng.integers(0, 100, (2, 6)) for _ in range(5)]
  for t, counts in enumerate(history, 1):
    got = tracker.update(jnp.asarray(counts))
    weights = np.array([(1 - 0.8) * 0.8 ** (t - i) for i in range(1, t + 1)])
    want = sum(wi * c for wi, c in zip(weights, history[:t])) / weights.sum()
    np.testing.assert_allclose(got, want, rtol=1e-12)
  np.testing.assert_allclose(eplb.LoadTracker(6, decay=0.5).update(np.arange(6)), np.arange(6))
  # The tracked loads feed the next placement.
  result = eplb.rebalance_experts(tracker.loads, 8, 2, 1, 4)
  assert result.phy2log.shape == (2, 8)
  tracker.reset()
  assert tracker.steps == 0


def test_load_tracker_bad_input():
  tracker = eplb.LoadTracker(4)
  with pytest.raises(ValueError, match=r"counts must have shape \(4,\)"):
    tracker.update(np.ones((2, 4)))
  with pytest.raises(ValueError, match="finite and non-negative"):
    tracker.update(np.array([1, -1, 0, 0]))
  with pytest.raises(ValueError, match="finite and non-negative"):
    tracker.update(np.array([1, np.nan, 0, 0]))
  assert tracker.steps == 0
  with pytest.raises(ValueError, match="decay must be in"):
    eplb.LoadTracker(4, decay=1.0)
  with pytest.raises(ValueError, match="num_experts must be a positive int"):
    eplb.LoadTracker(0)


def test_relayout_over_two_mesh_axes():
  mesh = jax.make_mesh((4, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  old, new = placement(seed=6), placement(seed=6, drift=0.6)
  w = np.random.default_rng(0).standard_normal((EXPERTS, 3)).astype(np.float32)
  got = eplb.relayout(w[np.asarray(old.phy2log)], old, new, mesh=mesh, axis=("a", "b"))
  np.testing.assert_array_equal(got, w[np.asarray(new.phy2log)])
  assert old.partition_spec(("a", "b")) == P(("a", "b"))
