"""Lowers a schedule's tick table to the integer rows the executor scans over.

Every rank runs the same program. At each tick it reads its row of a static
``[tick, rank, field]`` int32 table, picks a branch with ``lax.switch``, and the
row tells the branch where to read and write: slots of fixed-size buffers whose
indices are allocated here, statically, by replaying the table.

Buffers of one rank (all indexed on the leading axis; one more index than the
capacity is a trash slot that writes with nothing to store go to):

* ``acts``: stage inputs that arrived (from a neighbour or a local hand-off),
  held until the chunk's forward reads them, or, when residuals are recomputed
  (``remat``), until its full backward or its weight gradient.
* ``grads``: output gradients that arrived, held until the chunk's full
  backward or its deferred weight gradient.
* ``stash``: the forward's VJP residuals of a chunk (of any kind: slot, first
  stage?, last stage?), from the forward to the full backward or the W.

First-stage chunks read their input from the embedded micro-batches (index
``F_MB``) and write their input gradient to a per-micro-batch buffer (index
``B_MB``); neither goes through these pools.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxinfra.pipeline.schedules import Chunk, Op, Schedule, tick_table

# Row fields.
BRANCH, F_MB, F_IN, F_OUT, F_RES, B_MB, B_RES, B_G, B_OUT = range(9)
_NUM_FIXED = 9

# A chunk kind: (slot, is first stage, is last stage).
Kind = tuple[int, bool, bool]


@dataclasses.dataclass(frozen=True)
class Plan:
  """The static program of one schedule.

  Attributes:
    schedule: the schedule.
    rows: ``[ticks, ranks, fields]`` int32.
    branches: branch keys, indexed by ``rows[..., BRANCH]``. Keys are
      ``("idle",)``, ``("F", fwd)``, ``("B", bwd, split)`` (split ``"full"`` or
      ``"input"``), ``("W", kind)``, ``("FB", fwd, bwd)``, where ``fwd`` and
      ``bwd`` are ``(kind, destination)`` and destination is ``"+"``, ``"-"``
      (the neighbour rank r+1 / r-1), ``"local"`` (this rank's ``acts`` /
      ``grads``) or ``None`` (no output: the loss, or the first stage's input).
    act_cap, grad_cap: ``acts`` / ``grads`` slots (without the trash slot).
    stash_cap: residual stash slots (all chunk kinds share them).
    stash_kinds: the chunk kinds whose residuals are stashed.
    channels: ``(plus, minus)``, the items a rank sends at most in one tick to
      r+1 and to r-1.
    in_plus, in_minus: ``in_plus[c] = (acts column, grads column)``: the row
      fields naming where the item arriving on channel c from r-1 (resp. r+1)
      goes.
  """
  schedule: Schedule
  rows: np.ndarray
  branches: tuple[Any, ...]
  act_cap: int
  grad_cap: int
  stash_cap: int
  stash_kinds: tuple[Kind, ...]
  channels: tuple[int, int]
  in_plus: tuple[tuple[int, int], ...]
  in_minus: tuple[tuple[int, int], ...]

  @property
  def num_ticks(self) -> int:
    return self.rows.shape[0]


class _Pool:
  """Lowest-free-index allocation of one buffer on one rank."""

  def __init__(self):
    self.index: dict[Any, int] = {}
    self.free: list[int] = []
    self.size = 0

  def alloc(self, key) -> int:
    assert key not in self.index, key
    if self.free:
      self.free.sort()
      i = self.free.pop(0)
    else:
      i, self.size = self.size, self.size + 1
    self.index[key] = i
    return i

  def get(self, key) -> int:
    return self.index[key]

  def release(self, key) -> int:
    i = self.index.pop(key)
    self.free.append(i)
    return i


def _kind(schedule: Schedule, chunk: Chunk) -> Kind:
  return (schedule.where(chunk.path, chunk.stage)[1], schedule.is_first(chunk),
          schedule.is_last(chunk))


def _destination(schedule: Schedule, rank: int, chunk: Chunk, step: int) -> str | None:
  """Where the output of ``chunk`` goes: to stage ``chunk.stage + step``."""
  stage = chunk.stage + step
  if not 0 <= stage < schedule.num_stages:
    return None
  other = schedule.where(chunk.path, stage)[0]
  if other == rank:
    return "local"
  if abs(other - rank) != 1:
    raise ValueError(f"{schedule.name}: stage {chunk.stage} on rank {rank} feeds stage {stage} "
                     f"on rank {other}; only neighbouring ranks are connected")
  return "+" if other == rank + 1 else "-"


def make_plan(schedule: Schedule, *, remat: bool) -> Plan:
  """Lowers ``schedule`` (training, or forward-only if it has no backward ops).

  ``remat``: keep each chunk's stage input until its backward (which then
  recomputes the forward) instead of stashing the forward's VJP residuals.
  """
  table = tick_table(schedule)
  training = _has_backward(schedule)
  keep_inputs = remat and training
  num_ranks = schedule.num_ranks
  acts = [_Pool() for _ in range(num_ranks)]
  grads = [_Pool() for _ in range(num_ranks)]
  stash = [_Pool() for _ in range(num_ranks)]  # residuals of every kind share one pool
  branches: dict[Any, int] = {("idle",): 0}
  stash_kinds: set[Kind] = set()
  rows: list[list[dict[int, int]]] = []
  max_channels = {"+": 0, "-": 0}

  def fwd_key(r: int, chunk: Chunk):
    return (_kind(schedule, chunk), _destination(schedule, r, chunk, +1))

  def bwd_key(r: int, chunk: Chunk):
    return (_kind(schedule, chunk), _destination(schedule, r, chunk, -1))

  for t, ops in enumerate(table):
    tick_rows = [dict() for _ in range(num_ranks)]
    sends: list[list[tuple[str, str, Chunk]]] = [[] for _ in range(num_ranks)]
    local: list[list[tuple[str, Chunk, int]]] = [[] for _ in range(num_ranks)]

    def emit(r, row, channel, what, chunk, step, field):
      """The output of ``chunk`` for stage ``chunk.stage + step``: sent or kept."""
      dest = _destination(schedule, r, chunk, step)
      target = dataclasses.replace(chunk, stage=chunk.stage + step)
      if dest == "local":
        local[r].append((what, target, field))
      elif dest is not None:
        row[field] = channel[dest]
        channel[dest] += 1
        sends[r].append((dest, what, target))

    for r, op in enumerate(ops):
      row = tick_rows[r]
      if op is None:
        continue
      key = _branch_key(schedule, r, op, fwd_key, bwd_key)
      row[BRANCH] = branches.setdefault(key, len(branches))
      channel = {"+": 0, "-": 0}
      fwd, bwd = op.forward_chunk(), op.backward_chunk()
      if fwd is not None:
        row[F_MB] = schedule.path_chunks[fwd.path][fwd.mb]
        if not schedule.is_first(fwd):
          row[F_IN] = acts[r].get(fwd) if keep_inputs else acts[r].release(fwd)
        emit(r, row, channel, "act", fwd, +1, F_OUT)
      chunk = bwd if bwd is not None else (op.chunk if op.kind == "W" else None)
      if chunk is not None:
        row[B_MB] = schedule.path_chunks[chunk.path][chunk.mb]
        done = op.kind != "I"  # the chunk's last use: a full backward or its W
        take = (lambda pool, c: pool.release(c)) if done else (lambda pool, c: pool.get(c))
        if not schedule.is_last(chunk):
          row[B_G] = take(grads[r], chunk)
        if remat:
          if not schedule.is_first(chunk):
            row[B_RES] = take(acts[r], chunk)
        else:
          row[B_RES] = take(stash[r], chunk)
        if op.kind != "W":
          emit(r, row, channel, "grad", chunk, -1, B_OUT)
      for d in channel:
        max_channels[d] = max(max_channels[d], channel[d])
    # Allocations, after every read of this tick.
    for r, op in enumerate(ops):
      row = tick_rows[r]
      if op is not None and op.forward_chunk() is not None and training and not remat:
        fwd = op.forward_chunk()
        row[F_RES] = stash[r].alloc(fwd)
        stash_kinds.add(_kind(schedule, fwd))
      for what, chunk, field in local[r]:
        row[field] = (acts if what == "act" else grads)[r].alloc(chunk)
    for r in range(num_ranks):
      counts = {"+": 0, "-": 0}
      for dest, what, chunk in sends[r]:
        target = r + 1 if dest == "+" else r - 1
        pool = acts if what == "act" else grads
        c = counts[dest]
        counts[dest] += 1
        tick_rows[target][("in", dest, c, what)] = pool[target].alloc(chunk)
    rows.append(tick_rows)

  for r in range(num_ranks):
    for pool in (acts[r], grads[r], stash[r]):
      assert not pool.index, f"{schedule.name}: rank {r} never releases {sorted(pool.index)}"
  act_cap = max(p.size for p in acts)
  grad_cap = max(p.size for p in grads)
  stash_cap = max(p.size for p in stash)

  plus, minus = max_channels["+"], max_channels["-"]
  columns = _NUM_FIXED
  in_plus, in_minus = [], []
  for count, out in ((plus, in_plus), (minus, in_minus)):
    for _ in range(count):
      out.append((columns, columns + 1))
      columns += 2
  array = np.zeros((len(rows), num_ranks, columns), np.int32)
  for t, tick_rows in enumerate(rows):
    for r, row in enumerate(tick_rows):
      for field in range(_NUM_FIXED):
        array[t, r, field] = row.get(field, 0)  # fields a branch does not use stay 0
      for dest, cols, count in (("+", in_plus, plus), ("-", in_minus, minus)):
        for c in range(count):
          array[t, r, cols[c][0]] = row.get((("in", dest, c, "act")), act_cap)
          array[t, r, cols[c][1]] = row.get((("in", dest, c, "grad")), grad_cap)
  order = sorted(branches, key=branches.get)
  return Plan(schedule, array, tuple(order), act_cap, grad_cap, stash_cap,
              tuple(sorted(stash_kinds)), (plus, minus),
              tuple(in_plus), tuple(in_minus))


def _has_backward(schedule: Schedule) -> bool:
  return any(op.kind != "F" for ops in schedule.ops for op in ops)


def _branch_key(schedule: Schedule, r: int, op: Op, fwd_key, bwd_key):
  if op.kind == "F":
    return ("F", fwd_key(r, op.chunk))
  if op.kind in ("B", "I"):
    return ("B", bwd_key(r, op.chunk), "full" if op.kind == "B" else "input")
  if op.kind == "W":
    return ("W", _kind(schedule, op.chunk))
  return ("FB", fwd_key(r, op.chunk), bwd_key(r, op.backward))
