"""jaxinfra.rope: DeepSeek-V3's YaRN frequencies and attention scale, and the
rotation against complex multiplication in NumPy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfra import rope


def test_deepseek_v3_yarn_frequencies():
  cfg = rope.YarnConfig()  # dim 64, theta 1e4, factor 40, 4096 -> 163840, betas 32 / 1
  got = rope.inverse_frequencies(cfg).astype(np.float64)
  base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
  # The channel pair that turns beta times over the original 4096 positions:
  # d(beta) = 64 ln(4096 / (2 pi beta)) / (2 ln 1e4); the ramp runs from
  # floor(d(32)) = 10 to ceil(d(1)) = 23, linearly in the pair index.
  low = math.floor(64 * math.log(4096 / (2 * math.pi * 32)) / (2 * math.log(1e4)))
  high = math.ceil(64 * math.log(4096 / (2 * math.pi)) / (2 * math.log(1e4)))
  assert (low, high) == (10, 23)
  i = np.arange(32)
  interpolated = np.clip((i - low) / (high - low), 0, 1)
  want = base * (1 - interpolated) + base / 40 * interpolated
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got[:11], base[:11], rtol=1e-6)      # fast pairs kept
  np.testing.assert_allclose(got[23:], base[23:] / 40, rtol=1e-6)  # slow pairs / factor
  assert np.all(np.diff(got) < 0)


def test_mscale_and_softmax_scale():
  v3 = rope.YarnConfig()
  assert rope.mscale(v3) == pytest.approx(0.1 * math.log(40) + 1)
  assert rope.softmax_scale(192, v3) == pytest.approx(192 ** -0.5 * 1.3688879454113936 ** 2)
  plain = rope.YarnConfig(max_position=4096)   # no extension: plain RoPE
  assert not plain.extended and rope.mscale(plain) == 1.0
  np.testing.assert_allclose(rope.inverse_frequencies(plain),
                             10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-6)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotation_is_complex_multiplication(interleaved):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 64)).astype(np.float32)
  positions = rng.integers(0, 100000, (2, 5)).astype(np.int32)
  inv = rope.inverse_frequencies(rope.YarnConfig())
  got = np.asarray(jax.jit(lambda x, p: rope.apply_rope(x, p[..., None], inv,
                                                        interleaved=interleaved))(x, positions))
  angle = positions.astype(np.float32)[..., None, None] * inv    # float32, as the reference model
  turn = np.exp(1j * angle.astype(np.float64))
  if interleaved:
    z = (x[..., 0::2] + 1j * x[..., 1::2]) * turn
    want = np.stack([z.real, z.imag], -1).reshape(x.shape)
  else:
    z = (x[..., :32] + 1j * x[..., 32:]) * turn
    want = np.concatenate([z.real, z.imag], -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(1)
  q, k = rng.standard_normal((2, 64)).astype(np.float32)
  inv = rope.inverse_frequencies(rope.YarnConfig())
  score = lambda m, n: float(jnp.dot(rope.apply_rope(q, m, inv), rope.apply_rope(k, n, inv)))
  assert score(10, 3) == pytest.approx(score(1007, 1000), rel=1e-4)
  out = rope.apply_rope(jnp.asarray(q, jnp.bfloat16), 5, inv)
  assert out.dtype == jnp.bfloat16


def test_bad_arguments():
  with pytest.raises(ValueError, match="dim must be a positive even int"):
    rope.YarnConfig(dim=63)
  with pytest.raises(ValueError, match="factor must be >= 1"):
    rope.YarnConfig(factor=0.5)
  with pytest.raises(ValueError, match=r"twice inv_freq's length.*\(4, 62\)"):
    rope.apply_rope(jnp.zeros((4, 62)), 0, rope.inverse_frequencies(rope.YarnConfig()))
