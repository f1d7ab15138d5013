"""MultiHeadLatentAttention: after a prefill through __call__ (expanded form,
writing the latent cache), absorbed decode over the paged cache equals the
expanded computation on the whole sequence (float32, rtol 1e-5), for single
tokens and MTP, both decode implementations; FP8 cache; refused rows; jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxinfra import mla, rope
from jaxinfra.testing.numerics import calc_diff

DIM = 96


def small_config(q_lora_rank=48):
  # DeepSeek-V3's latent layout (512 + 64) with small heads; YaRN active.
  return mla.MLAConfig(dim=DIM, n_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=512,
                       qk_nope_head_dim=32, qk_rope_head_dim=64, v_head_dim=24,
                       rope=rope.YarnConfig(dim=64, original_max_position=64, max_position=1024,
                                            factor=8.0))


def prefill_then_decode(model, x, lengths, steps, cache):
  """Prefills rows of x up to lengths, then decodes `steps` chunks of tokens
  taken from x after each row's prefix; returns the decode outputs."""
  seq_ids = jnp.arange(x.shape[0], dtype=jnp.int32)[::-1]   # slots in another order
  prefill = nnx.jit(lambda m, x, c: m(x, cache=c, seq_ids=seq_ids, lengths=lengths))
  _, cache, ok = prefill(model, x[:, :max(lengths)], cache)
  assert bool(jnp.all(ok))
  outputs = []
  decode = nnx.jit(lambda m, x, c: m.decode(x, c, seq_ids))
  pos = np.array(lengths)
  for s_q in steps:
    chunk = jnp.stack([x[i, p:p + s_q] for i, p in enumerate(pos)])
    y, cache, ok = decode(model, chunk, cache)
    assert bool(jnp.all(ok))
    outputs.append(y)
    pos = pos + s_q
  return outputs, cache


def expanded_reference(model, x, lengths, steps):
  """The same tokens through __call__ (causal, so later tokens of a row do not
  change earlier outputs and one call on the longest prefix serves every row)."""
  y = nnx.jit(lambda m, x: m(x))(model, x[:, :max(lengths) + sum(steps)])
  want, at = [], np.array(lengths)
  for s_q in steps:
    want.append(jnp.stack([y[i, a:a + s_q] for i, a in enumerate(at)]))
    at = at + s_q
  return want


@pytest.mark.parametrize("impl, q_lora_rank", [("ffi", 48), ("xla", 0)])
def test_absorbed_decode_equals_expanded_form(impl, q_lora_rank):
  model = mla.MultiHeadLatentAttention(small_config(q_lora_rank), rngs=nnx.Rngs(0),
                                       decode_impl=impl)
  x = jax.random.normal(jax.random.key(1), (3, 140, DIM), jnp.float32)
  lengths = [70, 5, 129]                  # 2 pages, part of 1, 3 pages (page size 64)
  steps = [1, 2]                          # a token, then an MTP pair
  cache = mla.PagedLatentCache.create(num_pages=12, max_seqs=3, max_blocks=4, dtype=jnp.float32)
  got, cache = prefill_then_decode(model, x, lengths, steps, cache)
  want = expanded_reference(model, x, lengths, steps)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(cache.seqlens, np.array(lengths)[::-1] + sum(steps))


def test_fp8_latent_cache_is_close():
  model = mla.MultiHeadLatentAttention(small_config(), rngs=nnx.Rngs(2))
  x = jax.random.normal(jax.random.key(3), (2, 80, DIM), jnp.float32)
  cache = mla.PagedLatentCache.create(num_pages=6, max_seqs=2, max_blocks=2, kv_format="fp8")
  got, _ = prefill_then_decode(model, x, [66, 20], [2], cache)
  want = expanded_reference(model, x, [66, 20], [2])
  assert calc_diff(got[0], want[0]) < 1e-3   # e4m3 latents and bf16 queries


def test_refused_and_padding_rows():
  model = mla.MultiHeadLatentAttention(small_config(), rngs=nnx.Rngs(4))
  prefill = nnx.jit(lambda m, x, c, ids, n: m(x, cache=c, seq_ids=ids, lengths=n))
  decode = nnx.jit(lambda m, x, c, ids: m.decode(x, c, ids))
  x = jax.random.normal(jax.random.key(5), (3, 64, DIM), jnp.float32)
  ids = jnp.array([0, 1, -1], jnp.int32)
  cache = mla.PagedLatentCache.create(num_pages=2, max_seqs=3, max_blocks=1, dtype=jnp.float32)
  one_page = mla.PagedLatentCache.create(num_pages=1, max_seqs=3, max_blocks=1,
                                         dtype=jnp.float32)
  _, _, ok = prefill(model, x, one_page, ids, jnp.array([64, 10, 64], jnp.int32))
  np.testing.assert_array_equal(ok, [True, False, False])   # one page in the pool; -1 is padding
  _, cache, ok = prefill(model, x, cache, ids, jnp.array([64, 10, 64], jnp.int32))
  np.testing.assert_array_equal(ok, [True, True, False])
  y, cache, ok = decode(model, x[:, :1], cache, ids)
  np.testing.assert_array_equal(ok, [False, True, False])   # seq 0's only page is full
  y = np.asarray(y)
  assert np.all(np.isnan(y[0])) and np.all(np.isfinite(y[1])) and np.all(y[2] == 0)
  np.testing.assert_array_equal(cache.seqlens, [64, 11, 0])


def test_training_gradients_reach_every_parameter():
  model = mla.MultiHeadLatentAttention(small_config(), rngs=nnx.Rngs(6))
  x = jax.random.normal(jax.random.key(7), (2, 16, DIM), jnp.float32)
  seg = jnp.array([[0] * 8 + [1] * 8, [0] * 16], jnp.int32)
  grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(x, segment_ids=seg) ** 2)))(model)
  leaves = jax.tree_util.tree_leaves(nnx.state(grads, nnx.Param))
  assert len(leaves) == 7  # wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo
  for leaf in leaves:
    assert np.all(np.isfinite(leaf)) and np.any(np.asarray(leaf) != 0)


def test_config_validation():
  with pytest.raises(ValueError, match=r"rope.dim \(64\) must equal qk_rope_head_dim \(32\)"):
    mla.MLAConfig(qk_rope_head_dim=32)
  cfg = mla.MLAConfig(dim=32, n_heads=2, q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=8,
                      qk_rope_head_dim=64, v_head_dim=8)
  model = mla.MultiHeadLatentAttention(cfg, rngs=nnx.Rngs(0))
  assert nnx.jit(lambda m: m(jnp.ones((1, 3, 32))))(model).shape == (1, 3, 32)  # any sizes
  with pytest.raises(ValueError, match=r"x must be \[b, s, dim=32\], got shape \(1, 3, 31\)"):
    model(jnp.ones((1, 3, 31)))
  cache = mla.PagedLatentCache.create(num_pages=1, max_seqs=1, max_blocks=1)
  with pytest.raises(ValueError, match="needs kv_lora_rank=512"):
    model.decode(jnp.ones((1, 1, 32)), cache, jnp.zeros((1,), jnp.int32))
  # DeepSeek-V3: 1/sqrt(192) * (0.1 * ln(40) + 1)^2.
  assert mla.MLAConfig().softmax_scale == pytest.approx(
      192 ** -0.5 * (0.1 * np.log(40) + 1) ** 2, rel=1e-12)
