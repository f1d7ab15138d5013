"""Train a small MLP with FP8 GEMMs (``gemm.Fp8Dense``) next to the same MLP in bf16.

    python examples/fp8_training.py [--steps 300] [--png fp8_training.png]

Both runs start from the same weights and see the same batches: a 2-layer MLP
classifying 1024 random points into 16 classes of a random tanh teacher,
Adam, batch 128. Prints both final losses and their relative gap, and writes
the two loss curves to a PNG (needs matplotlib).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from rich.progress import track

from jaxinfra import gemm


class Bf16Dense(gemm.Fp8Dense):
  """The same layer (parameters, initialization) with bfloat16 GEMMs."""

  def __call__(self, x):
    y = jnp.einsum("...k,nk->...n", x.astype(jnp.bfloat16), self.kernel[...].astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)
    return y.astype(x.dtype) + self.bias[...].astype(x.dtype)


class MLP(nnx.Module):

  def __init__(self, layer, sizes, rngs):
    self.layers = nnx.List([layer(i, o, rngs=rngs) for i, o in zip(sizes[:-1], sizes[1:])])

  def __call__(self, x):
    x = x.astype(jnp.bfloat16)
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i + 1 < len(self.layers):
        x = jax.nn.gelu(x)
    return x.astype(jnp.float32)


def train(layer, inputs, labels, steps, batch=128):
  model = MLP(layer, (inputs.shape[1], 256, 16), nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.adam(2e-3), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  @jax.jit
  def step(state, x, y):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  losses = []
  for i in track(range(steps), description=layer.__name__):
    start = (i * batch) % inputs.shape[0]
    state, loss = step(state, inputs[start:start + batch], labels[start:start + batch])
    losses.append(float(loss))
  model, _ = nnx.merge(graphdef, state)
  return float(loss_fn(model, inputs, labels)), losses


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--png", default="fp8_training.png")
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.standard_normal((1024, 128)), jnp.float32)
  hidden = jnp.tanh(inputs @ jnp.asarray(rng.standard_normal((128, 256)) / np.sqrt(128),
                                         jnp.float32))
  labels = jnp.argmax(hidden @ jnp.asarray(rng.standard_normal((256, 16)), jnp.float32), axis=1)

  fp8_loss, fp8_curve = train(gemm.Fp8Dense, inputs, labels, args.steps)
  bf16_loss, bf16_curve = train(Bf16Dense, inputs, labels, args.steps)
  print(f"final loss: fp8 {fp8_loss:.5f}, bf16 {bf16_loss:.5f}, "
        f"gap {100 * (fp8_loss - bf16_loss) / bf16_loss:+.2f}%")

  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.semilogy(bf16_curve, label=f"bf16 GEMMs (final {bf16_loss:.4f})")
  ax.semilogy(fp8_curve, label=f"FP8 GEMMs, Fp8Dense (final {fp8_loss:.4f})", alpha=0.8)
  ax.set_xlabel("step")
  ax.set_ylabel("training loss (batch)")
  ax.set_title("2-layer MLP, DeepSeek-V3 FP8 recipe vs bf16")
  ax.legend()
  fig.tight_layout()
  fig.savefig(args.png, dpi=120)
  print(f"wrote {args.png}")


if __name__ == "__main__":
  main()
