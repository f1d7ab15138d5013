"""Dependency-driven event simulation of a schedule, and its timeline picture."""

from __future__ import annotations

import dataclasses

from jaxinfra.pipeline.schedules import Op, Schedule, list_schedule


@dataclasses.dataclass(frozen=True)
class SimResult:
  """What :func:`simulate` finds.

  Attributes:
    makespan: time from the first op's start to the last op's end.
    busy: per rank, the summed durations of its ops.
    bubble: per rank, ``makespan - busy`` (its idle time).
    peak_activations: per rank, the most chunks whose forward has run and whose
      backward (B, I, or FB's backward) has not, at any point of its op order.
    start, end: ``[rank][i]`` start and end time of the rank's i-th op.
  """
  makespan: float
  busy: tuple[float, ...]
  bubble: tuple[float, ...]
  peak_activations: tuple[int, ...]
  start: tuple[tuple[float, ...], ...]
  end: tuple[tuple[float, ...], ...]

  @property
  def max_bubble(self) -> float:
    """The worst rank's idle time: the figure DualPipe's README tabulates."""
    return max(self.bubble)


def op_time(op: Op, *, F: float, B: float, W: float, FB: float | None = None,  # pylint: disable=invalid-name
            I: float | None = None) -> float:  # pylint: disable=invalid-name
  """Duration of ``op``: F, B (full backward), I (default B - W), W, FB (default F + B)."""
  return {"F": F, "B": B, "I": B - W if I is None else I, "W": W,
          "FB": F + B if FB is None else FB}[op.kind]


def simulate(schedule: Schedule, *, F: float = 1.0, B: float = 2.0, W: float = 1.0,  # pylint: disable=invalid-name
             FB: float | None = None, comm: float = 0.0, I: float | None = None  # pylint: disable=invalid-name
             ) -> SimResult:
  """Runs ``schedule`` on a timeline.

  Each rank runs its ops in order, each as soon as the rank is free and its
  inputs have arrived; an input made on another rank arrives ``comm`` after the
  op that made it ends.

  Args:
    schedule: from :func:`jaxinfra.pipeline.make_schedule`.
    F: time of one chunk's forward.
    B: time of one chunk's full backward (input and weight gradient).
    W: time of the weight-gradient part of B (an ``I`` op takes ``B - W``).
    FB: time of one overlapped forward + backward pair; default ``F + B``.
    comm: point-to-point latency between ranks.
    I: time of the input-gradient half of a split backward; default ``B - W``
      (a split costs nothing). Give it when a split backward costs more, as in
      this package's executor, whose W recomputes the cotangents inside the
      stage that the weight gradients need.

  Returns:
    A :class:`SimResult`.
  """
  for name, value in (("F", F), ("B", B), ("W", W), ("comm", comm)):
    if value < 0:
      raise ValueError(f"simulate: {name} must be >= 0, got {value}")
  if W > B:
    raise ValueError(f"simulate: W (weight-gradient part of B) must be <= B, got W={W}, B={B}")
  if I is not None and I < 0:
    raise ValueError(f"simulate: I must be >= 0, got {I}")
  duration = lambda op: op_time(op, F=F, B=B, W=W, FB=FB, I=I)
  start, end = list_schedule(schedule, duration, comm)
  makespan = max((t for row in end for t in row), default=0.0)
  busy = tuple(sum(duration(op) for op in ops) for ops in schedule.ops)
  return SimResult(makespan=makespan, busy=busy, bubble=tuple(makespan - b for b in busy),
                   peak_activations=tuple(_peak_activations(ops) for ops in schedule.ops),
                   start=tuple(map(tuple, start)), end=tuple(map(tuple, end)))


def _peak_activations(ops) -> int:
  live = peak = 0
  for op in ops:
    if op.forward_chunk() is not None:
      live += 1
      peak = max(peak, live)
    if op.backward_chunk() is not None:
      live -= 1
  return peak


_COLORS = {  # (path 0, path 1): DualPipe's README uses one hue per direction
    "F": ("#f6c343", "#f59e42"), "B": ("#7fb3e6", "#5b8fd6"), "I": ("#9fd49a", "#6dbf68"),
    "W": ("#c5a3e0", "#a77bd0"), "FB": ("#e88f8f", "#d96666")}


def plot_schedule(schedule: Schedule, path: str, *, F: float = 1.0, B: float = 2.0,  # pylint: disable=invalid-name
                  W: float = 1.0, FB: float | None = None, comm: float = 0.0,
                  I: float | None = None, title: str | None = None  # pylint: disable=invalid-name
                  ) -> SimResult:
  """Draws the simulated timeline of ``schedule`` as a PNG at ``path``.

  One row per rank; each op is a box as long as its simulated duration,
  labelled with its micro-batch (``F&B`` boxes with both), coloured by kind and
  shaded by direction; the idle gaps are the bubbles. Returns the simulation.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib.patches import Patch  # pylint: disable=g-import-not-at-top

  result = simulate(schedule, F=F, B=B, W=W, FB=FB, comm=comm, I=I)
  width = max(8.0, min(40.0, result.makespan * 0.35))
  fig, ax = plt.subplots(figsize=(width, 0.5 * schedule.num_ranks + 1.4))
  for r, ops in enumerate(schedule.ops):
    for op, t0, t1 in zip(ops, result.start[r], result.end[r]):
      ax.barh(r, t1 - t0, left=t0, height=0.85, color=_COLORS[op.kind][op.chunk.path],
              edgecolor="black", linewidth=0.5)
      text = (f"{op.chunk.mb}" if op.kind != "FB"
              else f"{op.chunk.mb}|{op.backward.mb}")
      ax.text((t0 + t1) / 2, r, text, ha="center", va="center", fontsize=7)
  ax.set_yticks(range(schedule.num_ranks))
  ax.set_yticklabels([f"rank {r}" for r in range(schedule.num_ranks)])
  ax.invert_yaxis()
  ax.set_xlim(0, result.makespan)
  ax.set_xlabel("time")
  kinds = {"F": "forward", "B": "backward", "I": "input-grad backward",
           "W": "weight grad", "FB": "overlapped F&B"}
  used = {op.kind for ops in schedule.ops for op in ops}
  ax.legend(handles=[Patch(color=_COLORS[k][0], label=v) for k, v in kinds.items() if k in used],
            loc="upper center", bbox_to_anchor=(0.5, -0.35 if schedule.num_ranks < 4 else -0.12),
            ncol=len(used), fontsize=8, frameon=False)
  ax.set_title(title or (f"{schedule.name}: {schedule.num_ranks} ranks, "
                         f"{schedule.num_stages} stages, {schedule.num_chunks} micro-batches; "
                         f"makespan {result.makespan:g}, worst bubble {result.max_bubble:g}"),
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return result
