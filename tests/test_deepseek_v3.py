"""DeepSeek-V3 model (models/deepseek_v3): forward and loss, the load probe, the
pipeline cut (DualPipeV over pp x dp x ep vs the plain model), prefill + decode
vs the full forward, the 671B parameter count, and the Hugging Face loader."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models.deepseek_v3 import config as config_lib
from models.deepseek_v3 import decode as decode_lib
from models.deepseek_v3 import hf
from models.deepseek_v3 import model as model_lib
from models.deepseek_v3 import pipeline as pipeline_lib

TINY = config_lib.get_config("tiny")


@pytest.fixture(scope="module")
def tiny():
  return model_lib.build(TINY, seed=0)


def _tokens(key, shape, vocab=TINY.vocab_size):
  return jax.random.randint(jax.random.key(key), shape, 0, vocab, dtype=jnp.int32)


def _functional_loss(model):
  graphdef, state = nnx.split(model)

  def fn(pure, tokens, targets):
    return model_lib.loss(nnx.merge(graphdef, pure), tokens, targets)

  return fn, nnx.to_pure_dict(state)


# --- model ----------------------------------------------------------------------------------------


def test_forward_shapes_loss_and_load_probe(tiny):
  tokens = _tokens(1, (2, 17))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  fn, pure = _functional_loss(tiny)
  (total, aux), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(pure, inputs, targets)
  out = nnx.jit(lambda m, t, n: m(t, n))(tiny, inputs, targets)
  assert out.logits.shape == (2, 16, TINY.vocab_size) and out.logits.dtype == jnp.float32
  assert out.mtp_logits.shape == (2, 16, TINY.vocab_size)
  assert out.stats.tokens_per_expert.shape == (TINY.n_moe_layers, TINY.n_routed_experts)
  # Each layer routes every token to top_k experts.
  np.testing.assert_array_equal(np.asarray(out.stats.tokens_per_expert).sum(-1),
                                2 * 16 * TINY.n_activated_experts)
  # The loss against a float64 NumPy cross-entropy of the logits.
  def ce(logits, labels):
    logits = np.asarray(logits, np.float64)
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return np.mean(logz - np.take_along_axis(logits, np.asarray(labels)[..., None], -1)[..., 0])
  want_ce = ce(out.logits, targets)
  want_mtp = ce(out.mtp_logits[:, :-1], targets[:, 1:])
  np.testing.assert_allclose(float(aux.ce), want_ce, rtol=1e-5)
  np.testing.assert_allclose(float(aux.mtp_ce), want_mtp, rtol=1e-5)
  np.testing.assert_allclose(float(total), want_ce + TINY.mtp_loss_weight * want_mtp, rtol=1e-5)
  # The load probe: the routing biases' gradients are the forward's tokens per expert.
  np.testing.assert_array_equal(np.asarray(grads["moe_layers"]["ffn"]["gate_bias"]),
                                np.asarray(aux.stats.tokens_per_expert, np.float32))
  np.testing.assert_array_equal(np.asarray(grads["mtp"]["block"]["ffn"]["gate_bias"]),
                                np.asarray(aux.mtp_stats.tokens_per_expert[0], np.float32))
  # Real gradients reach every other parameter.
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.all(np.isfinite(np.asarray(g))), jax.tree_util.keystr(path)


@pytest.mark.slow
def test_fp8_linear_layers_track_the_dense_model(tiny):
  """linear="fp8" (jaxinfra.gemm.Fp8Dense) with the dense model's weights: the
  loss within 2% and finite gradients."""
  fp8 = model_lib.build(TINY.replace(linear="fp8"), seed=0)
  assert type(fp8.moe_layers.attn.wq_a).__name__ == "Fp8Dense"
  projections = {"wq_a", "wq_b", "wq", "wkv_a", "wo", "gate_proj", "up_proj", "down_proj",
                 "eh_proj"}
  def convert(path, leaf):  # nnx.Linear kernels [..., in, out] -> Fp8Dense [..., out, in]
    names = [str(getattr(k, "key", k)) for k in path]
    return jnp.swapaxes(leaf, -1, -2) if names[-2] in projections else leaf
  pure = jax.tree_util.tree_map_with_path(convert, nnx.to_pure_dict(nnx.state(tiny)))
  nnx.update(fp8, pure)
  tokens = _tokens(7, (2, 17))
  fn, _ = _functional_loss(tiny)
  want = jax.jit(fn)(nnx.to_pure_dict(nnx.state(tiny)), tokens[:, :-1], tokens[:, 1:])[0]
  fn8, pure8 = _functional_loss(fp8)
  (got, _), grads = jax.jit(jax.value_and_grad(fn8, has_aux=True))(pure8, tokens[:, :-1],
                                                                    tokens[:, 1:])
  np.testing.assert_allclose(float(got), float(want), rtol=0.02)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


def test_update_bias_moves_against_the_load():
  model = model_lib.build(TINY, seed=1)
  loads = np.zeros((TINY.n_moe_layers, TINY.n_routed_experts), np.int32)
  loads[:, 0] = 10  # expert 0 overloaded, the others under the mean
  stats = jax.tree_util.tree_map(jnp.asarray, (loads, loads, np.zeros(TINY.n_moe_layers)))
  from jaxinfra.moe import MoEStats  # pylint: disable=g-import-not-at-top
  model.update_bias(MoEStats(*stats), rate=0.01)
  bias = np.asarray(model.moe_layers.ffn.gate_bias[...])
  np.testing.assert_allclose(bias[:, 0], -0.01)
  np.testing.assert_allclose(bias[:, 1:], 0.01)


def test_bad_inputs(tiny):
  with pytest.raises(ValueError, match=r"4 MoE layers .*n_layers=5 - n_dense_layers=1.*num_stages=3"):
    pipeline_lib.pipeline_parts(tiny, 3)
  with pytest.raises(ValueError, match="tokens must be an integer"):
    tiny(jnp.zeros((2, 4), jnp.float32))
  with pytest.raises(ValueError, match="n_routed_experts=16 must be divisible by n_expert_groups"):
    TINY.replace(n_expert_groups=3)
  mesh = jax.make_mesh((8,), ("expert",))
  with pytest.raises(ValueError, match="n_routed_experts=12 is not divisible by the 8 devices"):
    config_lib.check_mesh(TINY.replace(n_routed_experts=12, n_expert_groups=2, n_limited_groups=2),
                          mesh, expert_axis="expert")
  with pytest.raises(ValueError, match="paged MLA decode needs kv_lora_rank=512"):
    decode_lib.init_cache(TINY.replace(kv_lora_rank=256), num_pages=4, max_seqs=2, max_blocks=2)


# --- pipeline -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_dualpipev_matches_model(tiny):
  """Loss and gradients of DualPipeV over (data 2, pipe 2, expert 2) equal the model's."""
  from jaxinfra import pipeline  # pylint: disable=g-import-not-at-top
  explicit = (jax.sharding.AxisType.Explicit,) * 3
  mesh = jax.make_mesh((2, 2, 2), ("data", "pipe", "expert"), axis_types=explicit)
  parts = pipeline_lib.pipeline_parts(tiny, 4, ep_axis="expert")
  assert parts.layers_per_stage == 1
  tokens = _tokens(2, (16, 17))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  loss, grads = pipeline.pipeline_step(
      parts.stage_fn, parts.params, inputs, parts.labels(targets), parts.loss_fn, mesh=mesh,
      axis="pipe", schedule="dualpipev", num_chunks=4, embed_fn=parts.embed_fn,
      batch_axes=("data", "expert"), stage_specs=parts.stage_specs)
  fn, pure = _functional_loss(tiny)
  (want, aux), want_grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(pure, inputs, targets)
  np.testing.assert_allclose(float(loss), float(want), rtol=1e-5)
  got = parts.grads_to_pure(grads)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got),
                          jax.tree_util.tree_leaves(want_grads)):
    g, w = np.asarray(g), np.asarray(w)
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max(),
                               err_msg=jax.tree_util.keystr(path))
  loads, mtp_loads = parts.loads(grads)
  np.testing.assert_array_equal(np.asarray(loads), np.asarray(aux.stats.tokens_per_expert))
  np.testing.assert_array_equal(np.asarray(mtp_loads), np.asarray(aux.mtp_stats.tokens_per_expert))
  # Tied embedding and the bias step.
  tied = parts.tie_grads(grads)
  np.testing.assert_array_equal(np.asarray(tied.embed["embed"]["embedding"]),
                                np.asarray(tied.head["embed"]["embedding"]))
  updated = parts.update_bias(parts.params, grads, rate=0.5)
  bias = np.asarray(updated.stages["ffn"]["gate_bias"]).reshape(TINY.n_moe_layers, -1)
  load = np.asarray(aux.stats.tokens_per_expert, np.float64)
  np.testing.assert_allclose(bias, -0.5 * np.sign(load - load.mean(-1, keepdims=True)))
  # Back to the model.
  model = parts.to_model(parts.params)
  np.testing.assert_array_equal(np.asarray(model.moe_layers.ffn.w_up[...]),
                                np.asarray(tiny.moe_layers.ffn.w_up[...]))


def test_pipeline_parts_layout(tiny):
  parts = pipeline_lib.pipeline_parts(tiny, 2, ep_axis="expert")
  assert parts.layers_per_stage == 2
  w = parts.params.stages["ffn"]["w_gate"]
  assert w.shape == (2, 2, TINY.n_routed_experts, TINY.moe_inter_dim, TINY.dim)
  np.testing.assert_array_equal(np.asarray(w[1, 0]), np.asarray(tiny.moe_layers.ffn.w_gate[...][2]))
  specs = parts.stage_specs
  assert specs["ffn"]["w_down"] == jax.sharding.PartitionSpec(None, "expert")
  assert specs["ffn"]["router"] == jax.sharding.PartitionSpec()
  # Optimizer helpers: the biases are not trained; the tied table counts once in the norm.
  mask = parts.trainable_mask(parts.params)
  assert not mask.stages["ffn"]["gate_bias"] and mask.stages["ffn"]["router"]
  assert not mask.head["mtp"]["block"]["ffn"]["gate_bias"]
  ones = jax.tree_util.tree_map(jnp.ones_like, parts.params)
  count = model_lib.param_count(TINY)
  np.testing.assert_allclose(float(parts.global_norm(ones)) ** 2, count.main + count.mtp,
                             rtol=1e-6)
  back = parts.to_pure(parts.params)
  want = nnx.to_pure_dict(nnx.state(tiny))
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(want)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- decode ---------------------------------------------------------------------------------------


def test_prefill_and_decode_match_the_forward(tiny):
  tokens = _tokens(3, (3, 10))
  prompt = 6
  full = nnx.jit(lambda m, t: m(t).logits)(tiny, tokens)
  cache = decode_lib.init_cache(TINY, num_pages=8, max_seqs=4, max_blocks=2, dtype=jnp.float32)
  seq_ids = jnp.array([2, 0, 1], jnp.int32)
  logits, cache, ok = nnx.jit(decode_lib.prefill)(tiny, tokens[:, :prompt], cache, seq_ids)
  assert bool(jnp.all(ok))
  np.testing.assert_allclose(np.asarray(logits), np.asarray(full[:, :prompt]), rtol=1e-5,
                             atol=1e-5)
  step = nnx.jit(decode_lib.decode_step)
  for i in range(prompt, tokens.shape[1]):
    logits, cache, ok = step(tiny, tokens[:, i:i + 1], cache, seq_ids)
    assert bool(jnp.all(ok))
    np.testing.assert_allclose(np.asarray(logits[:, 0]), np.asarray(full[:, i]), rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [10, 10, 10, 0])
  # A sequence slot that does not exist: NaN logits, never a silent answer.
  logits, _, ok = step(tiny, tokens[:1, :1], cache, jnp.array([7], jnp.int32))
  assert not bool(ok[0]) and bool(jnp.all(jnp.isnan(logits)))


@pytest.mark.slow
def test_low_latency_expert_parallel_decode_matches_local(tiny):
  """Decode with DeepEP-style low-latency dispatch over 2 EP ranks equals local experts."""
  mesh = jax.make_mesh((2,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
  ep = model_lib.build(TINY, seed=5, mesh=mesh, ep_axis="expert", moe_mode="low_latency")
  nnx.update(ep, nnx.state(tiny))
  tokens = _tokens(6, (4, 7))
  seq_ids = jnp.arange(4, dtype=jnp.int32)
  cache = decode_lib.init_cache(TINY, num_pages=8, max_seqs=4, max_blocks=1, dtype=jnp.float32)
  _, cache, _ = nnx.jit(decode_lib.prefill)(tiny, tokens[:, :5], cache, seq_ids)
  local, ll = cache, cache
  step = nnx.jit(decode_lib.decode_step)
  for i in range(5, 7):
    want, local, _ = step(tiny, tokens[:, i:i + 1], local, seq_ids)
    got, ll, ok = step(ep, tokens[:, i:i + 1], ll, seq_ids)
    assert bool(jnp.all(ok))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# --- parameter count ------------------------------------------------------------------------------


def test_param_count_671b_matches_published():
  """DeepSeek-V3 (arXiv 2412.19437, abstract): "671B total parameters with 37B
  activated for each token"; the Hugging Face model card: "685B, which includes
  671B of the Main Model weights and 14B of the Multi-Token Prediction (MTP)
  Module weights" (685B counts the checkpoint's tensors, the FP8 weights'
  scales included)."""
  c = config_lib.CONFIGS["671b"]
  count = model_lib.param_count(c)
  # Independent count from the architecture.
  D, H, V = c.dim, c.n_heads, c.vocab_size
  qk = c.qk_nope_head_dim + c.qk_rope_head_dim
  attn = (D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * qk
          + D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
          + c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D)
  expert = 3 * D * c.moe_inter_dim
  moe = D * c.n_routed_experts + (c.n_routed_experts + c.n_shared_experts) * expert
  dense_layer = attn + 3 * D * c.inter_dim + 2 * D
  moe_layer = attn + moe + 2 * D
  main = 2 * V * D + D + c.n_dense_layers * dense_layer + c.n_moe_layers * moe_layer
  mtp = moe_layer + 2 * D + 2 * D * D + D
  assert count.main == main == 671_026_404_352
  assert count.mtp == mtp
  assert count.mtp_checkpoint == mtp + 2 * V * D
  assert round(count.main / 1e9) == 671
  assert int(count.activated / 1e9) == 37   # 37.55B: "37B activated"
  assert 13 < count.mtp_checkpoint / 1e9 < 14  # 13.46B; the card's 14B is 685B - 671B
  # The checkpoint's tensors: weights, 128x128 scales of the FP8 ones, routing biases.
  specs = hf.checkpoint_tensors(c)
  weights = sum(int(np.prod(s.shape)) for s in specs.values())
  scales = sum(int(np.prod(hf._scale_shape(s.shape))) for s in specs.values() if s.fp8)  # pylint: disable=protected-access
  assert weights == count.total_checkpoint + (c.n_moe_layers + c.n_mtp_layers) * c.n_routed_experts
  assert round((weights + scales) / 1e9) == 685


def test_cli_prints_the_671b_count(capsys):
  from models.deepseek_v3 import __main__ as cli  # pylint: disable=g-import-not-at-top
  assert cli.main(["--config", "671b"]) == 0
  out = capsys.readouterr().out
  assert "671,026,404,352" in out and "main model" in out and "MTP" in out


# --- Hugging Face checkpoints ---------------------------------------------------------------------


def _dequant(w, s):
  """Independent NumPy FP8 dequantization: each 128 x 128 block times its scale."""
  w = np.asarray(w).astype(np.float64)
  out = np.empty_like(w)
  for i in range(s.shape[0]):
    for j in range(s.shape[1]):
      out[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (
          w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] * float(s[i, j]))
  return out


def test_hf_checkpoint_loads_with_fp8_weights(tmp_path):
  config = TINY.replace(inter_dim=160)  # a partial 128-block on the dense MLP
  src = hf.synthetic_checkpoint(tmp_path, config, seed=3)
  files = sorted(os.listdir(tmp_path))
  assert files == ["config.json", "model-00001-of-00002.safetensors",
                   "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
  assert src["model.layers.0.mlp.down_proj.weight"].dtype == jnp.float8_e4m3fn
  model = hf.load(tmp_path, dtype="float32")
  assert model.config.arch_mismatch(config) == {}
  f = lambda name: _dequant(src[name], src[name + "_scale_inv"])
  n_dense = config.n_dense_layers
  checks = [
      (model.dense_layers[0].ffn.down_proj.kernel[...], f("model.layers.0.mlp.down_proj.weight").T),
      (model.dense_layers[0].attn.wkv_b.kernel[...],
       f("model.layers.0.self_attn.kv_b_proj.weight").T),
      (model.moe_layers.attn.wq_b.kernel[...][1],
       f(f"model.layers.{n_dense + 1}.self_attn.q_b_proj.weight").T),
      (model.moe_layers.ffn.w_down[...][2, 5],
       f(f"model.layers.{n_dense + 2}.mlp.experts.5.down_proj.weight")),
      (model.moe_layers.ffn.shared_gate[...][0],
       f(f"model.layers.{n_dense}.mlp.shared_experts.gate_proj.weight").T),
      (model.moe_layers.ffn.router[...][3],
       src[f"model.layers.{n_dense + 3}.mlp.gate.weight"].astype(np.float64).T),
      (model.moe_layers.ffn.gate_bias[...][3],
       src[f"model.layers.{n_dense + 3}.mlp.gate.e_score_correction_bias"]),
      (model.mtp.block.ffn.w_gate[...][7], f("model.layers.5.mlp.experts.7.gate_proj.weight")),
      (model.mtp.eh_proj.kernel[...], src["model.layers.5.eh_proj.weight"].astype(np.float64).T),
      (model.mtp.norm.scale[...], src["model.layers.5.shared_head.norm.weight"].astype(np.float64)),
      (model.embed.embedding[...], src["model.embed_tokens.weight"].astype(np.float64)),
      (model.head.kernel[...], src["lm_head.weight"].astype(np.float64).T),
  ]
  for got, want in checks:
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-6, atol=0)
  out = nnx.jit(lambda m, t: m(t))(model, _tokens(4, (2, 8)))
  assert bool(jnp.all(jnp.isfinite(out.logits))) and bool(jnp.all(jnp.isfinite(out.mtp_logits)))
  # linear="fp8_weights": the e4m3 weights and scales as stored.
  fp8 = hf.load(tmp_path, dtype="float32", linear="fp8_weights")
  layer = fp8.dense_layers[0].ffn.down_proj
  name = "model.layers.0.mlp.down_proj.weight"
  np.testing.assert_array_equal(np.asarray(layer.weight[...]).view(np.uint8),
                                src[name].view(np.uint8))
  np.testing.assert_array_equal(np.asarray(layer.weight_scale_inv[...]), src[name + "_scale_inv"])
  x = np.asarray(jax.random.normal(jax.random.key(5), (4, config.inter_dim)), np.float64)
  y = np.asarray(layer(jnp.asarray(x, jnp.float32)), np.float64)
  want = x @ f(name).T
  assert np.linalg.norm(y - want) / np.linalg.norm(want) < 0.05  # FP8 activations
  out8 = nnx.jit(lambda m, t: m(t))(fp8, _tokens(4, (2, 8)))
  assert bool(jnp.all(jnp.isfinite(out8.logits)))


def test_hf_checkpoint_of_another_config_is_rejected(tmp_path):
  hf.synthetic_checkpoint(tmp_path / "a", TINY, seed=0)
  with pytest.raises(ValueError, match=r"another config.*dim"):
    hf.load(tmp_path / "a", TINY.replace(dim=128))
  # config.json edited to claim another size: the tensors' shapes disagree.
  with open(tmp_path / "a" / "config.json") as f:
    cfg = json.load(f)
  cfg["moe_intermediate_size"] = 64
  with open(tmp_path / "a" / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match=r"mlp.experts.0.gate_proj.weight has shape \[32, 64\], "
                                       r"the config needs \[64, 64\]"):
    hf.load(tmp_path / "a")
  # A missing tensor.
  src = hf.synthetic_checkpoint(tmp_path / "b", TINY, seed=0)
  del src["model.layers.2.mlp.experts.3.up_proj.weight"]
  hf.write_checkpoint(tmp_path / "c", TINY, src)
  with pytest.raises(ValueError, match=r"lacks 1 tensor.*experts.3.up_proj.weight"):
    hf.load(tmp_path / "c")
  with pytest.raises(ValueError, match="does not exist"):
    hf.load(tmp_path / "missing")
