"""Trace-time checks shared by the ``jaxinfra.moe`` modules."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def positive_int(op: str, name: str, value, *, allow_none: bool = False) -> int | None:
  if value is None and allow_none:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{op}: {name} must be a positive int, got {value!r}")
  return int(value)


def array(op: str, name: str, x, *, ndim: int, dims: str, dtypes: Sequence | None = None,
          kind: str | None = None) -> jax.Array:
  """``x`` as an array of rank ``ndim``; ``kind`` "int" or "float" restricts the dtype."""
  x = jnp.asarray(x)
  if x.ndim != ndim:
    raise ValueError(f"{op}: {name} must have shape {dims}, got shape {x.shape}")
  if kind == "int" and not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{op}: {name} must be an integer array of shape {dims}, got {x.dtype} "
                     f"with shape {x.shape}")
  if kind == "float" and not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"{op}: {name} must be a floating array of shape {dims}, got {x.dtype} "
                     f"with shape {x.shape}")
  if dtypes is not None and x.dtype not in [np.dtype(d) for d in dtypes]:
    names = ", ".join(str(np.dtype(d)) for d in dtypes)
    raise ValueError(f"{op}: {name} must be {names}, got {x.dtype} with shape {x.shape}")
  return x


def same_rows(op: str, names: tuple[str, str], a: jax.Array, b: jax.Array) -> None:
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"{op}: {names[0]} and {names[1]} must have the same number of rows, got "
                     f"shapes {a.shape} and {b.shape}")


def same_shape(op: str, names: tuple[str, str], a: jax.Array, b: jax.Array) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{op}: {names[1]} must have {names[0]}'s shape {a.shape}, got {b.shape}")


def accum_dtype(dtype) -> np.dtype:
  """Where the MoE accumulates ``dtype`` values: float32, or float64 for float64."""
  return np.dtype(jnp.promote_types(dtype, jnp.float32))
