"""DeepEP's checks for jaxinfra.moe, written once for any mesh.

Each ``check_*`` builds its inputs with NumPy (same seed in every process),
runs the op under ``jax.shard_map`` on the given mesh, fetches the global
results (``process_allgather`` across processes) and compares them with plain
NumPy references; it returns a dict of metrics that the tests assert on. The
same functions run on 8 devices in one process (tests/test_moe_*.py) and on
2 processes x 4 devices (tests/test_moe_multiprocess.py).
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfra import moe
from jaxinfra import quant
from jaxinfra.testing.numerics import calc_diff

# Scaled-down DeepSeek-V3: top-8 of 64 experts in 8 groups, top-4 groups.
E, K, N_GROUPS, TOPK_GROUPS = 64, 8, 8, 4
H = 256


def mesh_1d(n: int = 8, name: str = "ep"):
  return jax.make_mesh((n,), (name,), axis_types=(jax.sharding.AxisType.Explicit,))


def mesh_2d(nodes: int = 2, local: int = 4):
  return jax.make_mesh((nodes, local), ("node", "local"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def put(array: np.ndarray, mesh, spec: P) -> jax.Array:
  """A global array from the same NumPy array in every process."""
  return jax.make_array_from_callback(array.shape, NamedSharding(mesh, spec),
                                      lambda index: array[index])


def fetch(a: jax.Array) -> np.ndarray:
  """The whole global array as NumPy, in every process."""
  if a.is_fully_addressable:
    return np.asarray(a)
  return np.asarray(multihost_utils.process_allgather(a, tiled=True))


def as_f32(a) -> np.ndarray:
  return np.asarray(a).astype(np.float32)


def digest(*arrays) -> str:
  h = hashlib.sha256()
  for a in arrays:
    h.update(np.ascontiguousarray(np.asarray(a)).view(np.uint8).tobytes())
  return h.hexdigest()


@jax.jit
def _route(logits, bias):
  return moe.route(logits, bias=bias, top_k=K, n_groups=N_GROUPS, topk_groups=TOPK_GROUPS)


def routed_inputs(ranks: int, tokens: int, seed: int = 0, hidden: int = H):
  """x [R*N, H] bf16-representable float32 (tagged), DeepSeek-V3 routing from random logits."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((ranks * tokens, E)).astype(np.float32)
  bias = (rng.standard_normal(E) * 0.1).astype(np.float32)
  idx, weights = _route(logits, bias)
  idx, weights = np.array(idx), np.array(weights)
  x = rng.standard_normal((ranks * tokens, hidden)).astype(np.float32)
  x = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))
  return x, idx, weights


def tagged(ranks: int, tokens: int, hidden: int = H) -> np.ndarray:
  """x with x[:, :128] = source rank and x[:, 128:256] = source token index."""
  x = np.zeros((ranks * tokens, hidden), np.float32)
  rank = np.repeat(np.arange(ranks), tokens)
  token = np.tile(np.arange(tokens), ranks)
  x[:, :128] = rank[:, None]
  x[:, 128:256] = token[:, None]
  return x


# --- NumPy references ----------------------------------------------------------------------------


def ref_layout(topk_idx: np.ndarray, num_experts: int, num_ranks: int):
  per = num_experts // num_ranks
  n = topk_idx.shape[0]
  per_expert = np.zeros(num_experts, np.int64)
  in_rank = np.zeros((n, num_ranks), bool)
  for t in range(n):
    for e in topk_idx[t]:
      if 0 <= e < num_experts:
        per_expert[e] += 1
        in_rank[t, e // per] = True
  return in_rank.sum(0), per_expert, in_rank


def ref_blocks(topk_idx: np.ndarray, ranks: int, tokens: int, capacity: int):
  """expected[dst][src] = source-local token indices rank dst receives from src, in order."""
  per = E // ranks
  expected = [[[] for _ in range(ranks)] for _ in range(ranks)]
  dropped = 0
  for src in range(ranks):
    for t in range(tokens):
      ids = topk_idx[src * tokens + t]
      for dst in sorted({int(e) // per for e in ids if 0 <= e < E}):
        if len(expected[dst][src]) < capacity:
          expected[dst][src].append(t)
        else:
          dropped += 1
  return expected, dropped


# --- dispatch / combine --------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _dispatch_fn(mesh, axis, *, capacity=None, fp8=False, hierarchical=None, impl="auto",
                 backend="auto"):
  spec = P(axis)

  def body(x, idx, w):
    d = moe.dispatch(x, idx, w, axis_name=axis, num_experts=E, capacity=capacity, fp8=fp8,
                     hierarchical=hierarchical, impl=impl, backend=backend)
    if fp8:
      recv = quant.dequantize_per_token(d.recv_x, d.recv_scales, out_dtype=jnp.bfloat16)
    else:
      recv = d.recv_x
    combined = moe.combine(recv, d.handle)
    return (recv, d.recv_topk_idx, d.recv_topk_weights, d.num_recv_tokens_per_expert,
            d.num_recv_tokens_per_rank, d.num_dropped[None], d.num_invalid[None], combined)

  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 8))


def run_dispatch(mesh, axis, x, idx, w, **kw):
  spec = P(axis)
  args = (put(x.astype(jnp.bfloat16), mesh, spec), put(idx, mesh, spec), put(w, mesh, spec))
  return [fetch(o) for o in _dispatch_fn(mesh, axis, **kw)(*args)]


def check_dispatch(mesh, axis, *, fp8: bool = False, tokens: int = 32, capacity=None,
                   hierarchical=None, seed: int = 0) -> dict:
  """Layout, rank tags, counts, ids, weights, combine and determinism of normal mode."""
  ranks = int(np.prod([mesh.shape[a] for a in ((axis,) if isinstance(axis, str) else axis)]))
  per = E // ranks
  cap = tokens if capacity is None else capacity
  x_rand, idx, w = routed_inputs(ranks, tokens, seed)
  expected, want_dropped = ref_blocks(idx, ranks, tokens, cap)
  per_rank_ref, per_expert_ref, _ = ref_layout(idx, E, ranks)
  out = {}

  # Rank-tagged inputs land in per-source blocks in source order.
  recv, rids, rw, per_expert, per_source, dropped, invalid, combined = run_dispatch(
      mesh, axis, tagged(ranks, tokens), idx, w, capacity=capacity, fp8=fp8,
      hierarchical=hierarchical)
  recv = as_f32(recv).reshape(ranks, ranks, cap, H)
  rids = rids.reshape(ranks, ranks, cap, K)
  rw = rw.reshape(ranks, ranks, cap, K)
  tags_ok = ids_ok = True
  tag_tol = 2e-2 if fp8 else 0  # FP8 rounds the tags (per-128 scales)
  for dst in range(ranks):
    for src in range(ranks):
      want = expected[dst][src]
      c = len(want)
      block = recv[dst, src]
      tags_ok &= np.allclose(block[:c, 0], src, atol=tag_tol * src)
      tags_ok &= np.allclose(block[:c, 200], want, rtol=tag_tol)
      tags_ok &= not block[c:].any()
      rows = idx[src * tokens + np.asarray(want, int)].reshape(c, K)
      mine = (rows >= 0) & (rows // per == dst)
      ids_ok &= np.array_equal(rids[dst, src, :c], np.where(mine, rows - dst * per, -1))
      ids_ok &= bool((rids[dst, src, c:] == -1).all())
      w_rows = w[src * tokens + np.asarray(want, int)].reshape(c, K)
      ids_ok &= np.array_equal(rw[dst, src, :c], np.where(mine, w_rows, 0))
      ids_ok &= not rw[dst, src, c:].any()
  out["tags_ok"] = bool(tags_ok)
  out["ids_weights_ok"] = bool(ids_ok)
  out["per_source_ok"] = bool(np.array_equal(
      per_source.reshape(ranks, ranks), [[len(expected[d][s]) for s in range(ranks)]
                                         for d in range(ranks)]))
  if capacity is None:
    out["recv_equals_global_count"] = bool(np.array_equal(
        per_source.reshape(ranks, ranks).sum(1), per_rank_ref))
    out["per_expert_equals_global"] = bool(np.array_equal(per_expert, per_expert_ref))
  out["dropped"] = int(dropped.sum())
  out["want_dropped"] = int(want_dropped)
  out["invalid"] = int(invalid.sum())

  # combine(dispatch(x)) / (ranks per token) == x.
  runs = [run_dispatch(mesh, axis, x_rand, idx, w, capacity=capacity, fp8=fp8,
                       hierarchical=hierarchical) for _ in range(3)]
  _, _, _, _, _, _, _, combined = runs[0]
  reached = np.zeros(ranks * tokens)
  for dst in range(ranks):
    for src in range(ranks):
      for t in expected[dst][src]:
        reached[src * tokens + t] += 1
  has = reached > 0
  out["combine_diff"] = calc_diff(as_f32(combined)[has] / reached[has, None], x_rand[has])
  out["combine_zero_elsewhere"] = bool(not as_f32(combined)[~has].any())
  out["deterministic"] = len({digest(*r) for r in runs}) == 1
  return out


def check_invalid_ids(mesh, axis="ep", tokens: int = 16) -> dict:
  """Ids outside [-1, E) act as -1 and are counted."""
  ranks = mesh.shape[axis]
  x, idx, w = routed_inputs(ranks, tokens, seed=3)
  bad = idx.copy()
  bad[0, 0], bad[5, 3], bad[-1, 7] = E, -7, 10**6
  clean = idx.copy()
  clean[0, 0], clean[5, 3], clean[-1, 7] = -1, -1, -1
  got = run_dispatch(mesh, axis, x, bad, w)
  want = run_dispatch(mesh, axis, x, clean, w)
  return {"invalid": int(got[6].sum()),
          "equal_to_minus_one": all(np.array_equal(a, b) for i, (a, b) in
                                    enumerate(zip(got, want)) if i != 6)}


def check_two_level(mesh2, mesh1, *, tokens: int = 32, fp8: bool = False) -> dict:
  """Two-level EP on (node, local) equals single-level EP over 8 ranks."""
  x, idx, w = routed_inputs(8, tokens, seed=1)
  two = run_dispatch(mesh2, ("node", "local"), x, idx, w, fp8=fp8)
  flat = run_dispatch(mesh2, ("node", "local"), x, idx, w, fp8=fp8, hierarchical=False)
  single = run_dispatch(mesh1, "ep", x, idx, w, fp8=fp8)
  names = ("recv_x", "recv_topk_idx", "recv_topk_weights", "per_expert", "per_source",
           "dropped", "invalid")
  out = {f"{n}_equal": bool(np.array_equal(np.asarray(a).view(np.uint8),
                                           np.asarray(b).view(np.uint8)))
         for n, a, b in zip(names, two, single)}
  out["flat_equals_single"] = all(np.array_equal(as_f32(a), as_f32(b))
                                  for a, b in zip(flat, single))
  out["combine_diff"] = calc_diff(as_f32(two[7]), as_f32(single[7]))
  out["combine_max_rel"] = float(np.max(np.abs(as_f32(two[7]) - as_f32(single[7]))) /
                                 np.max(np.abs(as_f32(single[7]))))
  return out


def inter_node_rows(mesh2, *, tokens: int = 32) -> dict:
  """Rows crossing the node axis per rank: single-level vs two-level (payload rows)."""
  x, idx, w = routed_inputs(8, tokens, seed=1)
  axis = ("node", "local")
  spec = P(axis)

  def body(x, idx, w, hierarchical):
    d = moe.dispatch(x, idx, w, axis_name=axis, num_experts=E, hierarchical=hierarchical)
    return d.handle.send_sizes[0][None]

  rows = {}
  for name, hierarchical in (("single", False), ("two_level", True)):
    f = jax.jit(jax.shard_map(lambda a, b, c, h=hierarchical: body(a, b, c, h), mesh=mesh2,
                              in_specs=(spec,) * 3, out_specs=spec))
    sent = fetch(f(put(x.astype(jnp.bfloat16), mesh2, spec), put(idx, mesh2, spec),
                   put(w, mesh2, spec)))
    sent = sent.reshape(8, -1)
    node = np.arange(8) // 4
    if name == "single":  # sizes per destination rank
      rows[name] = int(sum(sent[r, d] for r in range(8) for d in range(8) if d // 4 != node[r]))
    else:  # sizes per destination node
      rows[name] = int(sum(sent[r, m] for r in range(8) for m in range(2) if m != node[r]))
  return rows


# --- gradients: dispatch <-> combine -------------------------------------------------------------


def check_vjp_duality(mesh, axis="ep", tokens: int = 16) -> dict:
  ranks = mesh.shape[axis]
  x, idx, w = routed_inputs(ranks, tokens, seed=2)
  spec = P(axis)
  rng = np.random.default_rng(5)
  g_recv = rng.standard_normal((ranks * ranks * tokens, H)).astype(np.float32)
  g_tok = rng.standard_normal((ranks * tokens, H)).astype(np.float32)

  def body(x, idx, w, g_recv, g_tok):
    d = moe.dispatch(x, idx, w, axis_name=axis, num_experts=E)
    mask = (jnp.arange(g_recv.shape[0])[:, None] % tokens
            < jnp.repeat(d.num_recv_tokens_per_rank, tokens)[:, None])
    g_valid = jnp.where(mask, g_recv, 0)
    _, dispatch_vjp = jax.vjp(lambda v: moe.dispatch(
        v, idx, w, axis_name=axis, num_experts=E).recv_x, x)
    grad_x, = dispatch_vjp(g_valid)
    _, combine_vjp = jax.vjp(lambda y: moe.combine(y, d.handle), d.recv_x)
    grad_y, = combine_vjp(g_tok)
    # Weights: loss = sum(recv_topk_weights * c) -> grad = c at the source.
    c = jnp.arange(1, K + 1, dtype=jnp.float32)
    grad_w = jax.grad(lambda v: jnp.sum(moe.dispatch(
        x, idx, v, axis_name=axis, num_experts=E).recv_topk_weights * c))(w)
    return (grad_x, moe.combine(g_valid, d.handle), grad_y, moe.cached_dispatch(g_tok, d.handle),
            grad_w)

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 5, out_specs=(spec,) * 5))
  outs = [fetch(o) for o in f(put(x, mesh, spec), put(idx, mesh, spec), put(w, mesh, spec),
                              put(g_recv, mesh, spec), put(g_tok, mesh, spec))]
  grad_x, combined, grad_y, cached, grad_w = outs
  want_w = np.where(idx >= 0, np.arange(1, K + 1, dtype=np.float32)[None, :], 0)
  return {"dispatch_vjp_is_combine": bool(np.array_equal(grad_x, combined)),
          "combine_vjp_is_dispatch": bool(np.array_equal(grad_y, cached)),
          "weights_grad_ok": bool(np.array_equal(grad_w, want_w))}


# --- low-latency mode ----------------------------------------------------------------------------


def check_low_latency(mesh, axis="ep", *, fp8: bool = True, tokens: int = 16,
                      max_tokens: int = 20) -> dict:
  ranks = mesh.shape[axis]
  per = E // ranks
  x_rand, idx, w = routed_inputs(ranks, tokens, seed=4)
  idx[1, 2] = -1
  spec = P(axis)

  def body(x, idx, w):
    d = moe.low_latency_dispatch(x, idx, axis_name=axis, num_experts=E,
                                 max_tokens_per_rank=max_tokens, fp8=fp8)
    recv = d.recv_x
    if fp8:
      recv = quant.dequantize_per_token(recv, d.recv_scales, out_dtype=jnp.bfloat16)
    combined = moe.low_latency_combine(recv, idx, w, d.handle)
    return recv, d.recv_count, combined

  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3, out_specs=(spec,) * 3))

  def run(x):
    return [fetch(o) for o in f(put(x.astype(jnp.bfloat16), mesh, spec), put(idx, mesh, spec),
                                put(w, mesh, spec))]

  recv, count, _ = run(tagged(ranks, tokens))
  recv = as_f32(recv).reshape(ranks, per, ranks * max_tokens, H)
  _, per_expert_ref, _ = ref_layout(idx, E, ranks)
  layout_ok = np.array_equal(count, per_expert_ref)
  tol = 2e-2 if fp8 else 0
  for e in range(E):
    dst, le = divmod(e, per)
    want = [(s, t) for s in range(ranks) for t in range(tokens) if e in idx[s * tokens + t]]
    rows = recv[dst, le]
    c = len(want)
    srcs = np.array([s for s, _ in want], np.float32)
    toks = np.array([t for _, t in want], np.float32)
    layout_ok &= np.allclose(rows[:c, 0], srcs, atol=tol * 8)
    layout_ok &= np.allclose(rows[:c, 200], toks, rtol=tol)
    layout_ok &= not rows[c:].any()
  runs = [run(x_rand) for _ in range(3)]
  combined = as_f32(runs[0][2])
  scale = np.where(idx >= 0, w, 0).sum(1, keepdims=True)
  return {"layout_ok": bool(layout_ok),
          "combine_diff": calc_diff(combined, x_rand * scale),
          "deterministic": len({digest(*r) for r in runs}) == 1}


# --- the MoE layer -------------------------------------------------------------------------------


def layer_config(**kw):
  base = dict(hidden=128, intermediate=64, num_experts=E, top_k=K, n_groups=N_GROUPS,
              topk_groups=TOPK_GROUPS, num_shared_experts=1, dtype=jnp.float32)
  base.update(kw)
  return base


def check_layer(mesh, ep_axis, *, tokens_per_rank: int = 16, mode: str = "normal",
                capacity_factor=None, grads: bool = True, fp8: bool = False,
                expert_map=None, num_slots=None) -> dict:
  """The layer with EP equals the same layer on one device: forward and gradients (fp32)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  axes = (ep_axis,) if isinstance(ep_axis, str) else tuple(ep_axis)
  ranks = int(np.prod([mesh.shape[a] for a in axes]))
  cfg = layer_config(fp8=fp8, num_slots=num_slots)
  local = moe.MoE(**cfg, rngs=nnx.Rngs(0))
  sharded = moe.MoE(**cfg, mesh=mesh, ep_axis=ep_axis, mode=mode,
                    capacity_factor=capacity_factor, rngs=nnx.Rngs(0))
  if num_slots is not None:  # replicas share their expert's weights
    for name in ("w_gate", "w_up", "w_down"):
      slots = getattr(local, name)[...]
      copy = slots.at[E:].set(slots[np.asarray(SLOT_SOURCE)[E:]])
      getattr(local, name)[...] = copy
      getattr(sharded, name)[...] = copy
  # A nonzero selection bias, identical in both.
  bias = np.linspace(-0.05, 0.05, E).astype(np.float32)
  local.gate_bias[...] = jnp.asarray(bias)
  sharded.gate_bias[...] = jnp.asarray(bias)
  rng = np.random.default_rng(7)
  x = rng.standard_normal((ranks * tokens_per_rank, cfg["hidden"])).astype(np.float32)
  target = rng.standard_normal(x.shape).astype(np.float32)
  device = jax.local_devices()[0]

  def loss(model, x, target, expert_map):
    y, stats = model(x, expert_map=expert_map)
    return jnp.sum((y - target) ** 2), (y, stats)

  def run(model, x, target, expert_map, differentiate):
    if differentiate:
      (_, (y, stats)), g = nnx.value_and_grad(loss, has_aux=True)(model, x, target, expert_map)
      return y, stats, g
    y, stats = model(x, expert_map=expert_map)
    return y, stats, None

  run = nnx.jit(run, static_argnums=(3, 4))
  reference_map = None if expert_map is None else expert_map[0]
  y_ref, stats_ref, g_ref = run(local, jax.device_put(x, device),
                                jax.device_put(target, device), reference_map, grads)
  y_ep, stats_ep, g_ep = run(sharded, put(x, mesh, P(axes)), put(target, mesh, P(axes)),
                             None if expert_map is None else expert_map[1], grads)
  y_ref, y_ep = np.asarray(y_ref), fetch(y_ep)
  scale = np.abs(y_ref).max()
  out = {"forward_max_rel": float(np.max(np.abs(y_ep - y_ref)) / scale),
         "forward_close": bool(np.allclose(y_ep, y_ref, rtol=1e-5, atol=1e-5 * scale)),
         "tokens_per_expert_equal": bool(np.array_equal(fetch(stats_ep.tokens_per_expert),
                                                        np.asarray(stats_ref.tokens_per_expert))),
         "tokens_per_slot_equal": bool(np.array_equal(fetch(stats_ep.tokens_per_slot),
                                                      np.asarray(stats_ref.tokens_per_slot))),
         "tokens_per_slot": fetch(stats_ep.tokens_per_slot).tolist(),
         "tokens_per_expert_total": int(fetch(stats_ep.tokens_per_expert).sum()),
         "dropped": int(fetch(stats_ep.num_dropped))}
  if grads:
    worst, close = 0.0, True
    for (path, a), (_, b) in zip(nnx.to_flat_state(g_ref), nnx.to_flat_state(g_ep)):
      a, b = np.asarray(a[...]), fetch(b[...])
      if num_slots is not None and path[-1] in ("w_gate", "w_up", "w_down"):
        a, b = fold_replicas(a), fold_replicas(b)
      scale = np.abs(a).max()
      worst = max(worst, float(np.abs(a - b).max() / scale))
      close &= bool(np.allclose(b, a, rtol=1e-5, atol=1e-5 * scale))
    out["grads_close"] = close
    out["grads_max_rel"] = worst
    out["grad_names"] = sorted("/".join(map(str, p)) for p, _ in nnx.to_flat_state(g_ref))
  return out


# Replicated placement for the EPLB hook: 64 experts in 80 slots; experts 0..15
# (the first two groups) get a second replica in slots 64..79.
SLOT_SOURCE = list(range(E)) + list(range(16))


def fold_replicas(slot_grads: np.ndarray) -> np.ndarray:
  """[slots, ...] gradients -> [E, ...]: a replica's gradient belongs to its expert."""
  folded = np.zeros((E, *slot_grads.shape[1:]), slot_grads.dtype)
  np.add.at(folded, np.asarray(SLOT_SOURCE), slot_grads)
  return folded


def replicated_map():
  """The replicated placement as an ``expert_map``."""
  table = np.full((E, 2), -1, np.int32)
  table[:, 0] = np.arange(E)
  table[:16, 1] = np.arange(E, E + 16)
  counts = np.where(np.arange(E) < 16, 2, 1).astype(np.int32)
  return moe.replicated_expert_map(table, counts)
