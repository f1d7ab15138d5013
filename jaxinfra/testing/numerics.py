"""Accuracy metrics shared by tests and benchmarks."""

from __future__ import annotations

import numpy as np


def calc_diff(x, y) -> float:
  """DeepGEMM's similarity metric, ``1 - 2 sum(x y) / sum(x^2 + y^2)``, in float64.

  0 for identical arrays; FP8 GEMMs stay below 1e-3 against fp32. A global
  measure, not an elementwise one. Two all-zero arrays give 0.
  """
  x = np.asarray(x, dtype=np.float64)
  y = np.asarray(y, dtype=np.float64)
  if x.shape != y.shape:
    raise ValueError(f"calc_diff: shapes differ, {x.shape} vs {y.shape}")
  denominator = np.sum(x * x + y * y)
  if denominator == 0:
    return 0.0
  return float(1.0 - 2.0 * np.sum(x * y) / denominator)
