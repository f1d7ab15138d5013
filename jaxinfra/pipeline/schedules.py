"""Pipeline schedules as per-rank op lists, and their static tick tables.

A schedule places ``num_stages`` pipeline stages on ``num_ranks`` ranks along one
or two *paths* (directions) and gives every rank the ordered list of the ops it
runs. An op works on a :class:`Chunk`, one micro-batch at one stage of one path:

* ``F``: the forward of a chunk.
* ``B``: the full backward of a chunk (input gradient and weight gradient).
* ``I``: the input-gradient half of the backward; the weight gradient is
  deferred (DualPipe's zero-bubble ``B*``).
* ``W``: the deferred weight gradient of the oldest ``I`` of the rank that has
  none yet (FIFO, like DualPipe's ``WeightGradStore``); resolved statically, so
  each ``W`` op names its chunk.
* ``FB``: the forward of one chunk and the full backward of another in one
  program region (DualPipe's overlapped ``F&B``).

Each rank holds ``num_slots`` stage *slots*; ``placement[path][stage]`` says
which ``(rank, slot)`` runs that stage for that path. Layouts:

* ``gpipe``, ``1f1b``, ``zb1p``: P ranks, P stages, rank r holds stage r.
* ``dualpipe``: P ranks (P even), P stages, two paths. Rank r holds stage r in
  slot 0 (path 0 enters at rank 0) and stage P-1-r in slot 1 (path 1 enters at
  rank P-1). Every stage has two copies, on ranks r and P-1-r; path 0 gets the
  first ``num_chunks/2`` micro-batches, path 1 the rest.
* ``dualpipev``: N ranks, 2N stages in a V. Rank r holds stage r (slot 0) and
  stage 2N-1-r (slot 1); the last rank hands stage N-1's output to stage N
  locally, and rank 0 holds both the first and the last stage.

The DualPipe and DualPipeV op lists follow DeepSeek's eight steps (see
``_dual_steps``); 1F1B is Megatron's warmup/steady/cooldown order; ZB1P is the
ZB-H1 schedule of Qi et al., "Zero Bubble Pipeline Parallelism" (2023).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")
OP_KINDS = ("F", "B", "I", "W", "FB")


@dataclasses.dataclass(frozen=True, order=True)
class Chunk:
  """One micro-batch ``mb`` (0..M-1 within its path) at ``stage`` of ``path``."""
  path: int
  stage: int
  mb: int


@dataclasses.dataclass(frozen=True)
class Op:
  """One op of a rank: ``kind`` in ``OP_KINDS`` on ``chunk``.

  For ``FB``, ``chunk`` is the forward chunk and ``backward`` the chunk whose
  full backward runs with it. For a ``W`` before FIFO resolution, ``chunk`` is
  ``None``.
  """
  kind: str
  chunk: Chunk | None
  backward: Chunk | None = None

  def forward_chunk(self) -> Chunk | None:
    return self.chunk if self.kind in ("F", "FB") else None

  def backward_chunk(self) -> Chunk | None:
    """The chunk whose input gradient this op computes (B, I, or FB's backward)."""
    if self.kind in ("B", "I"):
      return self.chunk
    return self.backward if self.kind == "FB" else None


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A pipeline schedule: stage placement and every rank's op list.

  Attributes:
    name: one of ``SCHEDULES``.
    num_ranks: pipeline ranks (devices along the pipeline mesh axis).
    num_chunks: micro-batches in one step, over all paths.
    placement: ``placement[path][stage] = (rank, slot)``.
    path_chunks: ``path_chunks[path]`` = the global micro-batch index of each of
      the path's micro-batches (so ``len(path_chunks[path])`` is its M).
    ops: ``ops[rank]`` = the rank's ops, in order.
  """
  name: str
  num_ranks: int
  num_chunks: int
  placement: tuple[tuple[tuple[int, int], ...], ...]
  path_chunks: tuple[tuple[int, ...], ...]
  ops: tuple[tuple[Op, ...], ...]

  @property
  def num_paths(self) -> int:
    return len(self.placement)

  @property
  def num_stages(self) -> int:
    return len(self.placement[0])

  @property
  def num_slots(self) -> int:
    return 1 + max(slot for path in self.placement for _, slot in path)

  def where(self, path: int, stage: int) -> tuple[int, int]:
    """``(rank, slot)`` running ``stage`` of ``path``."""
    return self.placement[path][stage]

  def slot_stages(self) -> tuple[tuple[int, ...], ...]:
    """``[rank][slot]`` -> the stage that slot holds (its parameters)."""
    table = [[-1] * self.num_slots for _ in range(self.num_ranks)]
    for path in self.placement:
      for stage, (rank, slot) in enumerate(path):
        table[rank][slot] = stage
    return tuple(tuple(row) for row in table)

  def is_first(self, chunk: Chunk) -> bool:
    return chunk.stage == 0

  def is_last(self, chunk: Chunk) -> bool:
    return chunk.stage == self.num_stages - 1

  def label(self, op: Op) -> str:
    """DualPipe's notation: ``F<slot>.<mb>``, ``B``, ``Bi`` (= I), ``W``, ``F0.3&B1.1``.

    With one slot per rank the slot is left out (``F3``).
    """
    def one(kind: str, chunk: Chunk) -> str:
      slot = self.where(chunk.path, chunk.stage)[1]
      name = {"I": "Bi"}.get(kind, kind)
      return f"{name}{slot}.{chunk.mb}" if self.num_slots > 1 else f"{name}{chunk.mb}"
    if op.kind == "FB":
      return f"{one('F', op.chunk)}&{one('B', op.backward)}"
    if op.kind == "W" and op.chunk is None:
      return "W"
    return one(op.kind, op.chunk)

  def forward_only(self) -> "Schedule":
    """The same schedule with only its forwards (inference): FB keeps its F."""
    ops = tuple(tuple(Op("F", op.chunk) for op in rank_ops if op.kind in ("F", "FB"))
                for rank_ops in self.ops)
    return dataclasses.replace(self, ops=ops)


# --- builders -----------------------------------------------------------------------------------


def _check_counts(name: str, num_ranks: int, num_chunks: int) -> None:
  for arg, value in (("num_ranks", num_ranks), ("num_chunks", num_chunks)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}: {arg} must be a positive int, got {value!r}")


def _linear(name: str, num_ranks: int, num_chunks: int,
            rank_ops: Callable[[int], list[Op]]) -> Schedule:
  placement = (tuple((r, 0) for r in range(num_ranks)),)
  ops = tuple(_resolve_w(rank_ops(r)) for r in range(num_ranks))
  return Schedule(name, num_ranks, num_chunks, placement, (tuple(range(num_chunks)),), ops)


def gpipe(num_ranks: int, num_chunks: int) -> Schedule:
  """GPipe: every forward, then every backward (in micro-batch order)."""
  _check_counts("gpipe", num_ranks, num_chunks)
  def rank_ops(r: int) -> list[Op]:
    return ([Op("F", Chunk(0, r, i)) for i in range(num_chunks)]
            + [Op("B", Chunk(0, r, i)) for i in range(num_chunks)])
  return _linear("gpipe", num_ranks, num_chunks, rank_ops)


def one_f_one_b(num_ranks: int, num_chunks: int) -> Schedule:
  """1F1B: ``P-1-r`` warmup forwards, then alternate F and B, then the last Bs."""
  _check_counts("1f1b", num_ranks, num_chunks)
  def rank_ops(r: int) -> list[Op]:
    warmup = min(num_ranks - 1 - r, num_chunks)
    ops = [Op("F", Chunk(0, r, i)) for i in range(warmup)]
    for i in range(num_chunks - warmup):
      ops += [Op("F", Chunk(0, r, warmup + i)), Op("B", Chunk(0, r, i))]
    ops += [Op("B", Chunk(0, r, i)) for i in range(num_chunks - warmup, num_chunks)]
    return ops
  return _linear("1f1b", num_ranks, num_chunks, rank_ops)


def zb1p(num_ranks: int, num_chunks: int) -> Schedule:
  """ZB-H1: 1F1B's F/B order with B split into I and W; rank r defers r Ws.

  The deferred weight gradients of the later ranks fill the cooldown, which
  shortens the input-gradient chain back to rank 0: the bubble drops from
  1F1B's ``(P-1)(F+B)`` to ``(P-1)(F+B-2W)`` at the same in-flight activations.
  """
  _check_counts("zb1p", num_ranks, num_chunks)
  def rank_ops(r: int) -> list[Op]:
    warmup = min(num_ranks - 1 - r, num_chunks)
    ops = [Op("F", Chunk(0, r, i)) for i in range(warmup)]
    pending = 0  # Is whose W has not been placed yet
    def backward(i: int) -> list[Op]:
      nonlocal pending
      out = [Op("I", Chunk(0, r, i))]
      pending += 1
      if pending > r:
        out.append(Op("W", None))
        pending -= 1
      return out
    for i in range(num_chunks - warmup):
      ops += [Op("F", Chunk(0, r, warmup + i))] + backward(i)
    for i in range(num_chunks - warmup, num_chunks):
      ops += backward(i)
    return ops + [Op("W", None)] * pending
  return _linear("zb1p", num_ranks, num_chunks, rank_ops)


def _dual_steps(half: int, h: int, m: int, middle: bool,
                fwd: Callable[[int], Op], bwd: Callable[[int, bool], Op],
                both: Callable[[int, int], Op]) -> list[Op]:
  """DeepSeek's eight steps of ``DualPipe.step`` for one rank, in phase terms.

  ``half`` = H (P/2 for DualPipe, N for DualPipeV), ``h`` = the rank's distance
  from its end of the pipeline, ``m`` = micro-batches per phase. ``fwd(phase)``,
  ``bwd(phase, zero_bubble)`` and ``both(f_phase, b_phase)`` make the ops and
  advance that phase's micro-batch counter. ``middle``: the rank where the two
  phases meet, which runs step 4's first F0 and B1 un-overlapped.
  """
  w = Op("W", None)
  ops: list[Op] = []
  ops += [fwd(0) for _ in range(2 * (half - h - 1))]                        # 1: nF0
  for _ in range(h + 1):                                                    # 2: nF0F1
    ops += [fwd(0), fwd(1)]
  for _ in range(half - h - 1):                                             # 3: nB1W1F1
    ops += [bwd(1, True), w, fwd(1)]
  for i in range(m - 2 * half + h + 1):                                     # 4: main
    if i == 0 and middle:
      ops += [fwd(0), bwd(1, False)]
    else:
      ops.append(both(0, 1))
    ops.append(both(1, 0))
  for _ in range(half - h - 1):                                             # 5: nB1F1B0
    ops += [bwd(1, False), both(1, 0)]
  switch = (h + 1) // 2                                                     # 6: nB1B0
  for i in range(h + 1):
    ops.append(bwd(1, i > switch or (i == switch and h % 2 == 1)))
    ops.append(bwd(0, i >= switch))
  for _ in range(half - h - 1):                                             # 7: nWB0
    ops += [w, bwd(0, True)]
  ops += [w] * (h + 1)                                                      # 8: nW
  return ops


def _phase_ops(half: int, h: int, m: int, middle: bool,
               chunk: Callable[[int, int], Chunk]) -> list[Op]:
  """Runs ``_dual_steps`` with per-phase micro-batch counters; ``chunk(phase, mb)``."""
  nf, nb = [0, 0], [0, 0]
  def fwd(phase: int) -> Op:
    nf[phase] += 1
    return Op("F", chunk(phase, nf[phase] - 1))
  def bwd(phase: int, zero_bubble: bool) -> Op:
    nb[phase] += 1
    return Op("I" if zero_bubble else "B", chunk(phase, nb[phase] - 1))
  def both(f_phase: int, b_phase: int) -> Op:
    f, b = fwd(f_phase), bwd(b_phase, False)
    return Op("FB", f.chunk, b.chunk)
  return _resolve_w(_dual_steps(half, h, m, middle, fwd, bwd, both))


def dualpipe(num_ranks: int, num_chunks: int) -> Schedule:
  """DeepSeek's bidirectional DualPipe on ``num_ranks`` (even) ranks.

  Requires ``num_chunks`` even and at least ``2 * num_ranks``. Bubble
  ``(P/2-1)(F&B+B-3W)``; peak in-flight activations ``P+1``; 2x parameters.
  """
  _check_counts("dualpipe", num_ranks, num_chunks)
  p = num_ranks
  if p % 2:
    raise ValueError(f"dualpipe: the number of pipeline ranks must be even, got {p}")
  if num_chunks % 2 or num_chunks < 2 * p:
    raise ValueError(f"dualpipe: num_chunks must be even and at least 2 * ranks = {2 * p}, "
                     f"got {num_chunks}")
  half, m = p // 2, num_chunks // 2
  placement = (tuple((s, 0) for s in range(p)), tuple((p - 1 - s, 1) for s in range(p)))
  ops = []
  for r in range(p):
    second = r >= half
    def chunk(phase: int, mb: int, r=r, second=second) -> Chunk:
      path = phase ^ second  # phase 0 is the path the rank is in the first half of
      return Chunk(path, r if path == 0 else p - 1 - r, mb)
    h = min(r, p - 1 - r)
    ops.append(tuple(_phase_ops(half, h, m, h == half - 1, chunk)))
  return Schedule("dualpipe", p, num_chunks, placement,
                  (tuple(range(m)), tuple(range(m, num_chunks))), tuple(ops))


def dualpipev(num_ranks: int, num_chunks: int) -> Schedule:
  """DualPipeV ("cut-in-half" DualPipe): ``N`` ranks run ``2N`` stages in a V.

  Requires ``num_chunks >= 2 * num_ranks``. Same bubble as DualPipe with
  ``PP = 2N`` stages on half the devices, no parameter duplication.
  """
  _check_counts("dualpipev", num_ranks, num_chunks)
  n = num_ranks
  if num_chunks < 2 * n:
    raise ValueError(f"dualpipev: num_chunks must be at least 2 * ranks = {2 * n}, "
                     f"got {num_chunks}")
  placement = (tuple((s, 0) if s < n else (2 * n - 1 - s, 1) for s in range(2 * n)),)
  ops = []
  for r in range(n):
    def chunk(phase: int, mb: int, r=r) -> Chunk:
      return Chunk(0, r if phase == 0 else 2 * n - 1 - r, mb)
    ops.append(tuple(_phase_ops(n, r, num_chunks, r == n - 1, chunk)))
  return Schedule("dualpipev", n, num_chunks, placement, (tuple(range(num_chunks)),),
                  tuple(ops))


_BUILDERS: dict[str, Callable[[int, int], Schedule]] = {
    "gpipe": gpipe, "1f1b": one_f_one_b, "zb1p": zb1p, "dualpipe": dualpipe,
    "dualpipev": dualpipev}


def make_schedule(name: str, num_ranks: int, num_chunks: int) -> Schedule:
  """The schedule ``name`` (one of ``SCHEDULES``) for ``num_ranks`` ranks."""
  if name not in _BUILDERS:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
  return _BUILDERS[name](num_ranks, num_chunks)


def stages_for(name: str, num_ranks: int) -> int:
  """Stages the schedule ``name`` runs on ``num_ranks`` ranks (2N for dualpipev)."""
  if name not in _BUILDERS:
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {name!r}")
  return 2 * num_ranks if name == "dualpipev" else num_ranks


def _resolve_w(ops: Sequence[Op]) -> tuple[Op, ...]:
  """Names the chunk of every ``W``: the oldest ``I`` without one (FIFO)."""
  queue: collections.deque[Chunk] = collections.deque()
  out = []
  for op in ops:
    if op.kind == "I":
      queue.append(op.chunk)
    if op.kind == "W" and op.chunk is None:
      if not queue:
        raise ValueError("schedule: a W with no deferred weight gradient before it")
      op = Op("W", queue.popleft())
    out.append(op)
  return tuple(out)


# --- dependencies, list scheduling, invariants --------------------------------------------------


def dependencies(schedule: Schedule, op: Op) -> list[tuple[str, Chunk]]:
  """What ``op`` waits for, as ``(kind, chunk)`` with kind ``"F"``, ``"B"`` or ``"I"``.

  ``"B"`` means the input gradient of that chunk (from a B, I or FB). ``"I"``
  (for a W) means the chunk's own deferred backward.
  """
  deps = []
  fwd = op.forward_chunk()
  if fwd is not None and fwd.stage > 0:
    deps.append(("F", dataclasses.replace(fwd, stage=fwd.stage - 1)))
  bwd = op.backward_chunk()
  if bwd is not None:
    deps.append(("F", bwd))
    if bwd.stage < schedule.num_stages - 1:
      deps.append(("B", dataclasses.replace(bwd, stage=bwd.stage + 1)))
  if op.kind == "W":
    deps.append(("I", op.chunk))
  return deps


def _produced(op: Op) -> list[tuple[str, Chunk]]:
  out = []
  if op.forward_chunk() is not None:
    out.append(("F", op.forward_chunk()))
  if op.backward_chunk() is not None:
    out.append(("B", op.backward_chunk()))
  if op.kind == "I":
    out.append(("I", op.chunk))
  return out


def list_schedule(schedule: Schedule, duration: Callable[[Op], float], comm: float = 0.0
                  ) -> tuple[list[list[float]], list[list[float]]]:
  """Start and end time of every op: each rank runs its ops in order, each as
  soon as the rank is free and its inputs have arrived (``comm`` after the op
  that made them, when that op ran on another rank).

  Returns ``(start[rank][i], end[rank][i])``. Raises ``ValueError`` naming the
  stuck ops when the op orders deadlock (an op placed before its dependencies).
  """
  ready: dict[tuple[str, Chunk], tuple[float, int]] = {}
  start = [[0.0] * len(ops) for ops in schedule.ops]
  end = [[0.0] * len(ops) for ops in schedule.ops]
  pos = [0] * schedule.num_ranks
  free = [0.0] * schedule.num_ranks
  remaining = sum(len(ops) for ops in schedule.ops)
  while remaining:
    progress = False
    for r, ops in enumerate(schedule.ops):
      while pos[r] < len(ops):
        op = ops[pos[r]]
        deps = dependencies(schedule, op)
        if any(d not in ready for d in deps):
          break
        t = free[r]
        for d in deps:
          done, rank = ready[d]
          t = max(t, done + (comm if rank != r else 0.0))
        start[r][pos[r]], end[r][pos[r]] = t, t + duration(op)
        free[r] = end[r][pos[r]]
        for key in _produced(op):
          ready[key] = (free[r], r)
        pos[r] += 1
        remaining -= 1
        progress = True
    if not progress:
      stuck = [f"rank {r}: {schedule.label(ops[pos[r]])}"
               for r, ops in enumerate(schedule.ops) if pos[r] < len(ops)]
      raise ValueError(f"schedule {schedule.name}: deadlock, ops wait on dependencies that "
                       f"never run: {', '.join(stuck)}")
  return start, end


def check_schedule(schedule: Schedule) -> None:
  """Checks the invariants; raises ``ValueError`` naming the first violation.

  * every rank runs, for each (path, stage) it holds, each of the path's
    micro-batches forward exactly once and backward (B, I or FB) exactly once;
  * every I is followed on its rank by exactly one W of the same chunk, and
    every W has an I before it;
  * each op is on the rank its chunk is placed on, and the op orders run to the
    end without deadlock (no op before its dependencies).
  """
  for r, ops in enumerate(schedule.ops):
    fwd, bwd = collections.Counter(), collections.Counter()
    deferred, weighted = set(), set()
    for op in ops:
      for chunk in (op.chunk, op.backward):
        if chunk is not None and schedule.where(chunk.path, chunk.stage)[0] != r:
          raise ValueError(f"{schedule.name}: rank {r} runs {schedule.label(op)}, whose stage "
                           f"is placed on rank {schedule.where(chunk.path, chunk.stage)[0]}")
      if op.forward_chunk() is not None:
        fwd[op.forward_chunk()] += 1
      if op.backward_chunk() is not None:
        bwd[op.backward_chunk()] += 1
      if op.kind == "I":
        deferred.add(op.chunk)
      if op.kind == "W":
        if op.chunk not in deferred or op.chunk in weighted:
          raise ValueError(f"{schedule.name}: rank {r}: W of {op.chunk} without a single "
                           "deferred backward before it")
        weighted.add(op.chunk)
    if deferred != weighted:
      raise ValueError(f"{schedule.name}: rank {r}: deferred weight gradients never run: "
                       f"{sorted(deferred - weighted)}")
    expected = collections.Counter(
        Chunk(path, stage, mb)
        for path, stages in enumerate(schedule.placement)
        for stage, (rank, _) in enumerate(stages) if rank == r
        for mb in range(len(schedule.path_chunks[path])))
    for name, counts in (("forward", fwd), ("backward", bwd)):
      if counts != expected:
        missing = sorted((expected - counts).elements())
        extra = sorted((counts - expected).elements())
        raise ValueError(f"{schedule.name}: rank {r} {name}s: missing {missing[:4]}, "
                         f"extra {extra[:4]}")
  list_schedule(schedule, lambda op: 1.0)


def tick_table(schedule: Schedule) -> list[list[Op | None]]:
  """The static ``[tick][rank] -> op or None`` table the executor runs.

  Every op takes one tick; data made at tick t is usable from tick t+1 (the
  ``ppermute`` at the end of each tick carries it), the op order of each rank is
  kept, and each op runs at the first tick its inputs allow.
  """
  start, _ = list_schedule(schedule, lambda op: 1.0)
  num_ticks = 1 + max((int(t) for row in start for t in row), default=-1)
  table: list[list[Op | None]] = [[None] * schedule.num_ranks for _ in range(num_ticks)]
  for r, ops in enumerate(schedule.ops):
    for i, op in enumerate(ops):
      table[int(start[r][i])][r] = op
  return table


def tick_sends(schedule: Schedule, table: list[list[Op | None]] | None = None
               ) -> list[list[list[tuple[int, str, Chunk]]]]:
  """What each op of the tick table sends: ``[tick][rank]`` -> ``(to_rank, what, chunk)``.

  ``what`` is ``"act"`` (a forward's output, the input of ``chunk``) or
  ``"grad"`` (a backward's input gradient, the output gradient of ``chunk``).
  ``to_rank`` is r+1 or r-1, or r itself for a hand-off on the rank (DualPipeV's
  turn of the V). The executor carries remote sends with one ``ppermute`` per
  direction at the end of the tick.
  """
  table = tick_table(schedule) if table is None else table
  out = []
  for row in table:
    tick = []
    for op in row:
      sends = []
      if op is not None:
        fwd, bwd = op.forward_chunk(), op.backward_chunk()
        if fwd is not None and fwd.stage + 1 < schedule.num_stages:
          nxt = dataclasses.replace(fwd, stage=fwd.stage + 1)
          sends.append((schedule.where(nxt.path, nxt.stage)[0], "act", nxt))
        if bwd is not None and bwd.stage > 0:
          prev = dataclasses.replace(bwd, stage=bwd.stage - 1)
          sends.append((schedule.where(prev.path, prev.stage)[0], "grad", prev))
      tick.append(sends)
    out.append(tick)
  return out
