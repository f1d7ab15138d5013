"""pipelines.serve: the scheduler and page pool against a deterministic fake
model (written here), and the real tiny DeepSeek-V3 end to end: batched
continuous decoding equals decoding each request alone; bad checkpoints."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from pipelines import serve


class FakeEngine(serve.Engine):
  """Next token = a hash of the slot's whole history (so any mix-up of slots,
  lost or repeated tokens changes the output). Tracks page use like a cache."""

  def __init__(self, num_slots=3, num_pages=6, max_tokens_per_slot=128, vocab=50):
    self.num_slots, self.num_pages = num_slots, num_pages
    self.max_tokens_per_slot, self.vocab = max_tokens_per_slot, vocab
    self.history = [None] * num_slots
    self.calls = []

  def _next(self, history, request):
    h = 0
    for t in history:
      h = (h * 1000003 + int(t) + 1) % (2 ** 61 - 1)
    if request.temperature > 0:   # "sampling": depends on the seed and position only
      h = (h + request.seed * 7919 + len(history)) % (2 ** 61 - 1)
    return h % self.vocab

  def prefill(self, slot, prompt, request):
    assert self.history[slot] is None, f"slot {slot} reused before it was freed"
    self.history[slot] = list(prompt)
    self.calls.append(("prefill", slot))
    return self._next(self.history[slot], request)

  def decode(self, tokens, active, requests):
    out = np.zeros(self.num_slots, np.int32)
    for s in np.flatnonzero(active):
      self.history[s].append(int(tokens[s]))
      out[s] = self._next(self.history[s], requests[s])
    self.calls.append(("decode", tuple(np.flatnonzero(active))))
    return out

  def free(self, slots):
    for s in slots:
      self.history[s] = None


def _requests(lengths, max_tokens, **kw):
  rng = np.random.default_rng(0)
  return [serve.Request(rng.integers(0, 50, n), max_tokens=m, **kw)
          for n, m in zip(lengths, max_tokens)]


def _alone(engine_factory, request):
  r = serve.Request(request.prompt, max_tokens=request.max_tokens,
                    temperature=request.temperature, seed=request.seed, stop=request.stop,
                    eos_id=request.eos_id)
  serve.Scheduler(engine_factory()).run([r])
  return r.output, r.finish_reason


def test_continuous_batching_equals_alone_with_fake_model():
  reqs = _requests([5, 70, 3, 12, 40, 8, 1], [4, 9, 1, 15, 6, 3, 7])
  sched = serve.Scheduler(FakeEngine())
  sched.run(reqs)
  for r in reqs:
    assert (r.output, r.finish_reason) == _alone(FakeEngine, r)
    assert r.finish_reason == "length" and len(r.output) == r.max_tokens
  # Continuous batching: a request was admitted while others were still decoding.
  admits = [i for i, (kind, _) in enumerate(sched.trace) if kind == "admit"]
  steps = [i for i, (kind, _) in enumerate(sched.trace) if kind == "step"]
  assert admits[-1] > steps[0]
  assert sched.stats.max_running == 3
  assert sched.pool.num_free == sched.pool.num_pages   # every page returned


def test_page_pool_limits_admission():
  # 6 pages of 64: the 70+9-token request takes 2 pages, 130+10 takes 3: with
  # both running only 1 page is left, so the third (2 pages) waits.
  reqs = _requests([70, 130, 100], [10, 11, 5])
  sched = serve.Scheduler(FakeEngine(num_slots=3, num_pages=6, max_tokens_per_slot=256))
  sched.run(reqs)
  admitted = [a for kind, a in sched.trace if kind == "admit"]
  assert [i for i, _ in admitted] == [0, 1, 2]
  first_step_of = {}
  for i, (kind, a) in enumerate(sched.trace):
    if kind == "admit":
      first_step_of[a[0]] = i
  steps_before_third = [k for k, _ in sched.trace[:first_step_of[2]] if k == "step"]
  assert len(steps_before_third) >= 9   # waited for request 0 to finish and free its pages
  for r in reqs:
    assert (r.output, r.finish_reason) == _alone(
        lambda: FakeEngine(num_slots=3, num_pages=6, max_tokens_per_slot=256), r)


def test_pool_free_list():
  pool = serve.PagePool(4)
  assert pool.reserve(0, 65) == [0, 1] and pool.num_free == 2
  assert not pool.can_hold(129)
  with pytest.raises(ValueError, match="already holds"):
    pool.reserve(0, 1)
  pool.release(0)
  assert pool.num_free == 4


def test_stop_eos_and_sampling_seeds():
  engine = FakeEngine()
  base = _requests([6], [20])[0]
  serve.Scheduler(FakeEngine()).run([base])
  out = base.output
  stop = tuple(out[3:5])
  r = serve.Request(base.prompt, max_tokens=20, stop=(stop,))
  eos = serve.Request(base.prompt, max_tokens=20, eos_id=out[2])
  serve.Scheduler(engine).run([r, eos])
  assert r.finish_reason == "stop" and r.output == out[:out.index(stop[0], 3)]
  assert eos.finish_reason == "eos" and eos.output == out[:2]
  a, b, c = (serve.Request(base.prompt, max_tokens=8, temperature=1.0, seed=s)
             for s in (1, 1, 2))
  serve.Scheduler(FakeEngine()).run([a, b, c])
  assert a.output == b.output != c.output


def test_bad_requests():
  with pytest.raises(ValueError, match="at least one token"):
    serve.Request(np.zeros(0, np.int32))
  with pytest.raises(ValueError, match="max_tokens"):
    serve.Request(np.ones(3, np.int32), max_tokens=0)
  sched = serve.Scheduler(FakeEngine(num_pages=2, max_tokens_per_slot=1000))
  with pytest.raises(ValueError, match="pages"):
    sched.run([serve.Request(np.ones(200, np.int32), max_tokens=10)])
  sched = serve.Scheduler(FakeEngine(max_tokens_per_slot=64))
  with pytest.raises(ValueError, match="a slot holds 64"):
    sched.run([serve.Request(np.ones(60, np.int32), max_tokens=10)])


# ----------------------------------------------------------------------------
# The real tiny model


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  """A freshly initialized tiny model saved with serve.save_model (pipelines.train's
  checkpoints are read too, see test_pipeline_layout_checkpoint)."""
  from models.deepseek_v3 import config as cfg_lib
  from models.deepseek_v3 import model as model_lib
  config = cfg_lib.get_config("tiny")
  model = nnx.jit(lambda: model_lib.DeepSeekV3(config, rngs=nnx.Rngs(3)))()
  path = str(tmp_path_factory.mktemp("serve") / "model")
  serve.save_model(model, path, "tiny")
  return path, model


def test_other_config_checkpoint_is_rejected_before_compiling(tiny_checkpoint, tmp_path,
                                                              capsys):
  from models.deepseek_v3 import config as cfg_lib
  from models.deepseek_v3 import model as model_lib
  path, _ = tiny_checkpoint
  other = cfg_lib.get_config("tiny", dim=32)
  with pytest.raises(serve.UsageError, match="does not match --config tiny"):
    serve.check_checkpoint(cfg_lib.get_config("tiny"), _save_other(other, tmp_path), "tiny")
  with pytest.raises(serve.UsageError, match="holds a model of config 'tiny'"):
    serve.check_checkpoint(cfg_lib.get_config("small"), path, "small")
  bad = _save_other(other, tmp_path / "b")
  compiles = []
  listener = lambda event, duration, **kw: compiles.append(event) if event.endswith(
      "backend_compile_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    rc = serve.main(["--checkpoint", bad, "--prompt", "x", "--cpu-devices", "0"])
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert rc == 2 and "does not match --config tiny" in capsys.readouterr().err
  assert not compiles, compiles   # refused before compiling anything
  assert serve.main(["--checkpoint", str(tmp_path / "none"), "--prompt", "x",
                     "--cpu-devices", "0"]) == 2
  del model_lib


def _save_other(config, directory):
  from models.deepseek_v3 import model as model_lib
  model = nnx.eval_shape(lambda: model_lib.DeepSeekV3(config, rngs=nnx.Rngs(0)))
  state = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                 nnx.to_pure_dict(nnx.state(model)))
  path = os.path.join(str(directory), "other")
  from jaxinfra import checkpoint
  checkpoint.save(path, {"config": "tiny", "model": state})
  return path


def test_pipeline_layout_checkpoint(tiny_checkpoint, tmp_path):
  """pipelines.train's layout ({'params': PipelineParams, ...}, run.json) maps back to the model."""
  from flax import nnx as nnx_
  from jaxinfra import checkpoint
  from models.deepseek_v3 import config as cfg_lib
  from models.deepseek_v3 import pipeline as pipeline_lib
  _, model = tiny_checkpoint
  parts = pipeline_lib.pipeline_parts(model, num_stages=2)
  ckpt_dir = tmp_path / "checkpoints"
  checkpoint.save(str(ckpt_dir / "step_00000010"),
                  {"params": parts.params, "opt_state": {"mu": np.zeros(3)}, "step": 10,
                   "seed": 0})
  (ckpt_dir / "run.json").write_text('{"config": "tiny"}')
  path = serve.find_checkpoint(str(tmp_path))
  assert path.endswith("step_00000010")
  loaded = serve.load_model(cfg_lib.get_config("tiny"), path, "tiny")
  want = jax.tree_util.tree_leaves(nnx_.to_pure_dict(nnx_.state(model)))
  got = jax.tree_util.tree_leaves(nnx_.to_pure_dict(nnx_.state(loaded)))
  assert len(want) == len(got)
  for a, b in zip(want, got):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  (ckpt_dir / "run.json").write_text('{"config": "small"}')
  with pytest.raises(serve.UsageError, match="trained with --config small"):
    serve.check_checkpoint(cfg_lib.get_config("tiny"), path, "tiny")


@pytest.mark.slow
def test_batched_equals_alone_tiny_model_expert_parallel(tiny_checkpoint):
  """Greedy continuous batching over 8 slots with experts on 8 devices
  (low-latency dispatch) equals each request decoded alone."""
  from models.deepseek_v3 import config as cfg_lib
  path, _ = tiny_checkpoint
  config = cfg_lib.get_config("tiny")
  mesh = serve.build_mesh(8)
  model = serve.load_model(config, path, "tiny", mesh=mesh, ep_axis="expert",
                           moe_mode="low_latency")
  prompts = ["The quick brown fox", "def f(x):", "a", "import jax.numpy as jnp\n",
             "Hello, world", "0123456789", "xyz", "MLA", "one more, the ninth", "ten"]
  max_tokens = [12, 5, 9, 3, 7, 11, 2, 6, 8, 4]
  reqs = [serve.make_requests([p], max_tokens=m, temperature=0.0, seed=0, stop=[])[0]
          for p, m in zip(prompts, max_tokens)]
  engine = serve.ModelEngine(model, num_slots=8, num_pages=16, max_len=64, mesh=mesh,
                             vocab_limit=259)
  engine.compile([r.prompt.size for r in reqs])
  sched = serve.Scheduler(engine)
  sched.run(reqs)
  assert sched.stats.max_running == 8   # 10 requests through 8 slots: continuous batching
  assert sched.stats.decode_tokens_per_s > 0 and sched.stats.prefill_tokens_per_s > 0
  for r in reqs:
    alone = serve.make_requests(["x"], max_tokens=r.max_tokens, temperature=0.0, seed=0,
                                stop=[])[0]
    alone.prompt = r.prompt
    serve.Scheduler(engine).run([alone])
    assert alone.output == r.output, (r.prompt, alone.output, r.output)
    assert len(r.output) == r.max_tokens or r.finish_reason == "eos"
  # Sampling with temperature is seeded per request: the same alone and batched.
  hot = serve.make_requests(prompts[:3], max_tokens=5, temperature=0.8, seed=11, stop=[])
  serve.Scheduler(engine).run(hot)
  again = serve.make_requests(prompts[:3], max_tokens=5, temperature=0.8, seed=11, stop=[])
  for r in again:
    serve.Scheduler(engine).run([r])
  assert [r.output for r in hot] == [r.output for r in again]


def test_train_run_settings_become_config_changes(tmp_path):
  (tmp_path / "run.json").write_text('{"config": "tiny", "fp8": true, "dtype": "bfloat16"}')
  run = serve.train_run(str(tmp_path / "step_00000004"))
  assert serve.run_config_changes(run) == {"linear": "fp8", "dtype": "bfloat16"}
  assert serve.train_run(str(tmp_path / "x" / "step_1")) == {}
