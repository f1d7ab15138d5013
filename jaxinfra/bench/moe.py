"""``jaxinfra bench moe``: expert-parallel dispatch/combine traffic and times.

Two tables in one:

* **Bytes per rank** (``kind="bytes"``) for DeepEP's configurations: 4096
  tokens per rank, hidden 7168, top-8 of 256 experts in 8 groups, top-4
  groups (normal mode; EP8 on one node, EP16/EP32 on 8-GPU nodes), and 128
  tokens per rank for low-latency mode; scaled down on CPU. For each mode
  (single-level, two-level node/local, low-latency) and payload dtype (bf16,
  fp8 = e4m3 + one float32 scale per 128 channels) it reports what each rank
  sends to other ranks (mean over ranks, MB), dropless: the filled rows
  split into inter-node and intra-node (``inter_MB``, ``intra_MB``; what the
  ragged backend moves), the whole capacity blocks (``pad_inter_MB``,
  ``pad_intra_MB``; what the padded backend moves), and combine's return
  traffic (the same rows in bf16, ``combine_MB``). The counts come from
  :func:`traffic`, a NumPy model of the dispatch plans that
  ``tests/test_bench_moe.py`` checks against the implementation's handles.
* **Time per implementation** (``kind="time"``): dispatch, combine, the
  low-latency pair and the MoE layer's forward on the devices present (EP
  over all of them), for each local-permute implementation.

On CPU, run it with 8 devices (this module asks JAX for 8 CPU devices when it
is imported before JAX starts; ``JAX_NUM_CPU_DEVICES`` overrides).
"""

from __future__ import annotations

import functools
import os

import jax

if "JAX_NUM_CPU_DEVICES" not in os.environ:
  try:  # only possible before JAX's backends start; harmless on GPU machines
    jax.config.update("jax_num_cpu_devices", 8)
  except RuntimeError:
    pass

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxinfra import moe  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxinfra import quant  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxinfra.bench import _harness  # pylint: disable=g-import-not-at-top,wrong-import-position
from jaxinfra.moe import permutation  # pylint: disable=g-import-not-at-top,wrong-import-position

# (tokens per rank, hidden, experts, top-k, groups, top groups, low-latency tokens)
_FULL = dict(tokens=4096, hidden=7168, experts=256, top_k=8, groups=8, topk_groups=4,
             ll_tokens=128, worlds=((1, 8), (2, 8), (4, 8)))
_SMALL = dict(tokens=128, hidden=512, experts=256, top_k=8, groups=8, topk_groups=4,
              ll_tokens=16, worlds=((1, 8), (2, 4)))
# The layer's forward is compute-bound on CPU: fewer tokens there.
_LAYER_TOKENS = {"full": 4096, "small": 32}


def row_bytes(hidden: int, fp8: bool) -> int:
  """Bytes of one dispatched row: bf16, or e4m3 plus float32 scales per 128 channels."""
  return hidden + 4 * (hidden // 128) if fp8 else 2 * hidden


def routing(ranks: int, tokens: int, experts: int, top_k: int, groups: int, topk_groups: int,
            seed: int = 0) -> np.ndarray:
  """DeepSeek-V3 routing of random logits with a random bias: ``[ranks*tokens, K]``."""
  rng = np.random.default_rng(seed)
  logits = rng.standard_normal((ranks * tokens, experts)).astype(np.float32)
  bias = (0.1 * rng.standard_normal(experts)).astype(np.float32)
  route = jax.jit(functools.partial(moe.route, top_k=top_k, n_groups=groups,
                                    topk_groups=topk_groups))
  return np.asarray(route(logits, bias=bias)[0])


def traffic(topk_idx: np.ndarray, *, nodes: int, local: int, tokens: int, experts: int,
            capacity: int | None = None, ll_tokens: int | None = None) -> dict[str, np.ndarray]:
  """Rows each rank sends, per the dispatch plans (NumPy model; no devices).

  Ranks are ``node * local + l``; rank ``r`` holds experts
  ``[r * E/R, (r+1) * E/R)``; ``topk_idx [R*tokens, K]``.

  Returns:
    ``single [R, R]``: rows from source to destination rank (single-level,
    capacity applied); ``node [R, nodes]``: two-level first hop, rows from a
    rank to each node (to the rank with its local index); ``fanout [R, local]``:
    two-level second hop, rows a forwarder sends to each rank of its node;
    ``low_latency [R, E]``: (token, expert) rows from each rank to each expert.
  """
  ranks = nodes * local
  per = experts // ranks
  capacity = tokens if capacity is None else capacity
  valid = (topk_idx >= 0) & (topk_idx < experts)
  rank_of = np.where(valid, topk_idx // per, -1)
  in_rank = (rank_of[:, :, None] == np.arange(ranks)).any(1).reshape(ranks, tokens, ranks)
  counts = in_rank.sum(1)                                           # [src, dst]
  single = np.minimum(counts, capacity)
  node = in_rank.reshape(ranks, tokens, nodes, local).any(3).sum(1)   # [src, dst node]
  fanout = np.zeros((ranks, local), np.int64)
  for m in range(nodes):
    for l in range(local):
      sources = [m2 * local + l for m2 in range(nodes)]
      fanout[m * local + l] = single[sources][:, m * local:(m + 1) * local].sum(0)
  out = {"single": single, "node": node, "fanout": fanout}
  if ll_tokens is not None:
    ll = topk_idx[:ranks * ll_tokens] if topk_idx.shape[0] >= ranks * ll_tokens else topk_idx
    ll = ll.reshape(ranks, -1, topk_idx.shape[1])
    out["low_latency"] = np.stack([np.bincount(ll[r][ll[r] >= 0].ravel(), minlength=experts)
                                   for r in range(ranks)])
  return out


def _bytes_rows(cfg: dict, nodes: int, local: int) -> list[dict]:
  ranks, tokens, hidden = nodes * local, cfg["tokens"], cfg["hidden"]
  idx = routing(ranks, tokens, cfg["experts"], cfg["top_k"], cfg["groups"], cfg["topk_groups"])
  ll_idx = routing(ranks, cfg["ll_tokens"], cfg["experts"], cfg["top_k"], cfg["groups"],
                   cfg["topk_groups"], seed=1)
  t = traffic(idx, nodes=nodes, local=local, tokens=tokens, experts=cfg["experts"])
  ll = traffic(ll_idx, nodes=nodes, local=local, tokens=cfg["ll_tokens"],
               experts=cfg["experts"], ll_tokens=cfg["ll_tokens"])["low_latency"]
  rank = np.arange(ranks)
  other_node = (rank[:, None] // local) != (rank[None, :] // local)
  same_node_other = ~other_node & (rank[:, None] != rank[None, :])
  per = cfg["experts"] // ranks
  expert_rank = np.arange(cfg["experts"]) // per
  ll_other_node = (rank[:, None] // local) != (expert_rank[None, :] // local)
  ll_same_other = ~ll_other_node & (rank[:, None] != expert_rank[None, :])
  world = f"EP{ranks} ({nodes}x{local})"
  rows = []
  for fp8 in (False, True):
    b = row_bytes(hidden, fp8)
    cases = {
        "single-level": ((t["single"] * other_node).sum(1), (t["single"] * same_node_other).sum(1),
                         (nodes - 1) * local * tokens, (local - 1) * tokens),
        "two-level": ((t["node"] * (np.arange(nodes)[None, :] != rank[:, None] // local)).sum(1),
                      t["fanout"].sum(1) - t["fanout"][rank, rank % local],
                      (nodes - 1) * tokens, (local - 1) * nodes * tokens),
        "low-latency": ((ll * ll_other_node).sum(1), (ll * ll_same_other).sum(1),
                        (nodes - 1) * local * per * cfg["ll_tokens"],
                        (local - 1) * per * cfg["ll_tokens"]),
    }
    for mode, (inter, intra, padded_inter, padded_intra) in cases.items():
      if nodes == 1 and mode == "two-level":
        continue
      rows.append(dict(
          kind="bytes", world=world, mode=mode, dispatch="fp8" if fp8 else "bf16",
          tokens=cfg["ll_tokens"] if mode == "low-latency" else tokens,
          inter_MB=float(inter.mean()) * b / 1e6, intra_MB=float(intra.mean()) * b / 1e6,
          pad_inter_MB=padded_inter * b / 1e6, pad_intra_MB=padded_intra * b / 1e6,
          combine_MB=float((inter + intra).mean()) * row_bytes(hidden, False) / 1e6))
  return rows


def _mesh(devices: int):
  return jax.make_mesh((devices,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,))


def _time_rows(ctx: _harness.BenchContext, cfg: dict) -> None:
  ranks = jax.device_count()
  mesh = _mesh(ranks)
  spec = P("ep")
  tokens, hidden, experts = cfg["tokens"], cfg["hidden"], cfg["experts"]
  idx = routing(ranks, tokens, experts, cfg["top_k"], cfg["groups"], cfg["topk_groups"])
  rng = np.random.default_rng(0)
  x = rng.standard_normal((ranks * tokens, hidden)).astype(np.float32)
  weights = np.full(idx.shape, 1.0 / idx.shape[1], np.float32)
  put = lambda a: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
  x_bf16 = put(jnp.asarray(x, jnp.bfloat16))
  idx_d, w_d = put(idx), put(weights)
  ll_tokens = cfg["ll_tokens"]
  x_ll, idx_ll = put(jnp.asarray(x[:ranks * ll_tokens], jnp.bfloat16)), put(idx[:ranks * ll_tokens])
  w_ll = put(weights[:ranks * ll_tokens])
  impls = _harness.available_impls(permutation.PERMUTE, permutation.UNPERMUTE)
  cases = [(impl, fp8) for impl in impls for fp8 in (False, True)]
  for impl, fp8 in ctx.track(cases, "moe dispatch/combine"):
    def dispatch_only(x, i, w, fp8=fp8, impl=impl):
      return moe.dispatch(x, i, w, axis_name="ep", num_experts=experts, fp8=fp8, impl=impl).recv_x

    def round_trip(x, i, w, fp8=fp8, impl=impl):
      d = moe.dispatch(x, i, w, axis_name="ep", num_experts=experts, fp8=fp8, dequantize=fp8,
                       impl=impl)
      return moe.combine(d.recv_x, d.handle)

    def ll_pair(x, i, w, fp8=fp8, impl=impl):
      d = moe.low_latency_dispatch(x, i, axis_name="ep", num_experts=experts,
                                   max_tokens_per_rank=ll_tokens, fp8=fp8, impl=impl)
      y = d.recv_x
      if fp8:
        y = quant.dequantize_per_token(y, d.recv_scales, out_dtype=jnp.bfloat16)
      return moe.low_latency_combine(y, i, w, d.handle)

    dtype = "fp8" if fp8 else "bf16"
    for name, fn, args in (("dispatch", dispatch_only, (x_bf16, idx_d, w_d)),
                           ("dispatch+combine", round_trip, (x_bf16, idx_d, w_d)),
                           ("low-latency dispatch+combine", ll_pair, (x_ll, idx_ll, w_ll))):
      run = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec))
      seconds = ctx.time(run, *args)
      ctx.add(kind="time", world=f"EP{ranks}", mode=name, dispatch=dtype,
              tokens=args[0].shape[0] // ranks, impl=impl,
              backend="padded", ms=seconds * 1e3)


def _layer_rows(ctx: _harness.BenchContext, cfg: dict) -> None:
  from flax import nnx  # pylint: disable=g-import-not-at-top
  ranks = jax.device_count()
  mesh = _mesh(ranks)
  hidden = cfg["hidden"]
  tokens = _LAYER_TOKENS[ctx.size]
  x = jax.device_put(jnp.asarray(np.random.default_rng(1).standard_normal(
      (ranks * tokens, hidden)), jnp.bfloat16), NamedSharding(mesh, P("ep")))
  for impl in _harness.available_impls(permutation.PERMUTE, permutation.UNPERMUTE):
    model = moe.MoE(hidden, max(hidden // 4, 128), cfg["experts"], top_k=cfg["top_k"],
                    n_groups=cfg["groups"], topk_groups=cfg["topk_groups"], mesh=mesh,
                    ep_axis="ep", capacity_factor=2.0, impl=impl, rngs=nnx.Rngs(0))
    forward = nnx.jit(lambda m, x: m(x)[0])
    seconds = ctx.time(forward, model, x)
    ctx.add(kind="time", world=f"EP{ranks}", mode="MoE layer forward", tokens=tokens,
            dispatch="bf16", impl=impl, backend="padded", ms=seconds * 1e3)


@_harness.register("moe", "EP dispatch/combine bytes per rank (bf16/fp8, single/two-level, "
                          "low-latency) and times")
def run(ctx: _harness.BenchContext) -> None:
  cfg = _FULL if ctx.full else _SMALL
  for nodes, local in ctx.track(cfg["worlds"], "moe traffic"):
    for row in _bytes_rows(cfg, nodes, local):
      ctx.add(**row)
  _time_rows(ctx, cfg)
  _layer_rows(ctx, cfg)
