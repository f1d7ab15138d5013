"""An FP8 dense layer (``jaxinfra.gemm.Fp8Dense``) inside your own Flax NNX model.

    python examples/fp8_dense.py [--steps 40]

A small residual MLP of our own uses ``Fp8Dense`` where it would use
``nnx.Linear``: forward, dgrad and wgrad GEMMs run in FP8 with DeepSeek-V3's
1 x 128 activation and 128 x 128 weight scales, master weights stay float32.
Checks:

* one layer's output against float64 NumPy of the FP8-rounded operands
  (``quant.quantize_per_token`` / ``quantize_per_block``, dequantized):
  what the FP8 GEMM computes, up to float32 accumulation;
* the whole model's gradient against the same model in float32 (``calc_diff``,
  DeepGEMM's metric);
* a few AdamW steps: the loss falls, like the float32 model's.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxinfra import gemm
from jaxinfra import quant
from jaxinfra.testing import numerics


class Float32Dense(gemm.Fp8Dense):
  """The same parameters with a float32 GEMM: the reference model's layer."""

  def __call__(self, x):
    return x @ self.kernel[...].T + self.bias[...]


class ResidualMLP(nnx.Module):
  """``x -> x + W2 gelu(W1 x)`` twice, then a linear readout; ``dense`` is the layer class."""

  def __init__(self, dense, dim: int, hidden: int, out: int, *, rngs: nnx.Rngs):
    self.ups = nnx.List([dense(dim, hidden, rngs=rngs) for _ in range(2)])
    self.downs = nnx.List([dense(hidden, dim, rngs=rngs) for _ in range(2)])
    self.readout = dense(dim, out, rngs=rngs)

  def __call__(self, x):
    for up, down in zip(self.ups, self.downs):
      x = x + down(jax.nn.gelu(up(x)))
    return self.readout(x)


def loss_fn(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


def check_layer(layer: gemm.Fp8Dense, x: jax.Array) -> float:
  """Max relative error of the layer vs float64 NumPy on FP8-rounded operands."""
  xq, xs = quant.quantize_per_token(x)
  wq, ws = quant.quantize_per_block(layer.kernel[...])
  x64 = np.asarray(quant.dequantize_per_token(xq, xs), np.float64)
  w64 = np.asarray(quant.dequantize_per_block(wq, ws), np.float64)
  ref = x64 @ w64.T + np.asarray(layer.bias[...], np.float64)
  got = np.asarray(layer(x), np.float64)
  return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=40)
  args = parser.parse_args()
  dim, hidden, out = 256, 512, 128
  kx, kt = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, (512, dim), jnp.float32)
  teacher = jax.random.normal(kt, (dim, out), jnp.float32) / np.sqrt(dim)
  y = jnp.tanh(x @ teacher) * 2

  fp8_model = ResidualMLP(gemm.Fp8Dense, dim, hidden, out, rngs=nnx.Rngs(1))
  ref_model = ResidualMLP(Float32Dense, dim, hidden, out, rngs=nnx.Rngs(1))  # same weights

  layer_err = check_layer(fp8_model.ups[0], x)
  print(f"Fp8Dense vs float64 on FP8-rounded operands: max rel err {layer_err:.2e}")
  assert layer_err < 1e-5

  grads = [nnx.jit(nnx.grad(loss_fn))(m, x, y) for m in (fp8_model, ref_model)]
  flat = [np.concatenate([np.ravel(g) for g in jax.tree.leaves(gr)]) for gr in grads]
  grad_diff = numerics.calc_diff(flat[0], flat[1])
  print(f"gradient, FP8 vs float32 model: calc_diff {grad_diff:.2e}")
  assert grad_diff < 1e-2

  losses = {}
  for name, model in (("fp8", fp8_model), ("float32", ref_model)):
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    losses[name] = [float(train_step(model, optimizer, x, y)) for _ in range(args.steps)]
    print(f"{name:>7} loss: {losses[name][0]:.4f} -> {losses[name][-1]:.4f}")
  assert losses["fp8"][-1] < 0.5 * losses["fp8"][0]
  assert abs(losses["fp8"][-1] - losses["float32"][-1]) < 0.1 * losses["float32"][0]
  print("OK")


if __name__ == "__main__":
  main()
