"""An expert-parallel MoE layer (``jaxinfra.moe.MoE``) inside your own Flax NNX model.

    python examples/ep_moe.py

Runs on 8 CPU devices (set here with ``jax_num_cpu_devices``; on a GPU host,
the GPUs). A small block of our own, RMSNorm -> DeepSeek-V3 MoE (sigmoid
group-limited routing, a shared expert, 16 routed experts, top-4) -> residual,
places its 16 experts 2 per device over an ``ep`` mesh axis. Tokens are
dispatched to their experts' devices with an all-to-all (DeepEP's normal mode,
as in training and prefill) and, in a copy of the block, with the low-latency
mode of decoding. Checks: both equal the same block run on one device with
the same parameters (no communication), and a gradient step through the
expert-parallel block works. Prints tokens per expert.
"""

import jax

jax.config.update("jax_num_cpu_devices", 8)  # before any backend starts; no effect on GPU

import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
from flax import nnx  # pylint: disable=g-import-not-at-top,wrong-import-position

from jaxinfra import moe  # pylint: disable=g-import-not-at-top,wrong-import-position


class MoEBlock(nnx.Module):
  """``x + MoE(RMSNorm(x))`` over ``x [tokens, hidden]``."""

  def __init__(self, hidden: int, *, mesh=None, mode: str = "normal", rngs: nnx.Rngs):
    self.norm = nnx.RMSNorm(hidden, rngs=rngs)
    self.moe = moe.MoE(hidden, 64, 16, top_k=4, n_groups=4, topk_groups=2,
                       num_shared_experts=1, mesh=mesh, ep_axis=None if mesh is None else "ep",
                       mode=mode, dtype=jnp.float32, rngs=rngs)

  def __call__(self, x):
    y, stats = self.moe(self.norm(x))
    return x + y, stats


@nnx.jit
def forward(block, x):
  return block(x)


def main():
  devices = jax.devices()
  assert len(devices) >= 8, f"needs 8 devices, got {devices}"
  mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=devices[:8])
  hidden = 128
  x = jax.random.normal(jax.random.key(0), (256, hidden), jnp.float32)

  local = MoEBlock(hidden, rngs=nnx.Rngs(0))
  expected, local_stats = forward(local, x)

  results = {}
  for mode in ("normal", "low_latency"):
    block = MoEBlock(hidden, mesh=mesh, mode=mode, rngs=nnx.Rngs(0))   # same parameters
    y, stats = forward(block, x)
    err = float(jnp.max(jnp.abs(y - expected)))
    results[mode] = err
    print(f"{mode:>11} EP over {mesh.shape['ep']} devices vs one device: max |diff| {err:.2e}, "
          f"dropped {int(stats.num_dropped)}")
    np.testing.assert_array_equal(stats.tokens_per_expert, local_stats.tokens_per_expert)
  print("tokens per expert:", np.asarray(local_stats.tokens_per_expert).tolist())
  assert max(results.values()) < 1e-4, results

  # One SGD step through the expert-parallel block (dispatch's VJP is combine).
  block = MoEBlock(hidden, mesh=mesh, rngs=nnx.Rngs(0))
  loss = lambda b: jnp.mean(b(x)[0] ** 2)
  before, grads = nnx.jit(nnx.value_and_grad(loss))(block)
  w = block.moe.w_up
  w[...] = w[...] - 1.0 * grads.moe.w_up[...]
  after = nnx.jit(loss)(block)
  print(f"loss {float(before):.5f} -> {float(after):.5f} after one step on the routed experts")
  assert float(jnp.abs(grads.moe.w_up[...]).max()) > 0 and after < before
  print("OK")


if __name__ == "__main__":
  main()
