"""Deterministic synthetic expert loads for tests, benchmarks and the CLI."""

from __future__ import annotations

import numpy as np


def zipf_loads(num_layers: int, num_experts: int, *, exponent: float = 1.0,
               tokens: float = 1_000_000.0, seed: int = 0) -> np.ndarray:
  """Zipf-skewed loads ``[num_layers, num_experts]`` float64.

  In every layer the expert of popularity rank ``r`` (1-based) gets
  ``tokens * r**-exponent / H`` tokens (``H`` normalizes each layer to
  ``tokens``), and ranks are assigned to experts by an independent random
  permutation per layer drawn from ``numpy.random.default_rng(seed)``. With
  256 experts and ``exponent=1`` the hottest expert takes 16% of a layer's
  tokens, which reproduces the imbalance quoted for DeepSeek's EPLB (max/mean
  GPU load about 1.33 with 288 slots on 4 nodes of 8 GPUs, 2.46 with 320 slots
  on 8 nodes).
  """
  rng = np.random.default_rng(seed)
  base = np.arange(1, num_experts + 1, dtype=np.float64) ** -float(exponent)
  base *= tokens / base.sum()
  return np.stack([base[rng.permutation(num_experts)] for _ in range(num_layers)])


def drift(weight: np.ndarray, fraction: float = 0.1, *, exponent: float = 1.0,
          seed: int = 1) -> np.ndarray:
  """Loads after a drift: ``(1 - fraction) * weight + fraction * other``, where
  ``other`` is an independent :func:`zipf_loads` draw with the same per-layer
  totals. ``fraction`` of every layer's tokens move to other experts."""
  weight = np.asarray(weight, np.float64)
  other = zipf_loads(*weight.shape, exponent=exponent, tokens=1.0, seed=seed)
  return (1 - fraction) * weight + fraction * other * weight.sum(axis=1, keepdims=True)
