"""Pipeline parallelism: DualPipe, DualPipeV, 1F1B, ZB1P and GPipe schedules, their
simulator, and an executor that runs them as one jitted ``shard_map`` program.

* :mod:`jaxinfra.pipeline.schedules`: per-rank op lists (``make_schedule``),
  their invariants (``check_schedule``) and static tick tables (``tick_table``,
  ``tick_sends``).
* :mod:`jaxinfra.pipeline.simulate`: ``simulate`` (bubbles, makespan, peak
  in-flight activations) and ``plot_schedule`` (a timeline PNG).
* :mod:`jaxinfra.pipeline.executor`: ``pipeline_step`` (loss and gradients) and
  ``pipeline_forward`` (inference) over a pipeline mesh axis.
"""

from jaxinfra.pipeline.executor import (PipelineParams, default_overlapped_forward_backward,
                                        pipeline_forward, pipeline_step)
from jaxinfra.pipeline.schedules import (OP_KINDS, SCHEDULES, Chunk, Op, Schedule, check_schedule,
                                         dualpipe, dualpipev, gpipe, make_schedule, one_f_one_b,
                                         stages_for, tick_sends, tick_table, zb1p)
from jaxinfra.pipeline.simulate import SimResult, op_time, plot_schedule, simulate

__all__ = [
    "OP_KINDS", "SCHEDULES", "Chunk", "Op", "PipelineParams", "Schedule", "SimResult",
    "check_schedule", "default_overlapped_forward_backward", "dualpipe", "dualpipev", "gpipe",
    "make_schedule", "one_f_one_b", "op_time", "pipeline_forward", "pipeline_step",
    "plot_schedule", "simulate", "stages_for", "tick_sends", "tick_table", "zb1p"]
