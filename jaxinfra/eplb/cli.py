"""``jaxinfra eplb``: compute a placement from expert loads, print it, plot it."""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from jaxinfra.eplb import policy as policy_lib
from jaxinfra.eplb import report, synthetic


def add_parser(commands) -> None:
  p = commands.add_parser(
      "eplb", help="expert placement from per-expert loads: table, placement JSON, PNG",
      description="Computes an expert placement (jaxinfra.eplb.rebalance_experts) from loads "
                  "[layers, experts] and shows per-GPU loads before (no EPLB), with "
                  "DeepSeek's algorithm, and with the chosen policy.")
  p.add_argument("loads", nargs="?", default=None,
                 help="loads file: .npy, or .json (a [layers][experts] list, or an object "
                      "with a 'loads' list); omit with --zipf")
  p.add_argument("--zipf", nargs=2, type=int, metavar=("LAYERS", "EXPERTS"),
                 help="use synthetic Zipf loads (exponent 1, seed 0) instead of a file")
  p.add_argument("--replicas", type=int, required=True, help="physical slots per layer")
  p.add_argument("--groups", type=int, default=1, help="expert groups (default 1)")
  p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
  p.add_argument("--gpus", type=int, required=True, help="GPUs in the EP group")
  p.add_argument("--policy", choices=policy_lib.POLICIES, default="auto")
  p.add_argument("--previous", default=None,
                 help="placement JSON written by --out: rebalance migration-aware from it")
  p.add_argument("--slack", type=float, default=0.02,
                 help="with --previous: allowed max-load increase over a fresh placement")
  p.add_argument("--expert-bytes", type=int, default=0,
                 help="with --previous: bytes per expert, for the bytes-moved report")
  p.add_argument("--layer", type=int, default=None,
                 help="layer to show per GPU (default: the most imbalanced without EPLB)")
  p.add_argument("--out", default=None, help="write the placement to this JSON file")
  p.add_argument("--png", default="eplb.png", help="per-GPU load plot (default eplb.png; "
                 "'' to skip)")


def _read_loads(args) -> np.ndarray:
  if args.zipf:
    return synthetic.zipf_loads(*args.zipf)
  if args.loads is None:
    raise ValueError("jaxinfra eplb: give a loads file or --zipf LAYERS EXPERTS")
  path = pathlib.Path(args.loads)
  if path.suffix == ".npy":
    loads = np.load(path)
  else:
    data = json.loads(path.read_text())
    loads = np.asarray(data["loads"] if isinstance(data, dict) else data)
  if loads.ndim == 1:
    loads = loads[None]
  return loads


def run(args: argparse.Namespace) -> int:
  console = Console()
  loads = _read_loads(args)
  policy_lib.check_weight(loads, "loads")
  layers = loads.shape[0]
  config = (args.replicas, args.groups, args.nodes, args.gpus)
  start = time.perf_counter()
  if args.previous:
    prev = json.loads(pathlib.Path(args.previous).read_text())
    *arrays, migration = policy_lib.rebalance_experts(
        loads, *config, policy=args.policy, previous=np.asarray(prev["phy2log"]),
        balance_slack=args.slack, expert_bytes=args.expert_bytes)
    result = policy_lib.Rebalanced(*arrays)
  else:
    migration = None
    result = policy_lib.rebalance_experts(loads, *config, policy=args.policy)
  seconds = time.perf_counter() - start
  placements = {args.policy: result.phy2log}
  if args.policy != "deepseek":
    placements = {"deepseek": policy_lib.rebalance_experts(loads, *config,
                                                           policy="deepseek").phy2log,
                  **placements}
  before = report.unreplicated_loads(loads, args.gpus)
  mean = loads.sum(axis=1) / args.gpus
  layer = int(np.argmax(before.max(axis=1) / np.where(mean > 0, mean, 1))) \
      if args.layer is None else args.layer
  if not 0 <= layer < layers:
    raise ValueError(f"jaxinfra eplb: --layer must be in [0, {layers}), got {layer}")

  table = Table(title=f"max / mean GPU load ({layers} layers, {loads.shape[1]} experts, "
                      f"{args.replicas} slots, {args.gpus} GPUs, {args.nodes} nodes, "
                      f"{args.groups} groups)")
  for col in ("placement", "median", "worst layer", "best layer", f"layer {layer}"):
    table.add_column(col, justify="right")
  rows = {"no EPLB": before / np.where(mean > 0, mean, 1)[:, None]}
  for name, p2l in placements.items():
    rows[name] = report.gpu_loads(loads, p2l, args.gpus) / np.where(mean > 0, mean, 1)[:, None]
  for name, rel in rows.items():
    peak = rel.max(axis=1)
    table.add_row(name, f"{np.median(peak):.4f}", f"{peak.max():.4f}", f"{peak.min():.4f}",
                  f"{peak[layer]:.4f}")
  console.print(table)
  console.print(f"policy {args.policy!r}: {seconds:.3f} s for {layers} layers")

  per_gpu = args.replicas // args.gpus
  gpu_table = Table(title=f"layer {layer}: experts per GPU ({args.policy})")
  for col in ("GPU", "node", "experts (replicas/total)", "load / mean"):
    gpu_table.add_column(col, justify="right")
  loads_now = rows[args.policy][layer]
  for g in range(args.gpus):
    experts = result.phy2log[layer, g * per_gpu:(g + 1) * per_gpu]
    text = " ".join(f"{e}" + (f"({result.logcnt[layer, e]})" if result.logcnt[layer, e] > 1
                              else "") for e in experts)
    gpu_table.add_row(str(g), str(g // (args.gpus // args.nodes)), text, f"{loads_now[g]:.3f}")
  console.print(gpu_table)

  if migration is not None:
    console.print(
        f"migration: {migration.total_replicas_moved} replicas moved "
        f"({migration.total_bytes_moved} bytes) vs {int(migration.from_scratch_moved.sum())} "
        f"for a placement from scratch; {int(migration.kept_previous.sum())} of {layers} "
        f"layers kept as they were; worst layer max load "
        f"{float((migration.peak / migration.from_scratch_peak).max()):.4f} x the fresh one")
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps({
        "replicas": args.replicas, "groups": args.groups, "nodes": args.nodes,
        "gpus": args.gpus, "policy": args.policy, "phy2log": result.phy2log.tolist(),
        "log2phy": result.log2phy.tolist(), "logcnt": result.logcnt.tolist()}))
    console.print(f"wrote {args.out}")
  if args.png:
    report.plot(args.png, loads.astype(np.float64), placements, args.gpus, args.nodes, layer)
    console.print(f"wrote {args.png}")
  return 0
