"""Pipeline schedules: published op orders, invariants, bubble formulas, tick tables."""

import dataclasses

import pytest

from jaxinfra import pipeline as pl
from jaxinfra.pipeline import schedules as sched_lib

# DualPipe's README example (P=4, 8 micro-batches), ranks 0 and 1; Bi = backward with the
# weight gradient deferred, W = one deferred weight gradient.
_DUALPIPE_P4_C8 = {
    0: "F0.0 F0.1 F0.2 F1.0 Bi1.0 W F1.1 F0.3&B1.1 F1.2&B0.0 B1.2 F1.3&B0.1 B1.3 Bi0.2 W "
       "Bi0.3 W",
    1: "F0.0 F1.0 F0.1 F1.1 F0.2 B1.0 F1.2&B0.0 F0.3&B1.1 F1.3&B0.1 B1.2 B0.2 Bi1.3 Bi0.3 W W",
}


def _labels(schedule, rank, *, bare_w=True):
  out = []
  for op in schedule.ops[rank]:
    out.append("W" if bare_w and op.kind == "W" else schedule.label(op))
  return " ".join(out)


def test_dualpipe_matches_the_published_example():
  s = pl.dualpipe(4, 8)
  for rank, expected in _DUALPIPE_P4_C8.items():
    assert _labels(s, rank) == expected
  # The Ws pop the deferred backwards in FIFO order.
  assert [s.label(op) for op in s.ops[0] if op.kind == "W"] == ["W1.0", "W0.2", "W0.3"]
  # Ranks r and P-1-r run the same sequence with the two directions swapped.
  for r in range(4):
    mirror = [dataclasses.replace(op, chunk=_flip(op.chunk), backward=_flip(op.backward))
              for op in s.ops[3 - r]]
    assert list(s.ops[r]) == mirror


def _flip(chunk):
  if chunk is None:
    return None
  return sched_lib.Chunk(1 - chunk.path, chunk.stage, chunk.mb)


def test_dualpipev_matches_the_readme_figure():
  # DualPipeV, 4 ranks, 10 micro-batches, rank 0: F0.0-F0.6, F1.0, (Bi1.0 W F1.1)..., F1.3,
  # F0.7&B1.3, F1.4&B0.0, ...
  s = pl.dualpipev(4, 10)
  expected = ([f"F0.{i}" for i in range(7)] + ["F1.0", "Bi1.0", "W", "F1.1", "Bi1.1", "W",
                                               "F1.2", "Bi1.2", "W", "F1.3", "F0.7&B1.3",
                                               "F1.4&B0.0"])
  assert _labels(s, 0).split()[:len(expected)] == expected


@pytest.mark.parametrize("ranks,chunks", [(2, 4), (4, 10), (8, 16)])
def test_dualpipev_is_the_first_half_of_dualpipe(ranks, chunks):
  """DualPipeV on N ranks runs ranks 0..N-1 of DualPipe with 2N ranks and 2x chunks."""
  v = pl.dualpipev(ranks, chunks)
  d = pl.dualpipe(2 * ranks, 2 * chunks)
  for r in range(ranks):
    assert _labels(v, r, bare_w=False) == _labels(d, r, bare_w=False)


_CASES = ([(name, p, c) for name in ("gpipe", "1f1b", "zb1p") for p in (1, 2, 3, 4, 8)
           for c in (1, p, 2 * p + 1)]
          + [("dualpipe", p, c) for p in (2, 4, 6, 8, 16) for c in (2 * p, 2 * p + 2, 4 * p)]
          + [("dualpipev", n, c) for n in (1, 2, 3, 4, 8) for c in (2 * n, 2 * n + 1, 5 * n)])


@pytest.mark.parametrize("name,ranks,chunks", _CASES)
def test_every_schedule_passes_the_invariants(name, ranks, chunks):
  s = pl.make_schedule(name, ranks, chunks)
  pl.check_schedule(s)  # M forwards and backwards per (path, stage), every W, no deadlock
  assert s.num_stages == pl.stages_for(name, ranks)
  per_rank = 2 if name in ("dualpipe", "dualpipev") else 1
  for r in range(ranks):
    fwd = sum(op.forward_chunk() is not None for op in s.ops[r])
    bwd = sum(op.backward_chunk() is not None for op in s.ops[r])
    m = chunks // 2 if name == "dualpipe" else chunks
    assert fwd == bwd == per_rank * m
    deferred = sum(op.kind == "I" for op in s.ops[r])
    assert deferred == sum(op.kind == "W" for op in s.ops[r])
    if name in ("dualpipe", "dualpipev"):
      half = ranks // 2 if name == "dualpipe" else ranks
      h = min(r, ranks - 1 - r) if name == "dualpipe" else r
      assert deferred == 2 * half - h - 1  # DualPipe's count of zero-bubble backwards
  # The tick table places each op once, after its dependencies.
  table = pl.tick_table(s)
  when = {}
  for t, row in enumerate(table):
    for r, op in enumerate(row):
      if op is not None:
        assert (r, op) not in when
        when[(r, op)] = t
  assert len(when) == sum(len(ops) for ops in s.ops)
  made = {}
  for (r, op), t in when.items():
    for key in sched_lib._produced(op):  # pylint: disable=protected-access
      made[key] = t
  for (r, op), t in when.items():
    for dep in sched_lib.dependencies(s, op):
      assert made[dep] < t, (r, s.label(op), dep)
  # Every send goes to a neighbour (or stays on the rank) and reaches the rank that runs the
  # chunk; each chunk's input and output gradient is sent exactly once.
  sent = []
  for t, row in enumerate(pl.tick_sends(s, table)):
    for r, sends in enumerate(row):
      for to, what, chunk in sends:
        assert abs(to - r) <= 1 and to == s.where(chunk.path, chunk.stage)[0]
        sent.append((what, chunk))
  assert len(sent) == len(set(sent))
  inner = sum(len(p) for p in s.path_chunks) * (s.num_stages - 1)
  assert sum(w == "act" for w, _ in sent) == sum(w == "grad" for w, _ in sent) == inner


def test_check_schedule_catches_broken_schedules():
  s = pl.one_f_one_b(4, 8)
  ops = list(s.ops[1])
  ops[0], ops[-1] = ops[-1], ops[0]  # a backward before its forward
  with pytest.raises(ValueError, match="deadlock"):
    pl.check_schedule(dataclasses.replace(s, ops=(s.ops[0], tuple(ops)) + s.ops[2:]))
  z = pl.zb1p(4, 8)
  no_w = tuple(tuple(op for op in ops if op.kind != "W") for ops in z.ops)
  with pytest.raises(ValueError, match="never run"):
    pl.check_schedule(dataclasses.replace(z, ops=no_w))
  dropped = (z.ops[0][1:],) + z.ops[1:]
  with pytest.raises(ValueError, match="missing"):
    pl.check_schedule(dataclasses.replace(z, ops=dropped))


# (F, B, W) with F = B - W, the published setting (the README figure is F=1, B=2, W=1): there
# the formulas are exact. FB is the overlapped pair: no overlap (F+B) down to max(F, B).
_TIMES = [(1.0, 2.0, 1.0), (2.0, 3.0, 1.0), (1.0, 1.5, 0.5)]


@pytest.mark.parametrize("pp", [4, 8, 16])
@pytest.mark.parametrize("f,b,w", _TIMES)
def test_simulated_bubbles_equal_the_published_formulas(pp, f, b, w):
  for chunks in (2 * pp, 2 * pp + 6, 4 * pp):
    one = pl.simulate(pl.one_f_one_b(pp, chunks), F=f, B=b, W=w)
    assert one.bubble == pytest.approx([(pp - 1) * (f + b)] * pp)
    zb = pl.simulate(pl.zb1p(pp, chunks), F=f, B=b, W=w)
    assert zb.max_bubble == pytest.approx((pp - 1) * (f + b - 2 * w))
    for fb in (f + b, f + b - 0.5, max(f, b)):
      formula = (pp / 2 - 1) * (fb + b - 3 * w)
      dual = pl.simulate(pl.dualpipe(pp, chunks), F=f, B=b, W=w, FB=fb)
      assert dual.max_bubble == pytest.approx(formula)
      v = pl.simulate(pl.dualpipev(pp // 2, chunks), F=f, B=b, W=w, FB=fb)
      assert v.max_bubble == pytest.approx(formula)
      # Each rank is busy for all of its ops; the makespan is busy time plus bubble.
      assert dual.makespan == pytest.approx(max(dual.busy) + min(dual.bubble))


@pytest.mark.parametrize("pp", [4, 8, 16])
def test_peak_in_flight_activations(pp):
  assert max(pl.simulate(pl.dualpipe(pp, 2 * pp)).peak_activations) == pp + 1
  assert max(pl.simulate(pl.dualpipe(pp, 6 * pp)).peak_activations) == pp + 1
  assert max(pl.simulate(pl.dualpipev(pp // 2, 3 * pp)).peak_activations) == pp + 1
  assert max(pl.simulate(pl.one_f_one_b(pp, 3 * pp)).peak_activations) == pp
  assert max(pl.simulate(pl.zb1p(pp, 3 * pp)).peak_activations) == pp
  assert max(pl.simulate(pl.gpipe(pp, 3 * pp)).peak_activations) == 3 * pp


def test_simulate_hand_computed_cases():
  # 1F1B on 2 ranks, 2 micro-batches, F=1, B=2: rank 0 F0 F1 . . B0 . B1 ends at 1+1+... :
  # F0[0,1] F1[1,2] on r0; F0[1,2] B0[2,4] F1[4,5] B1[5,7] on r1; B0 on r0 [4,6], B1 [7,9].
  s = pl.one_f_one_b(2, 2)
  r = pl.simulate(s, F=1, B=2, W=1)
  assert r.makespan == 9 and r.busy == (6, 6) and r.bubble == (3, 3)
  assert r.start[0] == (0, 1, 4, 7) and r.start[1] == (1, 2, 4, 5)
  # Communication latency delays each hop of the critical path F0(r0) -> F0 B0 F1 B1 (r1)
  # -> B1(r0): two hops.
  slow = pl.simulate(s, F=1, B=2, W=1, comm=0.5)
  assert slow.makespan == 9 + 2 * 0.5
  assert slow.start[1] == (1.5, 2.5, 4.5, 5.5) and slow.start[0][3] == 8
  with pytest.raises(ValueError, match="W"):
    pl.simulate(s, F=1, B=1, W=2)
  with pytest.raises(ValueError, match="comm"):
    pl.simulate(s, comm=-1)


def test_bad_arguments_name_the_requirement():
  with pytest.raises(ValueError, match="must be even"):
    pl.dualpipe(3, 12)
  with pytest.raises(ValueError, match="at least 2 \\* ranks = 8"):
    pl.dualpipe(4, 6)
  with pytest.raises(ValueError, match="even"):
    pl.dualpipe(4, 9)
  with pytest.raises(ValueError, match="at least 2 \\* ranks = 8"):
    pl.dualpipev(4, 7)
  with pytest.raises(ValueError, match="schedule must be one of"):
    pl.make_schedule("interleaved", 4, 8)
  with pytest.raises(ValueError, match="num_chunks must be a positive int"):
    pl.one_f_one_b(4, 0)


def test_plot_schedule_writes_a_png(tmp_path):
  import matplotlib.image  # pylint: disable=g-import-not-at-top
  path = tmp_path / "dualpipe.png"
  result = pl.plot_schedule(pl.dualpipe(8, 20), str(path), FB=3)
  assert result.max_bubble == pytest.approx(6)  # (8/2-1)(3+2-3)
  image = matplotlib.image.imread(str(path))
  assert image.shape[0] > 100 and image.shape[1] > 500
  assert image[..., :3].std() > 0.05  # not a blank canvas
