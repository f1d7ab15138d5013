"""MLA decode over a paged latent cache inside your own Flax NNX model.

    python examples/mla_decode.py [--steps 6]

A tiny decoder of our own (embedding, one ``jaxinfra.mla.MultiHeadLatentAttention``
layer, an output head) serves three prompts of different lengths: one prefill
writes each prompt's 576-wide latents ``[c ; rope(k_pe)]`` into a
``PagedLatentCache`` (64-token pages from a shared pool), then each decode step
appends one token per request and runs ``mla_decode`` (the absorbed form) over
the pages. Every step is checked against the layer's expanded attention
recomputed over the whole sequence so far (no cache), and the custom call
against the pure-JAX ``xla`` path; then the requests' pages are freed.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfra import mla


class TinyDecoder(nnx.Module):
  """Embedding -> MLA (+ residual) -> logits; the attention is jaxinfra's."""

  def __init__(self, vocab: int, dim: int, heads: int, *, decode_impl: str, rngs: nnx.Rngs):
    self.embed = nnx.Embed(vocab, dim, rngs=rngs)
    # kv_lora_rank=512 and rope dim 64 are FlashMLA's 576/512 layout; the rest is ours.
    config = mla.MLAConfig(dim=dim, n_heads=heads, q_lora_rank=0, qk_nope_head_dim=32,
                           v_head_dim=32)
    self.attn = mla.MultiHeadLatentAttention(config, rngs=rngs, decode_impl=decode_impl)
    self.head = nnx.Linear(dim, vocab, use_bias=False, rngs=rngs)

  def prefill(self, tokens, cache, seq_ids, lengths):
    """``tokens [b, s]`` (right-padded to ``lengths``) -> logits ``[b, s, vocab]``."""
    x = self.embed(tokens)
    y, cache, ok = self.attn(x, cache=cache, seq_ids=seq_ids, lengths=lengths)
    return self.head(x + y), cache, ok

  def decode(self, tokens, cache, seq_ids):
    """One new token per request, ``tokens [b]`` -> logits ``[b, vocab]``."""
    x = self.embed(tokens[:, None])
    y, cache, ok = self.attn.decode(x, cache, seq_ids)
    return self.head(x + y)[:, 0], cache, ok

  def full(self, tokens):
    """Reference: expanded attention over the whole sequence, no cache."""
    x = self.embed(tokens)
    return self.head(x + self.attn(x))


@nnx.jit
def prefill(model, tokens, cache, seq_ids, lengths):
  return model.prefill(tokens, cache, seq_ids, lengths)


@nnx.jit
def decode(model, tokens, cache, seq_ids):
  return model.decode(tokens, cache, seq_ids)


@nnx.jit
def full(model, tokens):
  return model.full(tokens)


def run(model: TinyDecoder, steps: int):
  prompts = [b"Paged latent attention", b"MLA", b"DeepSeek-V3 caches one 576-wide row per token"]
  lengths = np.array([len(p) for p in prompts], np.int32)
  tokens = np.zeros((len(prompts), lengths.max()), np.int32)
  for i, p in enumerate(prompts):
    tokens[i, :len(p)] = list(p)
  seq_ids = jnp.arange(len(prompts), dtype=jnp.int32)
  cache = mla.PagedLatentCache.create(num_pages=8, max_seqs=4, max_blocks=2,
                                      dtype=jnp.float32)
  logits, cache, ok = prefill(model, jnp.asarray(tokens), cache, seq_ids, jnp.asarray(lengths))
  assert bool(ok.all()), "prefill did not fit in the cache"
  seqs = [list(t[:n]) for t, n in zip(tokens, lengths)]
  nxt = jnp.argmax(logits[jnp.arange(len(prompts)), lengths - 1], -1)
  worst = 0.0
  for _ in range(steps):
    for s, t in zip(seqs, np.asarray(nxt)):
      s.append(int(t))
    logits, cache, ok = decode(model, nxt.astype(jnp.int32), cache, seq_ids)
    assert bool(ok.all())
    # The reference: recompute every sequence from scratch (right-padded to one
    # static length; attention is causal, so the padding does not matter).
    padded = np.zeros((len(seqs), lengths.max() + steps), np.int32)
    for i, s in enumerate(seqs):
      padded[i, :len(s)] = s
    last = np.array([len(s) for s in seqs]) - 1
    ref = full(model, jnp.asarray(padded))[jnp.arange(len(seqs)), last]
    worst = max(worst, float(jnp.max(jnp.abs(logits - ref))))
    nxt = jnp.argmax(logits, -1)
  _, seqlens = cache.lookup(seq_ids)
  assert list(np.asarray(seqlens)) == [len(s) for s in seqs], (seqlens, [len(s) for s in seqs])
  cache = cache.free(seq_ids)
  assert bool(cache.page_free.all()), "pages were not returned to the pool"
  return logits, worst


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=6)
  args = parser.parse_args()
  model = nnx.jit(lambda: TinyDecoder(256, 128, 4, decode_impl="xla", rngs=nnx.Rngs(0)))()
  logits_xla, err_xla = run(model, args.steps)
  model.attn.decode_impl = "auto"   # the custom call where compiled and verified (CPU)
  logits_auto, err_auto = run(model, args.steps)
  print(f"decode vs full recompute, max |logit diff|: xla {err_xla:.2e}, auto {err_auto:.2e}")
  custom_vs_xla = float(jnp.max(jnp.abs(logits_xla - logits_auto)))
  print(f"custom call (auto) vs xla path, last step: {custom_vs_xla:.2e}")
  assert err_xla < 1e-3 and err_auto < 1e-3 and custom_vs_xla < 1e-3
  print("OK")


if __name__ == "__main__":
  main()
