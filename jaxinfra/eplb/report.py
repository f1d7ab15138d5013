"""Per-GPU loads of placements, and the ``jaxinfra eplb`` report (table and PNG)."""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxinfra.eplb import _improved, _packing


def gpu_loads(weight: Any, phy2log: Any, num_gpus: int) -> np.ndarray:
  """Load of every GPU ``[L, num_gpus]`` float64 when each expert's load
  ``weight [L, E]`` splits evenly over its replicas in ``phy2log [L, P]``."""
  w = np.asarray(weight, np.float64)
  p2l = np.asarray(phy2log)
  if w.ndim != 2 or p2l.ndim != 2 or p2l.shape[0] != w.shape[0]:
    raise ValueError(f"gpu_loads: weight must be [L, E] and phy2log [L, P] with the same L, "
                     f"got shapes {w.shape} and {p2l.shape}")
  if p2l.shape[1] % num_gpus:
    raise ValueError(f"gpu_loads: phy2log.shape[1] ({p2l.shape[1]}) must be divisible by "
                     f"num_gpus ({num_gpus})")
  return _improved.gpu_loads(w, p2l, _packing.replica_counts(p2l, w.shape[1]), num_gpus)


def imbalance(weight: Any, phy2log: Any, num_gpus: int) -> np.ndarray:
  """Max over mean GPU load per layer ``[L]`` (1 is perfect; NaN for a layer
  without load)."""
  loads = gpu_loads(weight, phy2log, num_gpus)
  mean = loads.mean(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(mean > 0, loads.max(axis=1) / mean, np.nan)


def unreplicated_loads(weight: Any, num_gpus: int) -> np.ndarray:
  """GPU loads ``[L, num_gpus]`` without EPLB: expert ``e`` alone on GPU
  ``e * num_gpus // E`` (contiguous expert parallelism)."""
  w = np.asarray(weight, np.float64)
  experts = w.shape[1]
  gpu = np.arange(experts) * num_gpus // experts
  out = np.zeros((w.shape[0], num_gpus))
  np.add.at(out, (slice(None), gpu), w)
  return out


def plot(path: str, weight: np.ndarray, placements: dict[str, np.ndarray], num_gpus: int,
         num_nodes: int, layer: int) -> None:
  """PNG: per-GPU load of ``layer`` for every placement (and without EPLB), and
  max/mean per layer."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  before = unreplicated_loads(weight, num_gpus)
  series = {"no EPLB": before, **{k: gpu_loads(weight, v, num_gpus) for k, v in
                                  placements.items()}}
  fig, (ax_gpu, ax_layer) = plt.subplots(2, 1, figsize=(max(8, num_gpus * 0.22 + 3), 8))
  x = np.arange(num_gpus)
  width = 0.8 / len(series)
  mean = weight[layer].sum() / num_gpus
  for i, (name, loads) in enumerate(series.items()):
    ax_gpu.bar(x + (i - (len(series) - 1) / 2) * width, loads[layer] / mean, width,
               label=f"{name} (max/mean {loads[layer].max() / mean:.3f})")
  for node in range(1, num_nodes):
    ax_gpu.axvline(node * num_gpus / num_nodes - 0.5, color="gray", lw=0.8, ls=":")
  ax_gpu.axhline(1.0, color="black", lw=0.8)
  ax_gpu.set(title=f"Per-GPU load, layer {layer} (dotted lines: node boundaries)",
             xlabel="GPU", ylabel="load / mean")
  ax_gpu.legend(fontsize=8)
  layers = np.arange(weight.shape[0])
  layer_mean = np.where(weight.sum(axis=1) > 0, weight.sum(axis=1) / num_gpus, 1)
  for i, (name, loads) in enumerate(series.items()):
    if i == 0:  # no EPLB: off the scale of the others; quoted in the title
      continue
    ratio = loads.max(axis=1) / layer_mean
    ax_layer.plot(layers, ratio, marker=".", color=f"C{i}",
                  label=f"{name} (median {np.median(ratio):.3f})")
  no_eplb = np.median(before.max(axis=1) / layer_mean)
  ax_layer.set(title=f"Max / mean GPU load per layer (no EPLB: median {no_eplb:.3f})",
               xlabel="layer", ylabel="max / mean")
  ax_layer.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
