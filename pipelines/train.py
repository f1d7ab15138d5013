"""Training DeepSeek-V3: ``python -m pipelines.train --config tiny``.

One command prepares the corpus (``pipelines.data``; the standard library's
sources by default, cached), builds a ``data x pipe x expert`` mesh over the
available devices (8 CPU devices unless told otherwise), checks the model
config against the mesh, and trains:

* the model: ``models.deepseek_v3`` cut into pipeline stages
  (``pipeline_parts``), bf16/float32 GEMMs or FP8 GEMMs (``--fp8``),
  expert-parallel MoE over the ``expert`` axis;
* the step: one jitted program, :func:`jaxinfra.pipeline.pipeline_step` with
  DualPipeV over the ``pipe`` axis (``--schedule``), the batch split over
  ``data`` and ``expert``; optax AdamW with linear warm-up and cosine decay,
  global-norm clipping; the routers' aux-loss-free bias update from the step's
  per-expert token counts (``gamma`` = the config's ``bias_update_rate``);
* checkpoints: asynchronous, through :mod:`jaxinfra.checkpoint` (3FS USRBIO
  when on 3FS, parallel POSIX otherwise) every ``--ckpt-every`` steps, with an
  atomic commit; a rerun of the same command resumes from the newest committed
  checkpoint (parameters, optimizer state, router biases, step, data position;
  the step has no other randomness), so its losses equal an uninterrupted
  run's. Older checkpoints are deleted only once a newer one is committed;
* output (``--out``): ``metrics.jsonl`` (one line per step), ``loss.png``, a
  rich progress bar with loss and tokens/s.

Multi-process (one process per host, or several on one machine)::

    python -m pipelines.train --config tiny --num-processes 2 --process-id 0 \
        --coordinator 127.0.0.1:9876 --cpu-devices 4      # and --process-id 1

(or the environment variables ``JAX_COORDINATOR_ADDRESS``,
``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``). The global batch and so the losses
are the same as one process with all the devices.

Bad input (a config that does not divide the mesh, a corpus path that does
not exist, a checkpoint directory of another config or run) is an ``error:``
line and exit status 2 before anything is compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

AXES = ("data", "pipe", "expert")
BATCH_AXES = ("data", "expert")
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "jaxinfra")
CKPT_PREFIX = "step_"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"


class UsageError(ValueError):
  """Bad input found before anything is compiled (printed as ``error: ...``)."""


# ----------------------------------------------------------------------------
# Settings


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """What one training run does (the command line, as data).

  Sizes: ``global_batch`` rows of ``seq_len + 1`` tokens per step (inputs and
  next-token targets), split over ``data * expert`` batch shards and then
  into ``num_chunks`` pipeline micro-batches.
  """
  config: str = "tiny"
  steps: int = 60
  global_batch: int = 16
  seq_len: int = 64
  num_chunks: int = 4
  lr: float = 3e-3
  min_lr_ratio: float = 0.1
  warmup: int = 5
  weight_decay: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  clip: float = 1.0
  seed: int = 0
  data: int = 2
  pipe: int = 2
  expert: int = 2
  schedule: str = "dualpipev"
  fp8: bool = False
  dtype: str | None = None
  bias_update_rate: float | None = None  # None: the config's gamma
  corpus: tuple[str, ...] = ()
  max_documents: int | None = None
  data_dir: str | None = None
  out: str = "runs/train"
  ckpt_dir: str | None = None
  ckpt_every: int = 20
  keep: int = 2
  profile: bool = False
  progress: bool = True
  compile_cache: str | None = ""  # "" = the default directory, None = off

  @property
  def checkpoint_dir(self) -> str:
    return self.ckpt_dir or os.path.join(self.out, "checkpoints")

  @property
  def dataset_dir(self) -> str:
    if self.data_dir:
      return self.data_dir
    tag = "stdlib" if not self.corpus else "corpus-%08x" % (
        _crc32(json.dumps(sorted(os.path.abspath(c) for c in self.corpus))))
    docs = "" if self.max_documents is None else f"-docs{self.max_documents}"
    return os.path.join(os.environ.get("JAXINFRA_CACHE", DEFAULT_CACHE), "data",
                        f"{tag}-seq{self.seq_len + 1}{docs}")

  @property
  def mesh_shape(self) -> tuple[int, int, int]:
    return (self.data, self.pipe, self.expert)

  def run_identity(self) -> dict[str, Any]:
    """What a checkpoint must agree with to be resumed (everything that changes
    the state's shapes or the trajectory)."""
    keys = ("config", "steps", "global_batch", "seq_len", "num_chunks", "lr", "min_lr_ratio",
            "warmup", "weight_decay", "b1", "b2", "clip", "seed", "schedule", "fp8", "dtype",
            "max_documents", "bias_update_rate")
    out = {k: getattr(self, k) for k in keys}
    out["pipe"] = self.pipe
    return out


def _crc32(text: str) -> int:
  import zlib  # pylint: disable=g-import-not-at-top
  return zlib.crc32(text.encode())


def check_settings(s: TrainSettings) -> None:
  """Static checks of the settings alone (no JAX, no files).

  Raises:
    UsageError: naming the bad setting.
  """
  positive = ("steps", "global_batch", "seq_len", "num_chunks", "data", "pipe", "expert",
              "ckpt_every", "keep")
  bad = {k: getattr(s, k) for k in positive if getattr(s, k) < 1}
  if bad:
    raise UsageError(f"these settings must be positive: {bad}")
  if not 0 <= s.warmup <= s.steps:
    raise UsageError(f"--warmup must be in [0, --steps={s.steps}], got {s.warmup}")
  if s.lr <= 0 or not 0 <= s.min_lr_ratio <= 1:
    raise UsageError(f"--lr must be positive and --min-lr-ratio in [0, 1], got {s.lr}, "
                     f"{s.min_lr_ratio}")
  if s.bias_update_rate is not None and s.bias_update_rate < 0:
    raise UsageError(f"--bias-update-rate must be >= 0, got {s.bias_update_rate}")
  if s.clip <= 0:
    raise UsageError(f"--clip must be positive, got {s.clip}")
  if s.dtype not in (None, "float32", "bfloat16"):
    raise UsageError(f"--dtype must be float32 or bfloat16, got {s.dtype!r}")
  shards = s.data * s.expert
  if s.global_batch % (shards * s.num_chunks):
    raise UsageError(
        f"--global-batch={s.global_batch} must split into data x expert = {s.data} x {s.expert} "
        f"batch shards of --num-chunks={s.num_chunks} micro-batches (a multiple of "
        f"{shards * s.num_chunks})")


# ----------------------------------------------------------------------------
# Devices and processes (before any JAX backend starts)


def setup_devices(num_processes: int, process_id: int | None, coordinator: str | None,
                  cpu_devices: int | None) -> None:
  """Sets the CPU device count (unless ``XLA_FLAGS`` or ``JAX_NUM_CPU_DEVICES``
  already does) and joins the ``jax.distributed`` cluster when
  ``num_processes > 1``. Must run before anything touches a JAX backend."""
  import jax  # pylint: disable=g-import-not-at-top
  user_set = ("xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", "")
              or "JAX_NUM_CPU_DEVICES" in os.environ)
  if cpu_devices is None and not user_set:
    cpu_devices = max(1, 8 // max(num_processes, 1))
  if cpu_devices is not None:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  if num_processes > 1:
    if coordinator is None or process_id is None:
      raise UsageError("--num-processes > 1 needs --coordinator HOST:PORT and --process-id "
                       "(or JAX_COORDINATOR_ADDRESS and JAX_PROCESS_ID)")
    if not 0 <= process_id < num_processes:
      raise UsageError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)


def make_mesh(s: TrainSettings):
  """The ``data x pipe x expert`` mesh (explicit axes) over all devices."""
  import jax  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  if math.prod(s.mesh_shape) != n:
    raise UsageError(f"the mesh data x pipe x expert = {s.data} x {s.pipe} x {s.expert} = "
                     f"{math.prod(s.mesh_shape)} devices, but {n} are available "
                     f"({jax.process_count()} process(es) x {jax.local_device_count()} "
                     f"{jax.default_backend()} devices); change --data/--pipe/--expert")
  return jax.make_mesh(s.mesh_shape, AXES,
                       axis_types=(jax.sharding.AxisType.Explicit,) * len(AXES))


def model_config(s: TrainSettings):
  """The model's :class:`models.deepseek_v3.Config` for the settings."""
  from models.deepseek_v3 import config as cfg_lib  # pylint: disable=g-import-not-at-top
  changes: dict[str, Any] = {}
  if s.fp8:
    changes.update(linear="fp8")
  if s.dtype:
    changes.update(dtype=s.dtype)
  if s.bias_update_rate is not None:
    changes.update(bias_update_rate=s.bias_update_rate)
  try:
    return cfg_lib.get_config(s.config, **changes)
  except ValueError as e:
    raise UsageError(f"--config {s.config}: {e}") from None


def check_model_vs_mesh(s: TrainSettings, config, mesh, vocab_size: int | None) -> None:
  """Config-vs-mesh checks, before anything is compiled."""
  from jaxinfra import pipeline  # pylint: disable=g-import-not-at-top
  from models.deepseek_v3 import config as cfg_lib  # pylint: disable=g-import-not-at-top
  try:
    num_stages = pipeline.stages_for(s.schedule, s.pipe)
    pipeline.make_schedule(s.schedule, s.pipe, s.num_chunks)
  except ValueError as e:
    raise UsageError(f"--schedule {s.schedule} on --pipe={s.pipe} with --num-chunks="
                     f"{s.num_chunks}: {e}") from None
  try:
    cfg_lib.check_mesh(config, mesh, expert_axis="expert", pipe_axis="pipe",
                       num_stages=num_stages)
  except ValueError as e:
    raise UsageError(f"--config {s.config} does not fit the mesh {dict(mesh.shape)} "
                     f"({s.schedule}: {num_stages} stages): {e}") from None
  if s.seq_len > config.rope.max_position:
    raise UsageError(f"--seq-len={s.seq_len} exceeds the model's max_position "
                     f"{config.rope.max_position}")
  if vocab_size is not None and vocab_size > config.vocab_size:
    raise UsageError(f"the dataset's tokenizer has {vocab_size} ids, more than the model's "
                     f"vocab_size={config.vocab_size}")


# ----------------------------------------------------------------------------
# Data


def prepare_data(s: TrainSettings) -> str:
  """The packed dataset's directory, preprocessing the corpus first if missing
  (process 0 writes; the others wait)."""
  import jax  # pylint: disable=g-import-not-at-top
  from pipelines import data  # pylint: disable=g-import-not-at-top
  directory = s.dataset_dir
  if jax.process_index() == 0:
    try:
      data.preprocess(list(s.corpus) or None, directory, seq_len=s.seq_len + 1,
                      max_documents=s.max_documents, progress=s.progress)
    except (FileNotFoundError, ValueError) as e:
      raise UsageError(f"preparing the dataset {directory}: {e}") from None
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("jaxinfra-train-data")
  return directory


def check_corpus(s: TrainSettings) -> None:
  """The corpus paths exist (cheap; before any preprocessing or compilation)."""
  from pipelines import data  # pylint: disable=g-import-not-at-top
  if s.data_dir and os.path.exists(os.path.join(s.data_dir, data.METADATA)):
    return
  if s.data_dir and not s.corpus and os.path.exists(s.data_dir) and os.listdir(s.data_dir):
    raise UsageError(f"--data-dir {s.data_dir} exists but holds no dataset "
                     f"({data.METADATA} missing)")
  try:
    data.resolve_sources(list(s.corpus) or None)
  except (FileNotFoundError, ValueError) as e:
    raise UsageError(f"--corpus: {e}") from None


# ----------------------------------------------------------------------------
# The model: DeepSeek-V3 cut into pipeline stages (models.deepseek_v3.pipeline)


def build_model(s: TrainSettings, config, mesh):
  """Builds the model on the host (seeded; the same on every process), cuts it
  into ``stages_for(schedule, pipe)`` stages with experts over ``expert``, and
  places its parameters on the mesh: the routed experts' leaves sharded over
  ``expert``, everything else replicated.

  Returns:
    ``models.deepseek_v3.pipeline.Parts`` whose ``params`` are global arrays.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from jaxinfra import pipeline  # pylint: disable=g-import-not-at-top
  from models.deepseek_v3 import model as model_lib  # pylint: disable=g-import-not-at-top
  from models.deepseek_v3 import pipeline as model_pipeline  # pylint: disable=g-import-not-at-top

  num_stages = pipeline.stages_for(s.schedule, s.pipe)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    model = model_lib.DeepSeekV3(config, rngs=_rngs(s.seed))
    parts = model_pipeline.pipeline_parts(model, num_stages, ep_axis="expert")
  del model

  def put(x, spec):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, NamedSharding(mesh, spec),
                                        lambda index: host[index])

  stage_specs = jax.tree_util.tree_map(lambda spec: P(None, *spec), parts.stage_specs,
                                       is_leaf=lambda x: isinstance(x, P))
  params = pipeline.PipelineParams(
      jax.tree_util.tree_map(put, parts.params.stages, stage_specs),
      jax.tree_util.tree_map(lambda x: put(x, P()), parts.params.embed),
      jax.tree_util.tree_map(lambda x: put(x, P()), parts.params.head))
  return dataclasses.replace(parts, params=params)


def _rngs(seed: int):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  return nnx.Rngs(seed)


def bias_labels(params) -> Any:
  """``"bias"`` for the routers' ``gate_bias`` leaves, ``"train"`` otherwise."""
  import jax  # pylint: disable=g-import-not-at-top
  def label(path, _):
    last = path[-1] if path else None
    return "bias" if getattr(last, "key", None) == "gate_bias" else "train"
  return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(s: TrainSettings, params):
  """AdamW (linear warm-up, cosine decay) on the trainable leaves; the router
  biases are left to the aux-loss-free update (``set_to_zero``: no step, no
  weight decay). Returns ``(optax transform, learning-rate schedule)``."""
  import optax  # pylint: disable=g-import-not-at-top
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=s.lr, warmup_steps=s.warmup, decay_steps=s.steps,
      end_value=s.lr * s.min_lr_ratio)
  adamw = optax.adamw(schedule, b1=s.b1, b2=s.b2, weight_decay=s.weight_decay)
  tx = optax.multi_transform({"train": adamw, "bias": optax.set_to_zero()}, bias_labels(params))
  return tx, schedule


def make_train_step(s: TrainSettings, parts, mesh, tx, pad_id: int, gamma: float):
  """``step(params, opt_state, tokens [B, L+1]) -> (params, opt_state, metrics)``,
  jitted, donating the state.

  One DualPipeV (``s.schedule``) step over ``pipe`` with the batch over
  ``data x expert``; the tied embedding's gradient summed; global-norm
  clipping (the table counted once, no biases); AdamW; then each MoE layer's
  bias ``-= gamma * sign(load - mean load)`` from the step's loads. Targets
  equal to ``pad_id`` (the dataset's last row) are masked out of the loss.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from jaxinfra import pipeline  # pylint: disable=g-import-not-at-top

  def step(params, opt_state, tokens):
    targets = tokens[:, 1:]
    labels = parts.labels(targets, (targets != pad_id).astype(jnp.float32))
    loss, grads = pipeline.pipeline_step(
        parts.stage_fn, params, tokens[:, :-1], labels, parts.loss_fn, mesh=mesh, axis="pipe",
        schedule=s.schedule, num_chunks=s.num_chunks, embed_fn=parts.embed_fn,
        batch_axes=BATCH_AXES, stage_specs=parts.stage_specs)
    # Explicit-sharding meshes want the gradients laid out like the parameters.
    grads = jax.tree_util.tree_map(lambda g, p: jax.reshard(g, jax.typeof(p).sharding),
                                   grads, params)
    grads = parts.tie_grads(grads)
    grad_norm = parts.global_norm(grads)
    scale = jnp.minimum(1.0, s.clip / jnp.maximum(grad_norm, 1e-12))
    clipped = jax.tree_util.tree_map(lambda g: (g * scale).astype(g.dtype), grads)
    updates, opt_state = tx.update(clipped, opt_state, params)
    params = parts.update_bias(optax.apply_updates(params, updates), grads, gamma)
    loads, _ = parts.loads(grads)
    loads = loads.astype(jnp.float32)
    imbalance = jnp.max(jnp.max(loads, -1) / jnp.maximum(jnp.mean(loads, -1), 1e-9))
    metrics = {"loss": loss, "grad_norm": grad_norm, "max_load_ratio": imbalance}
    return params, opt_state, metrics

  return jax.jit(step, donate_argnums=(0, 1))


# ----------------------------------------------------------------------------
# Checkpoints


def _ckpt_name(step: int) -> str:
  return f"{CKPT_PREFIX}{step:08d}"


def _config_json(config) -> str:
  return json.dumps(config.to_hf(), sort_keys=True)


def checkpoint_tree(parts, params, opt_state, step: int, s: TrainSettings, config) -> dict:
  """What a checkpoint holds.

  * ``model``: the parameters in the model's layout
    (``nnx.state(DeepSeekV3).to_pure_dict()``, MoE layers ``[n_moe_layers,
    ...]``, router biases included), independent of the pipeline cut: serving
    restores it into a ``DeepSeekV3`` with ``nnx.update``;
  * ``opt_state``: optax's state, shaped like the pipelined parameters;
  * ``step`` (steps done, = the data loader's next batch), ``seed``;
  * ``config``: the config's name (``--config``), ``architecture``: the
    architecture as DeepSeek's ``config.json`` (JSON text).
  """
  return {"model": parts.to_pure(params), "opt_state": opt_state, "step": int(step),
          "seed": int(s.seed), "config": s.config, "architecture": _config_json(config)}


def from_pure(parts, pure: dict):
  """The inverse of ``parts.to_pure``: the model's pure dict back to the
  pipelined :class:`~jaxinfra.pipeline.PipelineParams` (MoE layers
  ``[num_stages, layers_per_stage, ...]``, the tied embedding in ``embed`` and,
  with MTP, ``head``)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxinfra import pipeline  # pylint: disable=g-import-not-at-top
  f = parts.functions
  stages = jax.tree_util.tree_map(
      lambda a: a.reshape((f.num_stages, f.layers_per_stage) + a.shape[1:]), pure["moe_layers"])
  embed = {"embed": pure["embed"], "dense_layers": pure["dense_layers"]}
  head = {"norm": pure["norm"], "head": pure["head"]}
  if "mtp" in pure:
    head.update(mtp=pure["mtp"], embed=pure["embed"])
  return pipeline.PipelineParams(stages, embed, head)


def latest_checkpoint(ckpt_dir: str) -> tuple[int, str] | None:
  """``(steps_done, path)`` of the newest committed checkpoint, or ``None``."""
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(ckpt_dir):
    return None
  steps = [int(n[len(CKPT_PREFIX):]) for n in checkpoint.committed(ckpt_dir)
           if n.startswith(CKPT_PREFIX) and n[len(CKPT_PREFIX):].isdigit()]
  if not steps:
    return None
  return max(steps), os.path.join(ckpt_dir, _ckpt_name(max(steps)))


def check_checkpoint_dir(s: TrainSettings) -> None:
  """A checkpoint directory of another run (config, sizes, schedule,
  optimizer) is an error: resuming it would not continue this run."""
  path = os.path.join(s.checkpoint_dir, RUN_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    theirs = json.load(f)
  ours = json.loads(json.dumps(s.run_identity()))
  diff = {k: (theirs.get(k), v) for k, v in ours.items() if theirs.get(k) != v}
  if diff:
    raise UsageError(f"--ckpt-dir {s.checkpoint_dir} holds checkpoints of another run; "
                     f"settings (checkpoint's, this run's) that differ: {diff}. Use another "
                     "--ckpt-dir, or the same settings to resume")


def _write_run_file(s: TrainSettings) -> None:
  os.makedirs(s.checkpoint_dir, exist_ok=True)
  path = os.path.join(s.checkpoint_dir, RUN_FILE)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(s.run_identity(), f, indent=1)
  os.replace(tmp, path)


def _prune(ckpt_dir: str, keep: int, protect: str) -> None:
  """Deletes committed checkpoints beyond the newest ``keep`` (never ``protect``)."""
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  names = [n for n in checkpoint.committed(ckpt_dir) if n.startswith(CKPT_PREFIX)]
  for name in names[:-keep]:
    if name != protect:
      shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)


# ----------------------------------------------------------------------------
# Metrics


def _read_metrics(path: str) -> list[dict[str, Any]]:
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
          break
  return out


def _rewrite_metrics(path: str, records: list[dict[str, Any]]) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)


def plot_loss(records: list[dict[str, Any]], path: str, title: str) -> None:
  """The loss curve (and the learning rate) as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  steps = np.array([r["step"] for r in records])
  loss = np.array([r["loss"] for r in records])
  fig, ax = plt.subplots(figsize=(8, 4.5))
  ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.5, label="loss")
  if len(loss) >= 10:
    w = max(len(loss) // 30, 5)
    smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
    ax.plot(steps[w - 1:], smooth, color="tab:blue", lw=2, label=f"loss ({w}-step mean)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (next-token CE + weighted MTP CE, nats)")
  ax.grid(alpha=0.3)
  ax.set_title(title)
  lr = ax.twinx()
  lr.plot(steps, [r["lr"] for r in records], color="tab:orange", lw=1, label="learning rate")
  lr.set_ylabel("learning rate")
  lines = ax.get_legend_handles_labels()
  lines2 = lr.get_legend_handles_labels()
  ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right")
  fig.tight_layout()
  tmp = path + ".tmp.png"
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)


def _progress(enabled: bool):
  from rich import progress as rp  # pylint: disable=g-import-not-at-top
  return rp.Progress(
      rp.TextColumn("[bold]train[/bold]"), rp.BarColumn(), rp.MofNCompleteColumn(),
      rp.TextColumn("loss {task.fields[loss]}"), rp.TextColumn("{task.fields[tps]} tok/s"),
      rp.TimeElapsedColumn(), rp.TimeRemainingColumn(), disable=not enabled)


# ----------------------------------------------------------------------------
# The run


def _global_to_host(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(lambda x: np.asarray(jax.device_get(x)), tree)


def train(s: TrainSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs (or resumes) training; returns a summary (losses, steps, times).

  Raises:
    UsageError: bad settings, mesh, corpus or checkpoint directory (before any
      compilation).
  """
  import jax  # pylint: disable=g-import-not-at-top

  started = time.perf_counter()
  check_settings(s)
  check_corpus(s)
  check_checkpoint_dir(s)
  profiler = None
  if s.profile:
    try:
      from jaxinfra import profile as profiler  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise UsageError("--profile needs jaxinfra.profile, which this installation lacks") from None
  config = model_config(s)
  mesh = make_mesh(s)
  check_model_vs_mesh(s, config, mesh, None)
  if s.compile_cache is not None:  # a rerun (a resume) skips the step's compilation
    jax.config.update("jax_compilation_cache_dir", s.compile_cache or os.path.join(
        os.environ.get("JAXINFRA_CACHE", DEFAULT_CACHE), "jax-compile"))
  with jax.set_mesh(mesh):
    return _train(s, config, mesh, profiler, started, log)


def _train(s: TrainSettings, config, mesh, profiler, started: float,
           log: Callable[[str], None]) -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  from pipelines import data  # pylint: disable=g-import-not-at-top

  lead = jax.process_index() == 0

  directory = prepare_data(s)
  meta = data.Metadata.load(directory)
  check_model_vs_mesh(s, config, mesh, meta.tokenizer["vocab_size"])
  loader = data.DataLoader(directory, mesh, s.global_batch, batch_axes=BATCH_AXES, seed=s.seed)

  parts = build_model(s, config, mesh)
  tx, lr_schedule = make_optimizer(s, parts.params)
  params = parts.params
  opt_state = jax.jit(tx.init)(params)
  os.makedirs(s.out, exist_ok=True)
  metrics_path = os.path.join(s.out, METRICS_FILE)

  ckpt = checkpoint.Checkpointer()
  start = 0
  if lead:
    if os.path.isdir(s.checkpoint_dir):
      checkpoint.remove_uncommitted(s.checkpoint_dir)
    _write_run_file(s)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("jaxinfra-train-ckpt-dir")
  found = latest_checkpoint(s.checkpoint_dir)
  if found is not None:
    start, path = found
    restored = ckpt.restore(path, checkpoint_tree(parts, params, opt_state, 0, s, config))
    if restored["seed"] != s.seed or restored["architecture"] != _config_json(config):
      raise UsageError(f"{path} was written by another run (seed {restored['seed']}, model "
                       f"{restored['architecture']}); expected seed {s.seed}, model "
                       f"{_config_json(config)}")
    params = jax.tree_util.tree_map(lambda x, p: jax.reshard(x, p.sharding),
                                    from_pure(parts, restored["model"]), params)
    opt_state = restored["opt_state"]
    log(f"resumed from {path} (step {start})")
  records = [r for r in _read_metrics(metrics_path) if r["step"] < start] if start else []
  if lead:
    _rewrite_metrics(metrics_path, records)

  train_step = make_train_step(s, parts, mesh, tx, meta.tokenizer["pad_id"],
                               config.bias_update_rate)
  tokens_per_step = s.global_batch * s.seq_len
  log(f"{s.config}: mesh {dict(mesh.shape)} on {jax.device_count()} {jax.default_backend()} "
      f"devices ({jax.process_count()} process(es)); {s.schedule}, {s.num_chunks} micro-batches;"
      f" batch {s.global_batch} x {s.seq_len} tokens; steps {start} -> {s.steps}")
  profile_steps = range(start + 1, min(start + 3, s.steps)) if profiler else range(0)
  stack = contextlib.ExitStack()
  first_time = None
  try:
    with _progress(s.progress and lead) as bar, open(metrics_path, "a") if lead else (
        contextlib.nullcontext()) as out:
      task = bar.add_task("train", total=s.steps, completed=start, loss="-", tps="-")
      for step in range(start, s.steps):
        if profile_steps and step == profile_steps.start:
          stack.enter_context(profiler.capture(os.path.join(s.out, "profile")))
        batch = loader.batch(step)
        t0 = time.perf_counter()
        with (jax.profiler.StepTraceAnnotation("train", step_num=step) if step in profile_steps
              else contextlib.nullcontext()):
          params, opt_state, m = train_step(params, opt_state, batch["tokens"])
          m = {k: float(v) for k, v in _global_to_host(m).items()}
        dt = time.perf_counter() - t0
        if first_time is None:
          first_time = dt
        if profile_steps and step == profile_steps[-1]:
          stack.close()
          log(f"profile trace of steps {list(profile_steps)} in {s.out}/profile "
              f"(jaxinfra profile-report {s.out}/profile)")
        record = {"step": step, **m, "lr": float(lr_schedule(step)),
                  "tokens_per_s": tokens_per_step / dt, "step_s": dt}
        records.append(record)
        if lead:
          out.write(json.dumps(record) + "\n")
          out.flush()
        bar.update(task, advance=1, loss=f"{m['loss']:.4f}", tps=f"{tokens_per_step / dt:,.0f}")
        done = step + 1
        if done % s.ckpt_every == 0 or done == s.steps:
          name = _ckpt_name(done)
          ckpt.save_async(os.path.join(s.checkpoint_dir, name),
                          checkpoint_tree(parts, params, opt_state, done, s, config))
          if lead:  # the previous save is committed once save_async returns
            _prune(s.checkpoint_dir, s.keep, protect=name)
            if records:
              plot_loss(records, os.path.join(s.out, LOSS_PNG), f"DeepSeek-V3 {s.config}")
    ckpt.wait_until_finished()
  finally:
    stack.close()
    with contextlib.suppress(BaseException):
      ckpt.wait_until_finished()  # never leave a started save half-done on an error
  if lead:
    _prune(s.checkpoint_dir, s.keep, protect="")
    if records:
      plot_loss(records, os.path.join(s.out, LOSS_PNG), f"DeepSeek-V3 {s.config}")
  summary = _summary(records, s, start, time.perf_counter() - started, first_time)
  if lead:
    with open(os.path.join(s.out, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def _summary(records, s: TrainSettings, start: int, wall: float, first: float | None):
  losses = [r["loss"] for r in records]
  if not losses:
    return {"steps": s.steps, "resumed_from": start, "wall_s": wall}
  tail = losses[-min(10, len(losses)):]
  tps = [r["tokens_per_s"] for r in records[start + 1:]] if len(records) > start + 1 else []
  return {"steps": s.steps, "resumed_from": start, "first_loss": losses[0],
          "final_loss": losses[-1], "final_loss_mean10": float(np.mean(tail)),
          "loss_drop": 1.0 - float(np.mean(tail)) / losses[0], "wall_s": wall,
          "first_step_s": first, "tokens_per_s": float(np.median(tps)) if tps else None}


# ----------------------------------------------------------------------------
# Command line


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


def parse_args(argv: Sequence[str] | None) -> tuple[TrainSettings, argparse.Namespace]:
  d = TrainSettings()
  p = argparse.ArgumentParser(prog="python -m pipelines.train",
                              description=__doc__.split("\n\n", 1)[0])
  p.add_argument("--config", default=d.config, help="model config: tiny, small, 671b")
  p.add_argument("--steps", type=int, default=d.steps)
  p.add_argument("--global-batch", type=int, default=d.global_batch,
                 help="sequences per step over all devices")
  p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
  p.add_argument("--num-chunks", type=int, default=d.num_chunks,
                 help="pipeline micro-batches per batch shard")
  p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
  p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio,
                 help="final learning rate / peak (cosine decay)")
  p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
  p.add_argument("--weight-decay", type=float, default=d.weight_decay)
  p.add_argument("--clip", type=float, default=d.clip, help="global gradient-norm clip")
  p.add_argument("--seed", type=int, default=d.seed, help="init and data-order seed")
  p.add_argument("--data", type=int, default=d.data, help="mesh: data-parallel size")
  p.add_argument("--pipe", type=int, default=d.pipe, help="mesh: pipeline ranks")
  p.add_argument("--expert", type=int, default=d.expert, help="mesh: expert-parallel size")
  p.add_argument("--schedule", default=d.schedule,
                 help="pipeline schedule: dualpipev, dualpipe, 1f1b, zb1p, gpipe")
  p.add_argument("--fp8", action="store_true", help="FP8 GEMMs (jaxinfra.gemm.Fp8Dense)")
  p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                 help="compute dtype (default: the config's)")
  p.add_argument("--bias-update-rate", type=float, default=None,
                 help="gamma of the aux-loss-free bias update (default: the config's, 0.001)")
  p.add_argument("--corpus", nargs="*", default=[],
                 help="text/parquet files, directories or globs (default: Python's stdlib)")
  p.add_argument("--max-documents", type=int, default=None,
                 help="use only the first N documents of the corpus")
  p.add_argument("--data-dir", default=None,
                 help="packed dataset directory (default: under $JAXINFRA_CACHE or "
                      "~/.cache/jaxinfra/data)")
  p.add_argument("--out", default=d.out, help="metrics.jsonl, loss.png, summary.json")
  p.add_argument("--ckpt-dir", default=None, help="checkpoints (default: OUT/checkpoints)")
  p.add_argument("--ckpt-every", type=int, default=d.ckpt_every, help="checkpoint every N steps")
  p.add_argument("--keep", type=int, default=d.keep, help="committed checkpoints to keep")
  p.add_argument("--profile", action="store_true",
                 help="capture a jax.profiler trace of two steps into OUT/profile")
  p.add_argument("--no-progress", action="store_true", help="no progress bar")
  p.add_argument("--compile-cache", default="",
                 help="JAX compilation cache directory ('none': off; default: under "
                      "$JAXINFRA_CACHE or ~/.cache/jaxinfra)")
  p.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES") or 1)
  p.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"))
  p.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                 help="HOST:PORT of process 0's coordinator")
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="CPU devices per process (default: 8 / processes, unless XLA_FLAGS or "
                      "JAX_NUM_CPU_DEVICES sets it)")
  a = p.parse_args(argv)
  s = TrainSettings(
      config=a.config, steps=a.steps, global_batch=a.global_batch, seq_len=a.seq_len,
      num_chunks=a.num_chunks, lr=a.lr, min_lr_ratio=a.min_lr_ratio, warmup=a.warmup,
      weight_decay=a.weight_decay, clip=a.clip, seed=a.seed, data=a.data, pipe=a.pipe,
      expert=a.expert, schedule=a.schedule, fp8=a.fp8, dtype=a.dtype,
      bias_update_rate=a.bias_update_rate, corpus=tuple(a.corpus),
      max_documents=a.max_documents, data_dir=a.data_dir, out=a.out, ckpt_dir=a.ckpt_dir,
      ckpt_every=a.ckpt_every, keep=a.keep, profile=a.profile, progress=not a.no_progress,
      compile_cache=None if a.compile_cache == "none" else a.compile_cache)
  return s, a


def main(argv: Sequence[str] | None = None, *, setup: bool = True) -> int:
  """The command line; ``setup=False`` leaves the devices as they are (for
  callers that already started JAX)."""
  s, a = parse_args(argv)
  try:
    check_settings(s)
    if setup:
      setup_devices(a.num_processes, a.process_id, a.coordinator, a.cpu_devices)
    summary = train(s)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if "first_loss" in summary:
    print(f"loss {summary['first_loss']:.4f} (step 0) -> {summary['final_loss']:.4f} (step "
          f"{s.steps - 1}; mean of the last 10: {summary['final_loss_mean10']:.4f}, "
          f"{100 * summary['loss_drop']:.1f}% lower); {summary['wall_s']:.0f} s wall, "
          f"{summary['tokens_per_s'] or 0:,.0f} tokens/s")
  return 0


if __name__ == "__main__":
  sys.exit(main())
