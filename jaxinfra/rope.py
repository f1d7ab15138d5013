"""Rotary position embeddings with YaRN frequency scaling, as in DeepSeek-V2/V3.

DeepSeek-V3 rotates only the 64 ``qk_rope`` channels of queries and keys. Its
context is extended from ``original_max_position`` (4096) to ``max_position``
(163840) with YaRN: low frequencies (long wavelengths) are divided by
``factor``, high frequencies are kept, and a linear ramp blends the band in
between; the ramp's ends are the dimensions whose wavelength makes
``beta_fast`` and ``beta_slow`` rotations over the original context. YaRN also
sharpens attention: the softmax scale is multiplied by ``mscale**2`` with
``mscale = 0.1 * mscale_arg * ln(factor) + 1`` (:func:`softmax_scale`).

The rotation pairs channels ``(2i, 2i + 1)`` ("interleaved", as DeepSeek's
reference ``model.py`` does with a complex view) by default, or ``(i, i + d/2)``
(``interleaved=False``, the "rotate half" layout of Hugging Face checkpoints).
Angles are ``position * inverse_frequency`` computed in float32, the same
arithmetic as the reference's precomputed float32 table.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class YarnConfig:
  """RoPE/YaRN settings; the defaults are DeepSeek-V3's.

  Attributes:
    dim: rotated channels per head (``qk_rope_head_dim``), even.
    theta: RoPE base.
    factor: YaRN context-extension factor.
    original_max_position: context length the model was pre-trained with.
    max_position: context length in use; YaRN applies only when it exceeds
      ``original_max_position`` (otherwise plain RoPE, and ``mscale`` is 1).
    beta_fast, beta_slow: rotation counts that bound the interpolation ramp.
    mscale: YaRN's attention-temperature coefficient (``mscale`` in the config).
  """

  dim: int = 64
  theta: float = 10000.0
  factor: float = 40.0
  original_max_position: int = 4096
  max_position: int = 163840
  beta_fast: float = 32.0
  beta_slow: float = 1.0
  mscale: float = 1.0

  def __post_init__(self):
    if self.dim <= 0 or self.dim % 2:
      raise ValueError(f"YarnConfig: dim must be a positive even int, got {self.dim}")
    if self.factor < 1:
      raise ValueError(f"YarnConfig: factor must be >= 1, got {self.factor}")

  @property
  def extended(self) -> bool:
    """Whether YaRN scaling is in effect."""
    return self.max_position > self.original_max_position


def _correction_dim(rotations: float, cfg: YarnConfig) -> float:
  """The (fractional) channel-pair index whose wavelength fits ``rotations``
  turns into the original context."""
  return (cfg.dim * math.log(cfg.original_max_position / (rotations * 2 * math.pi))
          / (2 * math.log(cfg.theta)))


def inverse_frequencies(cfg: YarnConfig) -> np.ndarray:
  """Per channel pair ``i``: the rotation speed in radians per position.

  Returns:
    ``[dim // 2]`` float32: ``theta ** (-2i / dim)``, blended towards
    ``theta ** (-2i / dim) / factor`` by YaRN's ramp when ``cfg.extended``.
  """
  half = cfg.dim // 2
  freqs = 1.0 / cfg.theta ** (np.arange(0, cfg.dim, 2, dtype=np.float64) / cfg.dim)
  if cfg.extended:
    low = max(math.floor(_correction_dim(cfg.beta_fast, cfg)), 0)
    high = min(math.ceil(_correction_dim(cfg.beta_slow, cfg)), cfg.dim - 1)
    if low == high:
      high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(half, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    keep = 1.0 - ramp  # 1: high frequency, kept; 0: low frequency, interpolated
    freqs = freqs / cfg.factor * (1.0 - keep) + freqs * keep
  return freqs.astype(np.float32)


def mscale(cfg: YarnConfig) -> float:
  """YaRN's attention temperature, ``0.1 * mscale * ln(factor) + 1`` (1 without YaRN)."""
  if not cfg.extended or cfg.factor <= 1:
    return 1.0
  return 0.1 * cfg.mscale * math.log(cfg.factor) + 1.0


def softmax_scale(qk_head_dim: int, cfg: YarnConfig) -> float:
  """DeepSeek's attention scale: ``qk_head_dim ** -0.5 * mscale(cfg) ** 2``.

  ``qk_head_dim`` is the *unabsorbed* query/key width, ``qk_nope + qk_rope``
  (192 for DeepSeek-V3), also for absorbed decode over 576-wide latents.
  """
  return qk_head_dim ** -0.5 * mscale(cfg) ** 2


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq, *,
               interleaved: bool = True) -> jax.Array:
  """Rotates the last dimension of ``x`` by ``positions * inv_freq``.

  Args:
    x: ``[..., dim]`` float array (e.g. ``[b, s, heads, dim]``).
    positions: integer or float positions, broadcastable to ``x.shape[:-1]``
      (e.g. ``[b, s, 1]`` for ``x`` of shape ``[b, s, heads, dim]``).
    inv_freq: ``[dim // 2]`` from :func:`inverse_frequencies`.
    interleaved: rotate channel pairs ``(2i, 2i+1)`` (DeepSeek's reference) or
      ``(i, i + dim/2)``.

  Returns:
    ``x``'s shape and dtype; computed in float32.
  """
  inv_freq = jnp.asarray(inv_freq, jnp.float32)
  dim = x.shape[-1]
  if inv_freq.shape != (dim // 2,) or dim % 2:
    raise ValueError(f"apply_rope: x's last dimension must be even and twice inv_freq's length; "
                     f"got x shape {x.shape}, inv_freq shape {inv_freq.shape}")
  angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * inv_freq
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  xf = x.astype(jnp.float32)
  if interleaved:
    pairs = xf.reshape(*x.shape[:-1], dim // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = jnp.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1).reshape(xf.shape)
  else:
    x0, x1 = xf[..., :dim // 2], xf[..., dim // 2:]
    out = jnp.concatenate([x0 * cos - x1 * sin, x0 * sin + x1 * cos], axis=-1)
  return out.astype(x.dtype)
