"""Profiling: capture a ``jax.profiler`` trace of jitted steps, and report per device
how long compute and communication ran and how much of them overlapped.

Capture (what ``--profile`` in the pipelines calls)::

    compiled = train_step.lower(state, batch).compile()   # optional: exact op kinds

    def one_step(i):
      nonlocal state
      state, metrics = train_step(state, batch)
      return metrics                      # blocked on, so the step is in the trace

    cap = profile.capture_steps(one_step, "runs/profile/train", steps=3, hlo=[compiled])

or, around any code, ``with profile.capture("runs/profile/decode", hlo=[compiled]): ...``
(block on the results inside the ``with``).

Report (``jaxinfra profile-report runs/profile/train``, or :func:`report`):
reads the Chrome/Perfetto JSON trace ``jax.profiler`` writes
(``plugins/profile/<run>/<host>.trace.json.gz``; else ``perfetto_trace.json.gz``,
else the ``<host>.xplane.pb`` through ``jax.profiler.ProfileData``), takes the XLA op events of
each device (on CPU the thunk events carry ``hlo_op`` and ``device_ordinal``;
on GPU/TPU the ``/device:...`` processes), keeps the innermost ones (a ``while``
op encloses its body's ops), classifies each as communication (all-reduce,
all-gather, reduce-scatter, all-to-all, collective-permute, send/recv,
collective-broadcast) or compute, and per device gives:

* compute: the time at least one compute op ran (union of intervals);
* communication: the time at least one collective ran, and per collective kind;
* overlap: the time both ran at once; exposed communication = comm - overlap.

Op kinds come from the compiled HLO's opcodes when the capture saved them
(``hlo_ops.json``, from ``hlo=``), otherwise from the op names (``psum``,
``all-gather-start``, ``ppermute``, ...). On CPU a collective's time includes
waiting for the other devices to reach it (the rendezvous), as on GPU a NCCL
kernel's time includes waiting for its peers. Times are microseconds on the
trace's clock; traces of several processes are each relative to their own start.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import glob
import gzip
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

COMM_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
              "send/recv", "collective-broadcast")
COMPUTE = "compute"
HLO_OPS_FILE = "hlo_ops.json"

_OPCODE_KIND = {
    "all-reduce": "all-reduce", "all-reduce-start": "all-reduce", "all-reduce-done": "all-reduce",
    "all-gather": "all-gather", "all-gather-start": "all-gather", "all-gather-done": "all-gather",
    "reduce-scatter": "reduce-scatter",
    "all-to-all": "all-to-all", "ragged-all-to-all": "all-to-all",
    "collective-permute": "collective-permute",
    "collective-permute-start": "collective-permute",
    "collective-permute-done": "collective-permute",
    "send": "send/recv", "send-done": "send/recv", "recv": "send/recv", "recv-done": "send/recv",
    "collective-broadcast": "collective-broadcast",
}
# Ops that only enclose other ops (their time is their body's).
_CONTAINER_OPCODES = frozenset({"while", "conditional", "call"})
# Op-name fallbacks, most specific first: XLA opcodes, JAX primitive names
# (psum, ppermute, ...) and NCCL kernel names.
_NAME_KINDS = (
    ("reduce-scatter", re.compile(r"reduce[-_]?scatter|psum[-_]?scatter", re.I)),
    ("all-reduce", re.compile(r"all[-_]?reduce|psum|pmax|pmin", re.I)),
    ("all-gather", re.compile(r"all[-_]?gather", re.I)),
    ("all-to-all", re.compile(r"all[-_]?to[-_]?all", re.I)),
    ("collective-permute", re.compile(r"collective[-_]?permute|ppermute", re.I)),
    ("collective-broadcast", re.compile(r"collective[-_]?broadcast", re.I)),
    ("send/recv", re.compile(r"(^|[^a-z])(send|recv)([^a-z]|$)|sendrecv", re.I)),
)
_CONTAINER_NAME = re.compile(r"^(while|conditional|call)(\.\d+)?$")


def op_kind(name: str, opcode: str | None = None) -> str:
  """``"compute"``, one of :data:`COMM_KINDS`, or ``"container"`` for an HLO op.

  ``opcode`` (from the compiled HLO) decides when given; otherwise, and for
  async wrappers (``async-start`` ...), the op's name does.
  """
  if opcode is not None:
    if opcode in _OPCODE_KIND:
      return _OPCODE_KIND[opcode]
    if opcode in _CONTAINER_OPCODES:
      return "container"
    if not opcode.startswith("async-"):
      return COMPUTE
  elif _CONTAINER_NAME.match(name):
    return "container"
  for kind, pattern in _NAME_KINDS:
    if pattern.search(name):
      return kind
  return COMPUTE


# ----------------------------------------------------------------------------
# Capture

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([^\s=(]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"\s*([a-z][a-z0-9\-]*)\(")


def _skip_shape(text: str) -> str:
  """``text`` after the leading shape (a tuple shape is parenthesized)."""
  if not text.startswith("("):
    return text.split(None, 1)[1] if " " in text else ""
  depth = 0
  for i, c in enumerate(text):
    depth += {"(": 1, ")": -1}.get(c, 0)
    if depth == 0:
      return text[i + 1:]
  return ""


def hlo_opcodes(hlo_text: str) -> dict[str, dict[str, str]]:
  """``{module name: {instruction name: opcode}}`` of compiled HLO text
  (``jax.stages.Compiled.as_text()``)."""
  modules: dict[str, dict[str, str]] = {}
  ops: dict[str, str] | None = None
  for line in hlo_text.splitlines():
    if line.startswith("HloModule "):
      ops = modules.setdefault(line.split()[1].rstrip(","), {})
      continue
    m = _INSTRUCTION.match(line)
    if ops is None or not m:
      continue
    op = _OPCODE.match(_skip_shape(m.group(2).strip()))
    if op:
      ops[m.group(1)] = op.group(1)
  return modules


def _hlo_text(item: Any) -> str:
  text = item if isinstance(item, str) else item.as_text()
  if "HloModule" not in text:
    raise ValueError("hlo entries must be compiled HLO: a str or a jax.stages.Compiled "
                     "(jitted.lower(*args).compile()), not a Lowered (StableHLO) module")
  return text


@dataclasses.dataclass
class Captured:
  """Where a capture went: ``log_dir`` (this process's), the trace files
  (filled when the trace stops), and the saved HLO opcodes, if any."""
  log_dir: str
  trace_files: list[str] = dataclasses.field(default_factory=list)
  hlo_ops_file: str | None = None


@contextlib.contextmanager
def capture(log_dir: str | os.PathLike, *, hlo: Iterable[Any] = ()) -> Iterator[Captured]:
  """Traces what runs inside the ``with`` block with ``jax.profiler.trace``.

  Args:
    log_dir: where to write; with several processes each writes to
      ``log_dir/process_<index>``.
    hlo: compiled programs (``jax.stages.Compiled`` or HLO text) of the traced
      steps: their opcodes are saved next to the trace so the report classifies
      ops exactly.

  Yields:
    A :class:`Captured`; its ``trace_files`` are set when the block exits.
  """
  import jax  # pylint: disable=g-import-not-at-top
  log_dir = os.fspath(log_dir)
  if jax.process_count() > 1:
    log_dir = os.path.join(log_dir, f"process_{jax.process_index()}")
  os.makedirs(log_dir, exist_ok=True)
  result = Captured(log_dir)
  modules: dict[str, dict[str, str]] = {}
  for item in hlo:
    for name, ops in hlo_opcodes(_hlo_text(item)).items():
      modules.setdefault(name, {}).update(ops)
  if modules:
    result.hlo_ops_file = os.path.join(log_dir, HLO_OPS_FILE)
    with open(result.hlo_ops_file, "w") as f:
      json.dump({"modules": modules}, f)
  before = set(_run_dirs(log_dir))
  with jax.profiler.trace(log_dir, create_perfetto_trace=True):
    yield result
  new = sorted(set(_run_dirs(log_dir)) - before) or sorted(_run_dirs(log_dir))[-1:]
  result.trace_files = [f for d in new for f in _trace_files_in_run(d)]


def capture_steps(step: Callable[[int], Any], log_dir: str | os.PathLike, *, steps: int = 3,
                  warmup: int = 1, hlo: Iterable[Any] = (), name: str = "step") -> Captured:
  """Runs ``step(i)`` for ``warmup`` untraced then ``steps`` traced iterations.

  ``step(i)`` runs one step (``i`` counts from 0 over warm-up and traced steps)
  and returns arrays; each result is blocked on, and each traced step is marked
  with ``jax.profiler.StepTraceAnnotation(name, step_num=i)``. Warm-up steps
  keep compilation out of the trace.

  Returns:
    The :class:`Captured` (see :func:`capture` for ``log_dir`` and ``hlo``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if steps < 1 or warmup < 0:
    raise ValueError(f"steps must be >= 1 and warmup >= 0, got steps={steps}, warmup={warmup}")
  for i in range(warmup):
    jax.block_until_ready(step(i))
  with capture(log_dir, hlo=hlo) as captured:
    for i in range(warmup, warmup + steps):
      with jax.profiler.StepTraceAnnotation(name, step_num=i):
        jax.block_until_ready(step(i))
  return captured


# ----------------------------------------------------------------------------
# Reading traces


def _run_dirs(root: str) -> list[str]:
  return [d for d in glob.glob(os.path.join(root, "**", "plugins", "profile", "*"),
                               recursive=True) if os.path.isdir(d)]


def _trace_files_in_run(run_dir: str) -> list[str]:
  # <host>.trace.json.gz per host; perfetto_trace.json.gz holds the same events,
  # and <host>.xplane.pb (always written) too.
  for pattern in ("*.trace.json.gz", "perfetto_trace.json.gz", "*.xplane.pb"):
    files = sorted(glob.glob(os.path.join(run_dir, pattern)))
    if files:
      return files
  return []


def find_trace_files(path: str | os.PathLike) -> list[str]:
  """The trace files of ``path``: the file itself, or under a directory the
  newest capture of each ``plugins/profile`` folder (one per process)."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(f"trace {path!r} does not exist")
  newest: dict[str, str] = {}
  for run in _run_dirs(path):
    parent = os.path.dirname(run)
    if _trace_files_in_run(run) and run > newest.get(parent, ""):
      newest[parent] = run
  files = [f for parent in sorted(newest) for f in _trace_files_in_run(newest[parent])]
  for pattern in ("*.trace.json*", "perfetto_trace.json*", "*.xplane.pb"):
    if not files:
      files = sorted(glob.glob(os.path.join(path, "**", pattern), recursive=True))
  if not files:
    raise FileNotFoundError(f"no jax.profiler trace (*.trace.json.gz, perfetto_trace.json.gz "
                            f"or *.xplane.pb) under {path!r}")
  return files


def _load_json(path: str) -> dict[str, Any]:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    trace_json = json.load(f)
  if isinstance(trace_json, list):
    trace_json = {"traceEvents": trace_json}
  if not isinstance(trace_json, dict) or "traceEvents" not in trace_json:
    raise ValueError(f"{path} is not a Chrome/Perfetto JSON trace (no traceEvents)")
  return trace_json


def _load_xplane(path: str) -> dict[str, Any]:
  """An ``.xplane.pb`` as the JSON trace's events (``jax.profiler.ProfileData``).

  Each plane is a process (``/host:CPU``, ``/device:GPU:0``, ...) and each line
  a thread; times become microseconds. Device planes' op events that carry no
  ``hlo_op`` stat (their op is the event's name) get it from the name.
  """
  from jax.profiler import ProfileData  # pylint: disable=g-import-not-at-top
  try:
    data = ProfileData.from_file(path)
  except Exception as e:  # the protobuf parser's error types are not public
    raise ValueError(f"{path} is not a readable XSpace (.xplane.pb): {e}") from e
  events: list[dict[str, Any]] = []
  for pid, plane in enumerate(data.planes):
    events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": plane.name}})
    for tid, line in enumerate(plane.lines):
      ops_line = plane.name.startswith("/device:") and "xla op" in line.name.lower()
      for e in line.events:
        args = dict(e.stats)
        if ops_line and "hlo_op" not in args:
          args["hlo_op"] = e.name
        events.append({"ph": "X", "pid": pid, "tid": tid, "name": e.name, "args": args,
                       "ts": e.start_ns / 1e3, "dur": e.duration_ns / 1e3})
  return {"traceEvents": events}


def _load_trace(path: str) -> dict[str, Any]:
  return _load_xplane(path) if path.endswith(".xplane.pb") else _load_json(path)


def _find_hlo_ops(files: Sequence[str], root: str) -> dict[str, dict[str, str]]:
  """Merged ``hlo_ops.json`` files of the captures (from each trace file up to ``root``)."""
  modules: dict[str, dict[str, str]] = {}
  seen = set()
  root = os.path.abspath(root if os.path.isdir(root) else os.path.dirname(root))
  for f in files:
    d = os.path.dirname(os.path.abspath(f))
    while True:
      candidate = os.path.join(d, HLO_OPS_FILE)
      if candidate not in seen and os.path.isfile(candidate):
        seen.add(candidate)
        with open(candidate) as fh:
          for name, ops in json.load(fh)["modules"].items():
            modules.setdefault(name, {}).update(ops)
      if d == root or os.path.dirname(d) == d or not d.startswith(root):
        break
      d = os.path.dirname(d)
  return modules


@dataclasses.dataclass(frozen=True)
class OpEvent:
  """One XLA op execution on one device; times in microseconds."""
  device: str
  name: str
  module: str
  kind: str  # "compute" or one of COMM_KINDS
  start: float
  duration: float
  run_id: str | None = None

  @property
  def end(self) -> float:
    return self.start + self.duration


def _device_label(args: dict[str, Any], process: str) -> str | None:
  if "device_ordinal" in args:  # CPU thunks: one host process, ordinal per event
    return f"device:{args['device_ordinal']}"
  if process.startswith("/device:"):  # GPU/TPU: one trace process per device
    return process[len("/device:"):]
  return None


def _innermost(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Drops events that enclose another event of the same thread (parents)."""
  eps = 1e-3
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[(e["pid"], e.get("tid"))].append(e)
  keep = []
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e["ts"], -e["dur"]))
    parent = [False] * len(thread)
    stack: list[int] = []
    for i, e in enumerate(thread):
      while stack and thread[stack[-1]]["ts"] + thread[stack[-1]]["dur"] <= e["ts"] + eps:
        stack.pop()
      if stack and e["ts"] + e["dur"] <= thread[stack[-1]]["ts"] + thread[stack[-1]]["dur"] + eps:
        parent[stack[-1]] = True
      stack.append(i)
    keep.extend(e for e, p in zip(thread, parent) if not p)
  return keep


def load_events(path: str | os.PathLike, *,
                hlo_ops: str | os.PathLike | dict[str, dict[str, str]] | None = None,
                module: str | None = None) -> list[OpEvent]:
  """The innermost XLA op events of a trace, per device, classified.

  Args:
    path: a trace file or a directory holding captures (:func:`find_trace_files`).
    hlo_ops: opcodes (``{module: {op: opcode}}``) or an ``hlo_ops.json``;
      default: the ``hlo_ops.json`` files the captures saved, if any.
    module: a regular expression; only ops of matching HLO modules count.

  Returns:
    :class:`OpEvent` s sorted by device and start; each trace file's times are
    relative to its first op. With several files, devices are prefixed with
    the file's capture directory.
  """
  files = find_trace_files(path)
  if hlo_ops is None:
    opcodes = _find_hlo_ops(files, os.fspath(path))
  elif isinstance(hlo_ops, dict):
    opcodes = hlo_ops
  else:
    with open(hlo_ops) as f:
      opcodes = json.load(f)["modules"]
  module_re = re.compile(module) if module else None
  out: list[OpEvent] = []
  for file in files:
    prefix = ""
    if len(files) > 1:
      rel = os.path.relpath(file, os.fspath(path)).split(os.sep)
      head = rel[:rel.index("plugins")] if "plugins" in rel else []
      prefix = "/".join(head) or re.split(r"\.(trace\.json|xplane\.pb)", os.path.basename(file))[0]
      prefix += "/"
    trace_json = _load_trace(file)
    processes = {e["pid"]: e.get("args", {}).get("name", "")
                 for e in trace_json["traceEvents"]
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    ops = []
    for e in trace_json["traceEvents"]:
      args = e.get("args") or {}
      if e.get("ph") != "X" or "hlo_op" not in args or "dur" not in e:
        continue
      if module_re and not module_re.search(str(args.get("hlo_module", ""))):
        continue
      label = _device_label(args, processes.get(e.get("pid"), ""))
      if label is not None:
        ops.append(dict(e, device=prefix + label))
    if not ops:
      continue
    origin = min(float(e["ts"]) for e in ops)
    for e in _innermost(ops):
      args = e["args"]
      name, mod = str(args["hlo_op"]), str(args.get("hlo_module", ""))
      kind = op_kind(name, opcodes.get(mod, {}).get(name))
      if kind == "container":
        continue
      out.append(OpEvent(e["device"], name, mod, kind, float(e["ts"]) - origin, float(e["dur"]),
                         None if "run_id" not in args else str(args["run_id"])))
  if not out:
    raise ValueError(f"no XLA op events (with an hlo_op) in {files}" +
                     (f" for modules matching {module!r}" if module else ""))
  return sorted(out, key=lambda e: (_natural_key(e.device), e.start))


def _natural_key(text: str) -> list[Any]:
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


# ----------------------------------------------------------------------------
# Interval arithmetic and the report


def merge_intervals(intervals: Iterable[tuple[float, float]]) -> np.ndarray:
  """Union of ``[start, end)`` intervals as sorted disjoint float64 ``[n, 2]``."""
  a = np.asarray(sorted(intervals), np.float64).reshape(-1, 2)
  if not len(a):
    return a
  merged = [list(a[0])]
  for s, e in a[1:]:
    if s <= merged[-1][1]:
      merged[-1][1] = max(merged[-1][1], e)
    else:
      merged.append([s, e])
  return np.asarray(merged)


def overlap_length(a: np.ndarray, b: np.ndarray) -> float:
  """Total length of the intersection of two merged interval sets."""
  i = j = 0
  total = 0.0
  while i < len(a) and j < len(b):
    lo, hi = max(a[i, 0], b[j, 0]), min(a[i, 1], b[j, 1])
    total += max(0.0, hi - lo)
    if a[i, 1] < b[j, 1]:
      i += 1
    else:
      j += 1
  return total


def _length(merged: np.ndarray) -> float:
  return float(np.sum(merged[:, 1] - merged[:, 0])) if len(merged) else 0.0


@dataclasses.dataclass(frozen=True)
class DeviceSummary:
  """One device's times in microseconds (see the module docstring)."""
  device: str
  steps: int  # distinct executions (run ids) seen; 0 when the trace has none
  span: float  # first op start to last op end
  compute: float
  comm: float
  overlap: float
  comm_by_kind: dict[str, float]

  @property
  def exposed_comm(self) -> float:
    return self.comm - self.overlap

  @property
  def busy(self) -> float:
    return self.compute + self.comm - self.overlap


def summarize(events: Sequence[OpEvent]) -> list[DeviceSummary]:
  """Per-device compute, communication and overlap of :func:`load_events` output."""
  by_device: dict[str, list[OpEvent]] = collections.defaultdict(list)
  for e in events:
    by_device[e.device].append(e)
  out = []
  for device in sorted(by_device, key=_natural_key):
    evs = by_device[device]
    compute = merge_intervals((e.start, e.end) for e in evs if e.kind == COMPUTE)
    comm = merge_intervals((e.start, e.end) for e in evs if e.kind != COMPUTE)
    kinds = {k: _length(merge_intervals((e.start, e.end) for e in evs if e.kind == k))
             for k in COMM_KINDS if any(e.kind == k for e in evs)}
    out.append(DeviceSummary(
        device=device, steps=len({e.run_id for e in evs if e.run_id is not None}),
        span=max(e.end for e in evs) - min(e.start for e in evs), compute=_length(compute),
        comm=_length(comm), overlap=overlap_length(compute, comm), comm_by_kind=kinds))
  return out


@dataclasses.dataclass(frozen=True)
class Report:
  files: list[str]
  devices: list[DeviceSummary]
  top_ops: list[dict[str, Any]]  # name, kind, total (us, all devices), count
  png: str | None


def top_ops(events: Sequence[OpEvent], n: int = 10) -> list[dict[str, Any]]:
  """The ``n`` ops with the most total time over all devices."""
  totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    t = totals[(e.name, e.kind)]
    t[0] += e.duration
    t[1] += 1
  ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])[:n]
  return [{"name": k[0], "kind": k[1], "total": v[0], "count": int(v[1])} for k, v in ranked]


def plot_timeline(events: Sequence[OpEvent], path: str | os.PathLike, *,
                  title: str = "") -> None:
  """Writes a PNG: one lane per device, compute above, collectives (by kind) below."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  devices = sorted({e.device for e in events}, key=_natural_key)
  colors = {COMPUTE: "#4c72b0", "all-reduce": "#dd8452", "all-gather": "#55a868",
            "reduce-scatter": "#c44e52", "all-to-all": "#8172b3",
            "collective-permute": "#937860", "send/recv": "#da8bc3",
            "collective-broadcast": "#8c8c8c"}
  fig, ax = plt.subplots(figsize=(14, 0.6 * len(devices) + 1.5))
  for row, device in enumerate(devices):
    evs = [e for e in events if e.device == device]
    for kind in (COMPUTE,) + COMM_KINDS:
      merged = merge_intervals((e.start / 1e3, e.end / 1e3) for e in evs if e.kind == kind)
      if len(merged):
        y = (row + 0.05, 0.4) if kind == COMPUTE else (row + 0.5, 0.4)
        ax.broken_barh([(s, e - s) for s, e in merged], y, color=colors[kind], label=kind)
  handles, labels = ax.get_legend_handles_labels()
  unique = dict(zip(labels, handles))
  ax.legend(unique.values(), unique.keys(), loc="lower right", bbox_to_anchor=(1.0, 1.0),
            fontsize=8, ncol=len(unique), frameon=False)
  ax.set_yticks([r + 0.5 for r in range(len(devices))], devices)
  ax.set_ylim(len(devices), 0)
  ax.set_xlabel("time (ms; compute above, communication below in each lane)")
  ax.set_title(title or "XLA ops per device", loc="left")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def report(path: str | os.PathLike, *, png: str | os.PathLike | None = None,
           hlo_ops: str | os.PathLike | None = None, module: str | None = None) -> Report:
  """Reads a trace, summarizes it per device, and writes the timeline PNG.

  ``png`` defaults to ``timeline.png`` in ``path`` (a directory) or beside it (a file).
  """
  path = os.fspath(path)
  events = load_events(path, hlo_ops=hlo_ops, module=module)
  if png is None:
    png = os.path.join(path if os.path.isdir(path) else os.path.dirname(path), "timeline.png")
  plot_timeline(events, png, title=f"{os.path.basename(os.path.normpath(path))}: XLA ops")
  return Report(files=find_trace_files(path), devices=summarize(events),
                top_ops=top_ops(events), png=os.fspath(png))


def print_report(rep: Report, console=None) -> None:
  """Prints the per-device table, communication by kind, and the top ops."""
  from rich.console import Console  # pylint: disable=g-import-not-at-top
  from rich.table import Table  # pylint: disable=g-import-not-at-top
  console = console or Console()
  table = Table(title="per device (ms)")
  for column in ("device", "steps", "span", "compute", "comm", "overlap", "exposed comm",
                 "comm/busy", "overlap/comm"):
    table.add_column(column, justify="left" if column == "device" else "right")
  for d in rep.devices:
    table.add_row(d.device, str(d.steps or "-"), *(f"{v / 1e3:.3f}" for v in (
        d.span, d.compute, d.comm, d.overlap, d.exposed_comm)),
                  f"{d.comm / d.busy:.0%}" if d.busy else "-",
                  f"{d.overlap / d.comm:.0%}" if d.comm else "-")
  console.print(table)
  kinds = [k for k in COMM_KINDS if any(k in d.comm_by_kind for d in rep.devices)]
  if kinds:
    by_kind = Table(title="communication by kind (ms)")
    by_kind.add_column("device")
    for k in kinds:
      by_kind.add_column(k, justify="right")
    for d in rep.devices:
      by_kind.add_row(d.device, *(f"{d.comm_by_kind.get(k, 0.0) / 1e3:.3f}" for k in kinds))
    console.print(by_kind)
  ops = Table(title="top ops (all devices)")
  for column in ("op", "kind", "total ms", "count"):
    ops.add_column(column, justify="left" if column in ("op", "kind") else "right")
  for op in rep.top_ops:
    ops.add_row(op["name"], op["kind"], f"{op['total'] / 1e3:.3f}", str(op["count"]))
  console.print(ops)
  console.print(f"timeline: {rep.png}")


def add_parser(commands) -> None:
  """Adds ``profile-report`` to the ``jaxinfra`` command's subparsers."""
  parser = commands.add_parser(
      "profile-report", help="per-device compute, communication and overlap of a "
                             "jax.profiler trace, and a timeline PNG")
  parser.add_argument("trace", help="a trace directory (jax.profiler log dir) or "
                                    "*.trace.json.gz / perfetto_trace.json.gz file")
  parser.add_argument("--png", default=None, help="timeline PNG (default: timeline.png there)")
  parser.add_argument("--json", default=None, help="also write the numbers to this JSON file")
  parser.add_argument("--hlo-ops", default=None,
                      help="hlo_ops.json with exact op kinds (default: the capture's, if saved)")
  parser.add_argument("--module", default=None,
                      help="regular expression: only ops of matching HLO modules")


def run(args: argparse.Namespace) -> int:
  """Runs ``jaxinfra profile-report``."""
  try:
    rep = report(args.trace, png=args.png, hlo_ops=args.hlo_ops, module=args.module)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}")
    return 2
  print_report(rep)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"files": rep.files, "png": rep.png, "top_ops": rep.top_ops,
                 "devices": [dict(dataclasses.asdict(d), exposed_comm=d.exposed_comm,
                                  busy=d.busy) for d in rep.devices]}, f, indent=1)
  return 0
