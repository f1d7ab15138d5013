"""Expert load statistics: per-expert token counts and their moving average."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def expert_counts(topk_idx: Any, num_experts: int) -> jax.Array:
  """Tokens routed to each logical expert (jittable).

  Args:
    topk_idx: ``[..., K]`` integer expert ids; ids outside ``[0, num_experts)``
      (such as DeepEP's -1 for masked choices) are not counted.
    num_experts: ``E``.

  Returns:
    ``[E]`` int32 counts. For a layer stack, ``jax.vmap`` over the layer axis
    gives the ``[L, E]`` array :meth:`LoadTracker.update` takes.
  """
  topk_idx = jnp.asarray(topk_idx)
  if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
    raise ValueError(f"expert_counts: topk_idx must be integers, got dtype {topk_idx.dtype} "
                     f"(shape {topk_idx.shape})")
  flat = topk_idx.reshape(-1)
  valid = (flat >= 0) & (flat < num_experts)
  return jnp.zeros(num_experts, jnp.int32).at[jnp.where(valid, flat, num_experts)].add(
      1, mode="drop")


class LoadTracker:
  """Exponential moving average of per-expert loads, the input of the next
  :func:`rebalance_experts`.

  After updates with counts ``c_1 .. c_t`` the estimate is
  ``sum_i (1 - decay) decay^(t - i) c_i / (1 - decay^t)`` (bias-corrected, so
  the first update's estimate is ``c_1`` itself). Host-side state (NumPy
  float64); feed it the counts a MoE layer reports, one step (or window) at a
  time.

  Args:
    num_experts: ``E``.
    num_layers: ``L``, or None for a single layer (counts ``[E]``).
    decay: weight of the past per update, in ``[0, 1)``; ``0`` keeps only the
      latest counts. The average covers roughly the last ``1 / (1 - decay)``
      updates.
  """

  def __init__(self, num_experts: int, num_layers: int | None = None, *, decay: float = 0.9):
    for name, value in (("num_experts", num_experts), ("num_layers", num_layers)):
      if value is None and name == "num_layers":
        continue
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"LoadTracker: {name} must be a positive int, got {value!r}")
    if not isinstance(decay, (int, float, np.floating)) or not 0 <= decay < 1:
      raise ValueError(f"LoadTracker: decay must be in [0, 1), got {decay!r}")
    self.shape = (int(num_experts),) if num_layers is None else (int(num_layers),
                                                                  int(num_experts))
    self.decay = float(decay)
    self.steps = 0
    self._ema = np.zeros(self.shape)

  def update(self, counts: Any) -> np.ndarray:
    """Adds one observation of per-expert counts (``[L, E]``, or ``[E]`` for a
    single-layer tracker; any real dtype, e.g. a device array) and returns the
    new :attr:`loads`.

    Raises:
      ValueError: on a wrong shape, or negative, NaN or infinite counts (the
        state is left unchanged).
    """
    c = np.asarray(jax.device_get(counts))
    if c.shape != self.shape:
      raise ValueError(f"LoadTracker.update: counts must have shape {self.shape}, got shape "
                       f"{c.shape}")
    if not (np.issubdtype(c.dtype, np.integer) or np.issubdtype(c.dtype, np.floating)):
      raise ValueError(f"LoadTracker.update: counts must be numbers, got dtype {c.dtype}")
    c = c.astype(np.float64)
    if not np.isfinite(c).all() or (c < 0).any():
      raise ValueError(f"LoadTracker.update: counts (shape {c.shape}) must be finite and "
                       f"non-negative")
    self._ema = self.decay * self._ema + (1 - self.decay) * c
    self.steps += 1
    return self.loads

  @property
  def loads(self) -> np.ndarray:
    """Bias-corrected moving average (float64, :attr:`shape`); zeros before the
    first update."""
    if self.steps == 0:
      return np.zeros(self.shape)
    return self._ema / (1 - self.decay ** self.steps)

  def reset(self) -> None:
    self.steps = 0
    self._ema = np.zeros(self.shape)
