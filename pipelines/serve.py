"""Serving DeepSeek-V3: ``python -m pipelines.serve --config tiny --checkpoint DIR --prompt "..."``.

Loads a checkpoint, then generates for every ``--prompt`` with continuous
batching:

* prefill: each admitted request's prompt runs through the model's expanded
  MLA (``mla_prefill``), writing every layer's 576-wide latents into paged
  latent caches (``jaxinfra.mla.PagedLatentCache``, 64-token pages);
* decode: one token per running request per step, absorbed MLA through
  ``mla_decode`` over the pages; with ``--expert N > 1`` the routed experts are
  sharded over N devices and tokens reach them with DeepEP's low-latency
  dispatch (``jaxinfra.moe.MoE(mode="low_latency")``);
* the scheduler (:class:`Scheduler`) keeps ``--slots`` batch slots; a waiting
  request is admitted into a free slot as soon as one frees up and the page
  pool (:class:`PagePool`, a free list) can hold its prompt plus its
  ``max_tokens``, so decoding never runs out of pages; a request ends at its
  ``--max-tokens``, at the end-of-sequence token, or at a ``--stop`` string;
* sampling: greedy (``--temperature 0``) or temperature sampling, seeded per
  request (request ``i`` uses ``--seed + i``; the key depends only on the seed
  and the token's position, so a request's output does not depend on what it
  is batched with);
* tokens: ``pipelines.data``'s byte-level tokenizer (BOS, then the prompt's
  UTF-8 bytes).

Prefill and decode tokens/s are measured after compiling (the programs are
compiled before the clock starts: one per prompt-length bucket, one decode).

Checkpoints: a directory written by ``pipelines.train`` (its ``checkpoints/``
folder, one ``step_*`` checkpoint in it, or the run's ``--out``; the newest
committed step is used; parameters are in the pipeline layout, mapped back to
the model), or one written by :func:`save_model` (``{"model": the model's
parameters, "config": name}``). Before anything is compiled, the checkpoint's
config name (``run.json`` or the saved name) and every parameter's shape are
checked against ``--config``: a checkpoint of another config is an ``error:``
line and exit status 2.

``--profile DIR`` captures a ``jax.profiler`` trace of two decode steps
(``jaxinfra profile-report DIR``).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

PAGE_SIZE = 64
TRAIN_RUN_FILE = "run.json"        # pipelines.train's run identity next to its checkpoints
TRAIN_CKPT_PREFIX = "step_"
MIN_BUCKET = 16


class UsageError(ValueError):
  """Bad input found before anything is compiled (printed as ``error: ...``)."""


# ----------------------------------------------------------------------------
# Requests, pages and the scheduler (no JAX here: the engine runs the model)


@dataclasses.dataclass
class Request:
  """One generation request.

  Attributes:
    prompt: token ids (int32 ``[n]``, ``n >= 1``).
    max_tokens: tokens to generate at most.
    temperature: 0 for greedy, else softmax sampling at this temperature.
    seed: sampling seed.
    stop: token sequences that end the request when generated (kept out of
      the output).
    eos_id: a token that ends the request (kept out of the output), or None.
  """
  prompt: np.ndarray
  max_tokens: int = 32
  temperature: float = 0.0
  seed: int = 0
  stop: tuple[tuple[int, ...], ...] = ()
  eos_id: int | None = None
  # Filled in by the scheduler.
  output: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  slot: int | None = None

  def __post_init__(self):
    self.prompt = np.asarray(self.prompt, np.int32).reshape(-1)
    if self.prompt.size < 1:
      raise ValueError("Request: the prompt must have at least one token")
    if self.max_tokens < 1:
      raise ValueError(f"Request: max_tokens must be >= 1, got {self.max_tokens}")
    if self.temperature < 0:
      raise ValueError(f"Request: temperature must be >= 0, got {self.temperature}")

  def add(self, token: int) -> bool:
    """Appends a generated token; True when the request is finished."""
    if self.eos_id is not None and token == self.eos_id:
      self.finish_reason = "eos"
      return True
    self.output.append(int(token))
    for stop in self.stop:
      if stop and tuple(self.output[-len(stop):]) == tuple(stop):
        del self.output[-len(stop):]
        self.finish_reason = "stop"
        return True
    if len(self.output) >= self.max_tokens:
      self.finish_reason = "length"
      return True
    return False

  @property
  def max_length(self) -> int:
    """Tokens the request may hold in the cache (prompt + generated, the last
    generated token is never cached)."""
    return self.prompt.size + self.max_tokens - 1


class PagePool:
  """A free list of cache pages: a request reserves the pages of its whole
  length when admitted and returns them when it finishes.

  The device caches pick the page ids themselves (``PagedLatentCache.append``
  takes free pages in order); the pool guarantees there always are enough.
  """

  def __init__(self, num_pages: int, page_size: int = PAGE_SIZE):
    if num_pages < 1 or page_size < 1:
      raise ValueError(f"PagePool: num_pages and page_size must be >= 1, got {num_pages}, "
                       f"{page_size}")
    self.num_pages, self.page_size = num_pages, page_size
    self._free = collections.deque(range(num_pages))
    self._held: dict[int, list[int]] = {}

  def pages_for(self, tokens: int) -> int:
    return math.ceil(tokens / self.page_size)

  @property
  def num_free(self) -> int:
    return len(self._free)

  def can_hold(self, tokens: int) -> bool:
    return self.pages_for(tokens) <= len(self._free)

  def reserve(self, owner: int, tokens: int) -> list[int]:
    """Takes the pages for ``tokens`` tokens for ``owner`` (a slot)."""
    if owner in self._held:
      raise ValueError(f"PagePool: slot {owner} already holds pages")
    n = self.pages_for(tokens)
    if n > len(self._free):
      raise ValueError(f"PagePool: {n} pages wanted, {len(self._free)} free")
    self._held[owner] = [self._free.popleft() for _ in range(n)]
    return self._held[owner]

  def release(self, owner: int) -> None:
    self._free.extend(self._held.pop(owner))


class Engine:
  """What the scheduler needs from a model (see :class:`ModelEngine`)."""
  num_slots: int
  num_pages: int
  max_tokens_per_slot: int

  def prefill(self, slot: int, prompt: np.ndarray, request: Request) -> int:
    """Caches ``prompt`` in ``slot`` (empty) and returns the first generated token."""
    raise NotImplementedError

  def decode(self, tokens: np.ndarray, active: np.ndarray,
             requests: Sequence[Request | None]) -> np.ndarray:
    """One step: ``tokens [num_slots]`` int32 (the last token of each slot),
    ``active [num_slots]`` bool -> next tokens ``[num_slots]`` (active slots)."""
    raise NotImplementedError

  def free(self, slots: Sequence[int]) -> None:
    """Empties the slots' caches."""
    raise NotImplementedError


@dataclasses.dataclass
class ServeStats:
  prompt_tokens: int = 0
  prefill_s: float = 0.0
  decode_tokens: int = 0
  decode_steps: int = 0
  decode_s: float = 0.0
  max_running: int = 0

  @property
  def prefill_tokens_per_s(self) -> float:
    return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

  @property
  def decode_tokens_per_s(self) -> float:
    return self.decode_tokens / self.decode_s if self.decode_s else 0.0


class Scheduler:
  """Continuous batching over ``engine.num_slots`` slots (see the module docstring).

  ``run(requests)`` serves requests in arrival order: each loop admits waiting
  requests into free slots (while the page pool holds them), prefills them,
  then runs one decode step for every running request; finished requests free
  their slot and pages at once, so the next waiting request joins the next
  step.
  """

  def __init__(self, engine: Engine, *, on_step: Callable[[int], None] | None = None):
    self.engine = engine
    self.pool = PagePool(engine.num_pages)
    self.stats = ServeStats()
    self.on_step = on_step
    self.trace: list[tuple[str, Any]] = []   # ("admit", (request index, slot)), ("step", slots)

  def check(self, request: Request) -> None:
    """ValueError when ``request`` can never run on this engine."""
    if request.max_length > self.engine.max_tokens_per_slot:
      raise ValueError(f"a request of {request.prompt.size} prompt tokens + max_tokens="
                       f"{request.max_tokens} needs {request.max_length} cached tokens; a slot "
                       f"holds {self.engine.max_tokens_per_slot}")
    if self.pool.pages_for(request.max_length) > self.pool.num_pages:
      raise ValueError(f"a request of {request.max_length} tokens needs "
                       f"{self.pool.pages_for(request.max_length)} pages; the pool has "
                       f"{self.pool.num_pages}")

  def run(self, requests: Sequence[Request]) -> list[Request]:
    for r in requests:
      self.check(r)
    waiting = collections.deque(enumerate(requests))
    slots: list[Request | None] = [None] * self.engine.num_slots
    last = np.zeros(self.engine.num_slots, np.int32)
    while waiting or any(r is not None for r in slots):
      self._admit(waiting, slots, last)
      active = np.array([r is not None for r in slots])
      if not active.any():
        continue
      self.stats.max_running = max(self.stats.max_running, int(active.sum()))
      self.trace.append(("step", tuple(np.flatnonzero(active))))
      if self.on_step is not None:
        self.on_step(self.stats.decode_steps)
      t0 = time.perf_counter()
      nxt = np.asarray(self.engine.decode(last, active, slots))
      self.stats.decode_s += time.perf_counter() - t0
      self.stats.decode_steps += 1
      self.stats.decode_tokens += int(active.sum())
      done = []
      for s in np.flatnonzero(active):
        last[s] = nxt[s]
        if slots[s].add(int(nxt[s])):
          done.append(int(s))
      self._finish(done, slots)
    return list(requests)

  def _admit(self, waiting, slots, last) -> None:
    while waiting and None in slots and self.pool.can_hold(waiting[0][1].max_length):
      index, r = waiting.popleft()
      s = slots.index(None)
      self.pool.reserve(s, r.max_length)
      r.slot = s
      self.trace.append(("admit", (index, s)))
      t0 = time.perf_counter()
      first = int(self.engine.prefill(s, r.prompt, r))
      self.stats.prefill_s += time.perf_counter() - t0
      self.stats.prompt_tokens += int(r.prompt.size)
      slots[s] = r
      last[s] = first
      if r.add(first):
        self._finish([s], slots)

  def _finish(self, done: list[int], slots) -> None:
    if not done:
      return
    self.engine.free(done)
    for s in done:
      self.pool.release(s)
      slots[s] = None


# ----------------------------------------------------------------------------
# Checkpoints


def _committed(path: str) -> bool:
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.is_committed(path)


def find_checkpoint(path: str) -> str:
  """The checkpoint to load: ``path`` itself when it is a committed checkpoint,
  else the newest committed ``step_*`` under ``path`` or ``path/checkpoints``."""
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(path):
    raise UsageError(f"--checkpoint {path}: no such directory")
  if _committed(path):
    return path
  for root in (path, os.path.join(path, "checkpoints")):
    if not os.path.isdir(root):
      continue
    steps = [n for n in checkpoint.committed(root)
             if n.startswith(TRAIN_CKPT_PREFIX) and n[len(TRAIN_CKPT_PREFIX):].isdigit()]
    if steps:
      return os.path.join(root, max(steps, key=lambda n: int(n[len(TRAIN_CKPT_PREFIX):])))
  raise UsageError(f"--checkpoint {path}: no committed jaxinfra checkpoint there (nor a "
                   f"{TRAIN_CKPT_PREFIX}* one under it or under its checkpoints/)")


def _read_leaves(path: str) -> dict[str, dict]:
  """``{canonical key path: index record}`` of a committed checkpoint (no array data read)."""
  from jaxinfra.checkpoint import _format  # pylint: disable=g-import-not-at-top,protected-access
  return {_canon(k for _, k in leaf["keys"]): leaf for leaf in _format.read_index(path)["leaves"]}


def _canon(keys) -> str:
  """``a/b/0``: a key path whatever its containers (dict keys, attributes, indices)."""
  return "/".join(str(k) for k in keys)


def _model_paths(pure: Any) -> dict[str, Any]:
  """Flattens a pure dict into ``{canonical key path: leaf}``."""
  import jax  # pylint: disable=g-import-not-at-top
  from jaxinfra.checkpoint import _format  # pylint: disable=g-import-not-at-top,protected-access
  flat = jax.tree_util.tree_flatten_with_path(pure)[0]
  return {_canon(_format.key_entry(k)[1] for k in p): v for p, v in flat}


def _layout_of(leaves: dict[str, dict]) -> str:
  if any(p.startswith("model/") for p in leaves):
    return "model"
  if any(p.startswith("params/stages/") for p in leaves):
    return "pipeline"
  raise UsageError("the checkpoint holds neither a model ({'model': ...}, save_model) nor "
                   "pipelines.train parameters ({'params': {'stages', 'embed', 'head'}})")


def _checkpoint_paths(model_path: str, layout: str) -> list[str]:
  """Where a model leaf (``moe_layers/...``) lives in a checkpoint of ``layout``."""
  if layout == "model":
    return ["model/" + model_path]
  head = model_path.split("/", 1)[0]
  if head in ("embed", "dense_layers"):
    out = ["params/embed/" + model_path]
    if head == "embed":
      out.append("params/head/" + model_path)
    return out
  if head == "moe_layers":
    return ["params/stages/" + model_path.split("/", 1)[1]]
  return ["params/head/" + model_path]


def train_run(path: str) -> dict[str, Any]:
  """``pipelines.train``'s run identity next to checkpoint ``path`` (``{}`` if none)."""
  run_file = os.path.join(os.path.dirname(path), TRAIN_RUN_FILE)
  if not os.path.isfile(run_file):
    return {}
  with open(run_file) as f:
    return json.load(f)


def run_config_changes(run: dict[str, Any]) -> dict[str, Any]:
  """The config changes a training run made (``--fp8``, ``--dtype``), as ``pipelines.train``."""
  changes: dict[str, Any] = {}
  if run.get("fp8"):
    changes["linear"] = "fp8"
  if run.get("dtype"):
    changes["dtype"] = run["dtype"]
  return changes


def check_checkpoint(config, path: str, config_name: str) -> tuple[str, int | None]:
  """Checks a checkpoint against ``config`` without reading its arrays.

  Returns:
    ``(layout, num_stages)``: ``"model"`` or ``"pipeline"`` (with its stage count).

  Raises:
    UsageError: another config's checkpoint (its name, or any parameter's shape
      or dtype), or not a model checkpoint.
  """
  run = train_run(path)
  if run:
    if run.get("config") != config_name:
      raise UsageError(f"--checkpoint {path} was trained with --config {run.get('config')}, "
                       f"not --config {config_name}")
  leaves = _read_leaves(path)
  layout = _layout_of(leaves)
  saved_name = leaves.get("config")
  if layout == "model" and saved_name is not None:
    name = saved_name.get("value")
    if name != config_name:
      raise UsageError(f"--checkpoint {path} holds a model of config {name!r}, not "
                       f"--config {config_name}")
  expected = _model_paths(abstract_state(config))
  num_stages = None
  if layout == "pipeline":
    first = next(p for p in leaves if p.startswith("params/stages/"))
    num_stages = leaves[first]["shape"][0]
  problems = []
  for model_path, want in expected.items():
    for ckpt_path in _checkpoint_paths(model_path, layout):
      leaf = leaves.get(ckpt_path)
      if leaf is None:
        problems.append(f"{ckpt_path} is missing")
        continue
      shape = tuple(leaf["shape"])
      if layout == "pipeline" and ckpt_path.startswith("params/stages/"):
        shape = (shape[0] * shape[1],) + shape[2:] if len(shape) >= 2 else shape
      if shape != tuple(want.shape):
        problems.append(f"{ckpt_path} has shape {shape}, config {config_name} expects "
                        f"{tuple(want.shape)}")
      elif np.dtype(leaf["dtype"]) != np.dtype(want.dtype):
        problems.append(f"{ckpt_path} is {leaf['dtype']}, config {config_name} expects "
                        f"{np.dtype(want.dtype).name}")
  if problems:
    more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
    raise UsageError(f"--checkpoint {path} does not match --config {config_name}: "
                     + "; ".join(problems[:5]) + more)
  return layout, num_stages


def abstract_state(config, **model_kwargs) -> Any:
  """The model's parameters as a pure dict of ``jax.ShapeDtypeStruct`` (nothing allocated)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from models.deepseek_v3 import model as model_lib  # pylint: disable=g-import-not-at-top
  abstract = nnx.eval_shape(lambda: model_lib.DeepSeekV3(config, rngs=nnx.Rngs(0),
                                                         **model_kwargs))
  return nnx.to_pure_dict(nnx.state(abstract))


def _to_host(tree):
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree_util.tree_map(np.asarray, tree)


def load_model(config, path: str, config_name: str, **model_kwargs):
  """Checks (:func:`check_checkpoint`), restores and builds the model.

  ``model_kwargs`` (``mesh``, ``ep_axis``, ``moe_mode``) go to ``DeepSeekV3``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  from models.deepseek_v3 import model as model_lib  # pylint: disable=g-import-not-at-top
  layout, _ = check_checkpoint(config, path, config_name)
  tree = checkpoint.restore(path)
  if layout == "model":
    pure = _to_host(tree["model"])
  else:
    params = _to_host(tree["params"])
    pure = {"embed": params["embed"]["embed"], "dense_layers": params["embed"]["dense_layers"],
            "moe_layers": jax.tree_util.tree_map(
                lambda a: a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:]), params["stages"])}
    pure.update({k: v for k, v in params["head"].items() if k != "embed"})
  abstract = nnx.eval_shape(lambda: model_lib.DeepSeekV3(config, rngs=nnx.Rngs(0),
                                                         **model_kwargs))
  graphdef, state = nnx.split(abstract)
  want = nnx.to_pure_dict(state)
  pure = _match_keys(want, pure)
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(
      lambda w, a: jax.numpy.asarray(a, w.dtype), want, pure))
  return nnx.merge(graphdef, state)


def _match_keys(want: Any, got: Any) -> Any:
  """``got`` restructured like ``want`` (a restored tree's list indices may be
  dict keys of another type)."""
  if isinstance(want, dict):
    lookup = {str(k): v for k, v in got.items()} if isinstance(got, dict) else dict(
        (str(i), v) for i, v in enumerate(got))
    return {k: _match_keys(v, lookup[str(k)]) for k, v in want.items()}
  return got


def save_model(model, path: str, config_name: str) -> None:
  """Saves a model's parameters as ``{"model": pure dict, "config": name}``."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jaxinfra import checkpoint  # pylint: disable=g-import-not-at-top
  checkpoint.save(path, {"config": config_name, "model": nnx.to_pure_dict(nnx.state(model))})


# ----------------------------------------------------------------------------
# The model engine


def _bucket(n: int) -> int:
  return max(MIN_BUCKET, 1 << (n - 1).bit_length())


class ModelEngine(Engine):
  """Runs a ``models.deepseek_v3`` model for the :class:`Scheduler`.

  Args:
    model: the model (built with ``mesh``/``ep_axis``/``moe_mode`` for EP).
    num_slots: batch slots (the decode batch); with EP a multiple of its size.
    num_pages: pages of the pool (every layer's cache has this many).
    max_len: tokens one slot may hold (rounded up to whole pages).
    mesh: the expert-parallel mesh the model was built with, or None.
    vocab_limit: only ids below it are sampled (the tokenizer's vocabulary,
      when smaller than the model's).
  """

  def __init__(self, model, *, num_slots: int, num_pages: int, max_len: int, mesh=None,
               vocab_limit: int | None = None):
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from models.deepseek_v3 import decode as decode_lib  # pylint: disable=g-import-not-at-top
    config = model.config
    ep_size = 1 if mesh is None else mesh.size
    if num_slots % ep_size:
      raise UsageError(f"--slots={num_slots} must be a multiple of the expert-parallel size "
                       f"{ep_size} (each rank decodes slots / {ep_size} tokens)")
    self.num_slots, self.num_pages = num_slots, num_pages
    self.max_blocks = math.ceil(max_len / PAGE_SIZE)
    self.max_tokens_per_slot = self.max_blocks * PAGE_SIZE
    self.ep_size = ep_size
    self.config = config
    self._graphdef, self._state = nnx.split(model)
    self.cache = decode_lib.init_cache(config, num_pages=num_pages, max_seqs=num_slots,
                                       max_blocks=self.max_blocks, dtype=config.compute_dtype)
    # With EP: the state and caches replicated over the mesh, in and out of
    # every step (the routed experts are split inside the MoE's shard_map).
    rep = None if mesh is None else jax.sharding.NamedSharding(mesh,
                                                               jax.sharding.PartitionSpec())
    if rep is not None:
      self._state, self.cache = jax.device_put((self._state, self.cache), rep)
    graphdef = self._graphdef

    def replicated(x):
      # With EP the tokens (and so the logits) come out split over the expert
      # axis; sampling works on the whole batch.
      return x if rep is None else jax.lax.with_sharding_constraint(x, rep)

    def sample(logits, temperature, seed, position):
      if vocab_limit is not None:
        logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
      greedy = jnp.argmax(logits, -1).astype(jnp.int32)
      key = jax.random.fold_in(jax.random.key(seed), position)
      drawn = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
      return jnp.where(temperature > 0, drawn.astype(jnp.int32), greedy)

    def prefill(state, tokens, cache, seq_id, length, temperature, seed):
      model = nnx.merge(graphdef, state)
      logits, cache, ok = decode_lib.prefill(model, tokens, cache, seq_id, length)
      token = sample(replicated(logits)[0, length[0] - 1], temperature, seed, length[0])
      return token, cache, ok

    def decode(state, tokens, cache, seq_ids, temperature, seed):
      model = nnx.merge(graphdef, state)
      positions = cache.lengths[jnp.clip(seq_ids, 0, num_slots - 1)] + 1
      logits, cache, ok = decode_lib.decode_step(model, tokens[:, None], cache, seq_ids)
      logits = replicated(logits[:, 0])
      return jax.vmap(sample)(logits, temperature, seed, positions), cache, ok

    self._prefill_fn = jax.jit(prefill, donate_argnums=(2,), out_shardings=rep)
    self._decode_fn = jax.jit(decode, donate_argnums=(2,), out_shardings=rep)
    self._free_fn = jax.jit(lambda cache, seq_ids: cache.free(seq_ids), donate_argnums=(0,),
                            out_shardings=rep)
    self._compiled: dict[Any, Any] = {}

  def compile(self, prompt_lengths: Sequence[int]) -> float:
    """Compiles decode and the prefill buckets of ``prompt_lengths``; seconds taken."""
    import jax  # pylint: disable=g-import-not-at-top
    t0 = time.perf_counter()
    i32, f32 = np.int32, np.float32
    n = self.num_slots
    if "decode" not in self._compiled:
      self._compiled["decode"] = self._decode_fn.lower(
          self._state, np.zeros(n, i32), self.cache, np.zeros(n, i32), np.zeros(n, f32),
          np.zeros(n, np.uint32)).compile()
      self._compiled["free"] = self._free_fn.lower(self.cache, np.zeros(n, i32)).compile()
    for b in sorted({_bucket(length) for length in prompt_lengths}):
      if b not in self._compiled:
        self._compiled[b] = self._prefill_fn.lower(
            self._state, np.zeros((1, b), i32), self.cache, np.zeros(1, i32), np.ones(1, i32),
            f32(0), np.uint32(0)).compile()
    del jax
    return time.perf_counter() - t0

  def prefill(self, slot: int, prompt: np.ndarray, request: Request) -> int:
    b = _bucket(prompt.size)
    self.compile([prompt.size])
    tokens = np.zeros((1, b), np.int32)
    tokens[0, :prompt.size] = prompt
    token, self.cache, ok = self._compiled[b](
        self._state, tokens, self.cache, np.array([slot], np.int32),
        np.array([prompt.size], np.int32), np.float32(request.temperature),
        np.uint32(request.seed))
    if not bool(ok[0]):
      raise RuntimeError(f"prefill of slot {slot} did not fit in the cache (a PagePool bug)")
    return int(token)

  def decode(self, tokens, active, requests) -> np.ndarray:
    self.compile([])
    seq_ids = np.where(active, np.arange(self.num_slots), -1).astype(np.int32)
    temps = np.array([r.temperature if r is not None else 0.0 for r in requests], np.float32)
    seeds = np.array([r.seed if r is not None else 0 for r in requests], np.uint32)
    out, self.cache, ok = self._compiled["decode"](
        self._state, np.asarray(tokens, np.int32), self.cache, seq_ids, temps, seeds)
    ok = np.asarray(ok)
    if not ok[active].all():
      raise RuntimeError(f"decode: slots {np.flatnonzero(active & ~ok)} did not fit in the "
                         "cache (a PagePool bug)")
    return np.asarray(out)

  def free(self, slots: Sequence[int]) -> None:
    self.compile([])
    seq_ids = np.full(self.num_slots, -1, np.int32)   # one shape: padded with -1 (ignored)
    seq_ids[:len(slots)] = slots
    self.cache = self._compiled["free"](self.cache, seq_ids)


# ----------------------------------------------------------------------------
# Command line


def build_mesh(expert: int):
  """A 1-D ``expert`` mesh over the first ``expert`` devices, or None for 1."""
  import jax  # pylint: disable=g-import-not-at-top
  if expert <= 1:
    return None
  if expert > jax.device_count():
    raise UsageError(f"--expert={expert} exceeds the {jax.device_count()} devices")
  # Auto axes: the MoE layers' own shard_map splits the experts; everything
  # else is replicated (see ModelEngine).
  return jax.make_mesh((expert,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:expert])


def make_requests(prompts: Sequence[str], *, max_tokens: int, temperature: float, seed: int,
                  stop: Sequence[str]) -> list[Request]:
  """Byte-level requests (BOS + UTF-8 bytes); request ``i`` samples with ``seed + i``."""
  from pipelines import data  # pylint: disable=g-import-not-at-top
  tok = data.ByteTokenizer()
  stops = tuple(tuple(int(t) for t in tok.encode(s)) for s in stop if s)
  return [Request(np.concatenate([[tok.bos_id], tok.encode(p)]).astype(np.int32),
                  max_tokens=max_tokens, temperature=temperature, seed=seed + i, stop=stops,
                  eos_id=tok.eos_id) for i, p in enumerate(prompts)]


def decode_text(tokens: Sequence[int]) -> str:
  from pipelines import data  # pylint: disable=g-import-not-at-top
  return data.ByteTokenizer().decode(np.asarray(tokens, np.int32)).decode("utf-8", "replace")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m pipelines.serve", description=__doc__.splitlines()[0])
  p.add_argument("--config", default="tiny", help="model config (tiny, small, 671b)")
  p.add_argument("--checkpoint", required=True,
                 help="pipelines.train output/checkpoint directory, or a save_model checkpoint")
  p.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for more)")
  p.add_argument("--max-tokens", type=int, default=32, help="tokens to generate per request")
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  p.add_argument("--seed", type=int, default=0, help="sampling seed of the first request")
  p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
  p.add_argument("--slots", type=int, default=8, help="concurrent requests (decode batch)")
  p.add_argument("--pages", type=int, default=None,
                 help="cache pages of 64 tokens (default: enough for every slot)")
  p.add_argument("--expert", type=int, default=None,
                 help="devices the routed experts are sharded over, with low-latency dispatch "
                      "(default: all devices if they divide the experts and the slots, else 1)")
  p.add_argument("--cpu-devices", type=int, default=8, help="CPU devices when on CPU")
  p.add_argument("--profile", default=None, help="capture a trace of two decode steps here")
  p.add_argument("--json", default=None, help="also write the outputs and speeds here")
  return p.parse_args(argv)


def serve(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the command; returns the outputs and speeds. ``UsageError`` on bad input."""
  import jax  # pylint: disable=g-import-not-at-top
  from models.deepseek_v3 import config as cfg_lib  # pylint: disable=g-import-not-at-top
  from pipelines import data  # pylint: disable=g-import-not-at-top
  try:
    config = cfg_lib.get_config(args.config)
  except ValueError as e:
    raise UsageError(f"--config: {e}") from None
  if config.vocab_size < data.BYTE_VOCAB_SIZE:
    raise UsageError(f"--config {args.config}: vocab_size={config.vocab_size} is smaller than "
                     f"the byte tokenizer's {data.BYTE_VOCAB_SIZE} ids")
  if not config.supports_paged_decode:
    raise UsageError(f"--config {args.config}: paged MLA decode needs kv_lora_rank=512 and "
                     f"qk_rope_head_dim=64")
  if args.slots < 1 or args.max_tokens < 1:
    raise UsageError("--slots and --max-tokens must be >= 1")
  path = find_checkpoint(args.checkpoint)
  changes = run_config_changes(train_run(path))
  if changes:
    config = config.replace(**changes)
  check_checkpoint(config, path, args.config)         # before any compilation
  requests = make_requests(args.prompt, max_tokens=args.max_tokens,
                           temperature=args.temperature, seed=args.seed, stop=args.stop)
  max_len = max(r.max_length for r in requests)
  if max_len > config.rope.max_position:
    raise UsageError(f"prompt + --max-tokens = {max_len} tokens exceeds the model's "
                     f"max_position {config.rope.max_position}")
  expert = args.expert
  if expert is None:
    n = jax.device_count()
    expert = n if n > 1 and config.n_routed_experts % n == 0 and args.slots % n == 0 else 1
  if config.n_routed_experts % expert:
    raise UsageError(f"--expert={expert} does not divide the {config.n_routed_experts} experts")
  mesh = build_mesh(expert)
  kwargs = {} if mesh is None else dict(mesh=mesh, ep_axis="expert", moe_mode="low_latency")
  model = load_model(config, path, args.config, **kwargs)
  num_pages = args.pages or args.slots * math.ceil(max_len / PAGE_SIZE)
  engine = ModelEngine(model, num_slots=args.slots, num_pages=num_pages, max_len=max_len,
                       mesh=mesh, vocab_limit=data.BYTE_VOCAB_SIZE)
  log(f"{args.config} from {path}; {len(requests)} request(s), {args.slots} slots, {num_pages} "
      f"pages of {PAGE_SIZE}; experts over {expert} device(s)"
      + (" (low-latency dispatch)" if mesh is not None else ""))
  compile_s = engine.compile([r.prompt.size for r in requests])
  log(f"compiled in {compile_s:.1f} s")
  scheduler = Scheduler(engine, on_step=_profiler(args.profile, log))
  scheduler.run(requests)
  if args.profile:
    scheduler.on_step(-1)
  st = scheduler.stats
  result = {
      "outputs": [{"prompt": p, "text": decode_text(r.output), "tokens": r.output,
                   "finish_reason": r.finish_reason} for p, r in zip(args.prompt, requests)],
      "prompt_tokens": st.prompt_tokens, "prefill_tokens_per_s": st.prefill_tokens_per_s,
      "decode_tokens": st.decode_tokens, "decode_steps": st.decode_steps,
      "decode_tokens_per_s": st.decode_tokens_per_s, "max_concurrent": st.max_running,
      "compile_s": compile_s, "expert_parallel": expert}
  for out in result["outputs"]:
    log(f"--- {out['prompt']!r} ({out['finish_reason']}, {len(out['tokens'])} tokens)\n"
        f"{out['text']}")
  log(f"prefill: {st.prompt_tokens} tokens, {st.prefill_tokens_per_s:,.0f} tokens/s; decode: "
      f"{st.decode_tokens} tokens in {st.decode_steps} steps, {st.decode_tokens_per_s:,.0f} "
      f"tokens/s (up to {st.max_running} concurrent)")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(result, f, indent=1)
  return result


def _profiler(log_dir: str | None, log) -> Callable[[int], None] | None:
  """An ``on_step`` hook that traces decode steps 1 and 2 (call it with ``-1`` at the end)."""
  if not log_dir:
    return None
  import contextlib  # pylint: disable=g-import-not-at-top
  from jaxinfra import profile  # pylint: disable=g-import-not-at-top
  stack = contextlib.ExitStack()
  state = {"open": False}

  def on_step(step: int) -> None:
    if step == 1 and not state["open"]:
      stack.enter_context(profile.capture(log_dir))
      state["open"] = True
    elif (step == 3 or step == -1) and state["open"]:
      stack.close()
      state["open"] = False
      log(f"profile trace of decode steps 1-2 in {log_dir} (jaxinfra profile-report {log_dir})")

  return on_step


def main(argv: Sequence[str] | None = None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  if args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  try:
    serve(args)
  except UsageError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
