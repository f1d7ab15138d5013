"""DeepSeek's Hugging Face checkpoint layout: load into :class:`DeepSeekV3`, write synthetic ones.

The layout (``deepseek-ai/DeepSeek-V3``)::

    config.json                                   -> Config.from_hf
    model.safetensors.index.json                  {"weight_map": {tensor: shard file}}
    model-00001-of-000NN.safetensors ...          (or one model.safetensors)

    model.embed_tokens.weight [V, D]   model.norm.weight [D]   lm_head.weight [V, D]
    model.layers.N.input_layernorm.weight, .post_attention_layernorm.weight [D]
    model.layers.N.self_attn.q_a_proj.weight [q_lora, D]      (q_proj [H*192, D] if q_lora 0)
                            .q_a_layernorm.weight [q_lora]   .q_b_proj.weight [H*192, q_lora]
                            .kv_a_proj_with_mqa.weight [512+64, D]
                            .kv_a_layernorm.weight [512]     .kv_b_proj.weight [H*(128+128), 512]
                            .o_proj.weight [D, H*128]
    dense layers (N < first_k_dense_replace): .mlp.{gate,up}_proj.weight [I, D], .down_proj [D, I]
    MoE layers: .mlp.gate.weight [E, D], .mlp.gate.e_score_correction_bias [E] (float32),
                .mlp.experts.E.{gate,up}_proj.weight [I_e, D], .down_proj.weight [D, I_e],
                .mlp.shared_experts.{gate,up}_proj.weight [S*I_e, D], .down_proj.weight [D, S*I_e]
    MTP (layer n_layers): the MoE layer's tensors plus .enorm.weight, .hnorm.weight [D],
                .eh_proj.weight [D, 2D], .embed_tokens.weight [V, D],
                .shared_head.norm.weight [D], .shared_head.head.weight [V, D]

Weights of the attention projections and the MLPs/experts are FP8 e4m3 with a
float32 ``<name>_scale_inv`` of ``[ceil(out/128), ceil(in/128)]`` blocks
(dequantized ``w * scale`` per block, :func:`jaxinfra.quant.dequantize_per_block`);
everything else is bf16 (the bias float32). Any weight stored as FP8 must
have its scale; any weight may also be stored unquantized.

Loading: :func:`load` reads ``config.json``, checks every tensor name, shape
and dtype from the safetensors headers against the config's layout
(:func:`checkpoint_tensors`), and only then reads data: a checkpoint of
another config, a missing or unexpected tensor is a ``ValueError`` naming
it, before anything is built or compiled. FP8 weights are dequantized to
``param_dtype``, or kept as e4m3 + scales for ``linear="fp8_weights"``
(:class:`~models.deepseek_v3.model.Fp8WeightLinear`; ``kv_b_proj``, the
router, the experts and the head are dequantized: the model keeps them in
``param_dtype``). The MTP layer's ``embed_tokens`` and ``shared_head.head``
are copies of the main model's (the model shares them) and must equal their
shapes; their values are not read.

The safetensors format (an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}``, raw little-endian data) is read
and written here with NumPy memory maps (bf16/e4m3 through JAX's ml_dtypes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from collections.abc import Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax import traverse_util

from jaxinfra import quant

from models.deepseek_v3 import model as model_lib
from models.deepseek_v3.config import Config

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_BLOCK = 128

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
              "BF16": np.dtype(jnp.bfloat16), "F8_E4M3": np.dtype(jnp.float8_e4m3fn),
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# --- safetensors files ----------------------------------------------------------------------------


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
  """Writes ``tensors`` (name -> NumPy array) as one safetensors file."""
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    a = np.ascontiguousarray(tensors[name])
    if a.dtype not in _ST_NAMES:
      raise ValueError(f"write_safetensors: {name} has unsupported dtype {a.dtype}")
    header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
    arrays.append(a)
  if metadata:
    header["__metadata__"] = dict(metadata)
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
  tmp = f"{path}.tmp"
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for a in arrays:
      f.write(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
  os.replace(tmp, path)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
  """One stored tensor: its file, dtype, shape and byte range."""
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  start: int
  end: int


def read_safetensors_header(path: str) -> dict[str, TensorInfo]:
  """The tensors of one safetensors file (reads only the header)."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) != 8:
      raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8:
      raise ValueError(f"{path}: header length {n} exceeds the file size {size}")
    header = json.loads(f.read(n))
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(_ST_DTYPES[info["dtype"]])
    shape = tuple(int(d) for d in info["shape"])
    start, end = (8 + n + int(o) for o in info["data_offsets"])
    if end - start != math.prod(shape) * dtype.itemsize or end > size:
      raise ValueError(f"{path}: tensor {name} ({info['dtype']} {list(shape)}) has a bad byte "
                       f"range {info['data_offsets']}")
    out[name] = TensorInfo(path, dtype, shape, start, end)
  return out


class CheckpointReader:
  """The tensors of a checkpoint directory (sharded with an index, or one file)."""

  def __init__(self, directory: str | os.PathLike):
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
      raise ValueError(f"checkpoint directory {directory!r} does not exist")
    index = os.path.join(directory, INDEX)
    if os.path.exists(index):
      with open(index) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(directory, SINGLE)):
      weight_map, files = None, [SINGLE]
    else:
      raise ValueError(f"{directory}: no {INDEX} or {SINGLE}")
    self.tensors: dict[str, TensorInfo] = {}
    for file in files:
      path = os.path.join(directory, file)
      if not os.path.exists(path):
        raise ValueError(f"{directory}: shard {file} named by the index is missing")
      for name, info in read_safetensors_header(path).items():
        if weight_map is not None and weight_map.get(name) != file:
          raise ValueError(f"{directory}: tensor {name} is in {file} but the index says "
                           f"{weight_map.get(name)}")
        self.tensors[name] = info
    if weight_map is not None:
      absent = sorted(set(weight_map) - set(self.tensors))
      if absent:
        raise ValueError(f"{directory}: the index names tensors no shard holds: {absent[:5]}")

  def get(self, name: str) -> np.ndarray:
    """The stored array (a read-only memory map)."""
    t = self.tensors[name]
    return np.memmap(t.path, dtype=t.dtype.newbyteorder("<"), mode="r", offset=t.start,
                     shape=t.shape)


# --- the layout ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Spec:
  """A tensor of the layout: HF shape, FP8 in DeepSeek's release, where it goes.

  ``kind``: ``"norm"``, ``"embed"``, ``"linear"`` (``config.linear``),
  ``"dense"`` (always an ``nnx.Linear``), ``"router"``, ``"bias"``,
  ``"expert"``, ``"shared"``, or ``"copy"`` (MTP's copies, not loaded).
  ``target``: ``(root, layer, path, expert)``: ``root`` in ``top``,
  ``dense``, ``moe``, ``mtp``; ``layer`` the index in that root.
  """
  shape: tuple[int, ...]
  fp8: bool
  kind: str
  target: tuple


def _scale_shape(shape: tuple[int, ...]) -> tuple[int, int]:
  return (-(-shape[0] // _BLOCK), -(-shape[1] // _BLOCK))


def _layer_specs(c: Config, prefix: str, root: str, layer: int, moe: bool) -> dict[str, Spec]:
  D, H = c.dim, c.n_heads
  qk = c.qk_nope_head_dim + c.qk_rope_head_dim
  t = lambda *path, e=None: (root, layer, path, e)
  specs = {
      "input_layernorm.weight": Spec((D,), False, "norm", t("attn_norm", "scale")),
      "post_attention_layernorm.weight": Spec((D,), False, "norm", t("ffn_norm", "scale")),
      "self_attn.kv_a_proj_with_mqa.weight": Spec((c.kv_lora_rank + c.qk_rope_head_dim, D), True,
                                                  "linear", t("attn", "wkv_a")),
      "self_attn.kv_a_layernorm.weight": Spec((c.kv_lora_rank,), False, "norm",
                                              t("attn", "kv_norm", "scale")),
      "self_attn.kv_b_proj.weight": Spec((H * (c.qk_nope_head_dim + c.v_head_dim),
                                          c.kv_lora_rank), True, "dense",
                                         t("attn", "wkv_b", "kernel")),
      "self_attn.o_proj.weight": Spec((D, H * c.v_head_dim), True, "linear", t("attn", "wo")),
  }
  if c.q_lora_rank:
    specs.update({
        "self_attn.q_a_proj.weight": Spec((c.q_lora_rank, D), True, "linear", t("attn", "wq_a")),
        "self_attn.q_a_layernorm.weight": Spec((c.q_lora_rank,), False, "norm",
                                               t("attn", "q_norm", "scale")),
        "self_attn.q_b_proj.weight": Spec((H * qk, c.q_lora_rank), True, "linear",
                                          t("attn", "wq_b"))})
  else:
    specs["self_attn.q_proj.weight"] = Spec((H * qk, D), True, "linear", t("attn", "wq"))
  if not moe:
    for name, shape in (("gate_proj", (c.inter_dim, D)), ("up_proj", (c.inter_dim, D)),
                        ("down_proj", (D, c.inter_dim))):
      specs[f"mlp.{name}.weight"] = Spec(shape, True, "linear", t("ffn", name))
  else:
    E, I = c.n_routed_experts, c.moe_inter_dim
    specs["mlp.gate.weight"] = Spec((E, D), False, "router", t("ffn", "router"))
    specs["mlp.gate.e_score_correction_bias"] = Spec((E,), False, "bias", t("ffn", "gate_bias"))
    for e in range(E):
      for name, ours, shape in (("gate_proj", "w_gate", (I, D)), ("up_proj", "w_up", (I, D)),
                                ("down_proj", "w_down", (D, I))):
        specs[f"mlp.experts.{e}.{name}.weight"] = Spec(shape, True, "expert", t("ffn", ours, e=e))
    if c.n_shared_experts:
      S = c.n_shared_experts * I
      for name, ours, shape in (("gate_proj", "shared_gate", (S, D)),
                                ("up_proj", "shared_up", (S, D)),
                                ("down_proj", "shared_down", (D, S))):
        specs[f"mlp.shared_experts.{name}.weight"] = Spec(shape, True, "shared", t("ffn", ours))
  return {prefix + k: v for k, v in specs.items()}


def checkpoint_tensors(config: Config) -> dict[str, Spec]:
  """Every weight tensor of ``config`` in DeepSeek's layout (scales not listed:
  an FP8-stored weight ``X.weight`` comes with ``X.weight_scale_inv``)."""
  c, D, V = config, config.dim, config.vocab_size
  specs = {"model.embed_tokens.weight": Spec((V, D), False, "embed", ("top", None, ("embed",
                                                                                     "embedding"),
                                                                      None)),
           "model.norm.weight": Spec((D,), False, "norm", ("top", None, ("norm", "scale"), None)),
           "lm_head.weight": Spec((V, D), False, "dense", ("top", None, ("head", "kernel"), None))}
  for n in range(c.n_layers):
    moe = n >= c.n_dense_layers
    root, layer = ("moe", n - c.n_dense_layers) if moe else ("dense", n)
    specs.update(_layer_specs(c, f"model.layers.{n}.", root, layer, moe))
  for k in range(c.n_mtp_layers):
    p = f"model.layers.{c.n_layers + k}."
    specs.update(_layer_specs(c, p, "mtp", k, True))
    mtp = lambda *path: ("mtp_top", k, path, None)
    specs.update({
        p + "enorm.weight": Spec((D,), False, "norm", mtp("enorm", "scale")),
        p + "hnorm.weight": Spec((D,), False, "norm", mtp("hnorm", "scale")),
        p + "eh_proj.weight": Spec((D, 2 * D), False, "linear", mtp("eh_proj")),
        p + "shared_head.norm.weight": Spec((D,), False, "norm", mtp("norm", "scale")),
        p + "embed_tokens.weight": Spec((V, D), False, "copy", mtp()),
        p + "shared_head.head.weight": Spec((V, D), False, "copy", mtp())})
  return specs


# --- validation -------------------------------------------------------------------------------------


_FLOAT = (np.dtype(np.float32), np.dtype(jnp.bfloat16), np.dtype(np.float16))
_E4M3 = np.dtype(jnp.float8_e4m3fn)


def validate(reader: CheckpointReader, config: Config) -> None:
  """Raises ``ValueError`` unless the stored tensors are exactly ``config``'s
  layout (names, shapes, dtypes, FP8 scales); reads headers only."""
  specs = checkpoint_tensors(config)
  stored = reader.tensors
  expected = set(specs) | {n + "_scale_inv" for n, s in specs.items()
                           if n in stored and stored[n].dtype == _E4M3}
  missing = sorted(set(expected) - set(stored))
  extra = sorted(set(stored) - set(expected))
  hint = (f" (is this a checkpoint of another config? expected "
          f"{model_lib.config_lib.describe(config)})")
  if missing:
    raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) of the config, e.g. "
                     f"{missing[:4]}{hint}")
  if extra:
    raise ValueError(f"checkpoint has {len(extra)} tensor(s) the config does not, e.g. "
                     f"{extra[:4]}{hint}")
  for name, spec in specs.items():
    t = stored[name]
    if t.shape != spec.shape:
      raise ValueError(f"checkpoint tensor {name} has shape {list(t.shape)}, the config needs "
                       f"{list(spec.shape)}{hint}")
    if t.dtype == _E4M3:
      if len(spec.shape) != 2:
        raise ValueError(f"checkpoint tensor {name} is FP8 but not a matrix")
      s = stored[name + "_scale_inv"]
      if s.shape != _scale_shape(spec.shape) or s.dtype != np.float32:
        raise ValueError(f"checkpoint tensor {name}_scale_inv must be float32 "
                         f"{list(_scale_shape(spec.shape))} (128 x 128 blocks of "
                         f"{list(spec.shape)}), got {s.dtype} {list(s.shape)}")
    elif t.dtype not in _FLOAT:
      raise ValueError(f"checkpoint tensor {name} has dtype {t.dtype}; expected float32, "
                       f"bfloat16, float16 or float8_e4m3fn")


# --- loading --------------------------------------------------------------------------------------------


def load_config(directory: str | os.PathLike, **run_settings) -> Config:
  """``Config.from_hf`` of the checkpoint's ``config.json`` (``run_settings``:
  dtype, param_dtype, linear, ...)."""
  path = os.path.join(os.fspath(directory), "config.json")
  if not os.path.isdir(os.fspath(directory)):
    raise ValueError(f"checkpoint directory {os.fspath(directory)!r} does not exist")
  if not os.path.exists(path):
    raise ValueError(f"checkpoint directory {os.fspath(directory)!r} has no config.json")
  with open(path) as f:
    return Config.from_hf(json.load(f), **run_settings)


def _dequantized(reader: CheckpointReader, name: str) -> np.ndarray:
  """The weight in float32 (FP8 times its 128 x 128 scales)."""
  w = reader.get(name)
  if w.dtype != _E4M3:
    return np.asarray(w, np.float32)
  scale = reader.get(name + "_scale_inv")
  return np.asarray(quant.dequantize_per_block(jnp.asarray(w), jnp.asarray(scale)), np.float32)


def _linear_leaves(reader: CheckpointReader, name: str, config: Config) -> dict[str, np.ndarray]:
  """The leaves of a ``config.linear`` layer from an ``[out, in]`` weight."""
  if config.linear == "dense":
    return {"kernel": _dequantized(reader, name).T}
  if config.linear == "fp8":
    return {"kernel": _dequantized(reader, name)}
  w = reader.get(name)
  if w.dtype == _E4M3:
    return {"weight": np.asarray(w), "weight_scale_inv": np.asarray(reader.get(
        name + "_scale_inv"))}
  wq, scale = quant.quantize_per_block(jnp.asarray(np.asarray(w, np.float32)))
  return {"weight": np.asarray(wq), "weight_scale_inv": np.asarray(scale)}


def _set(tree: dict, path: Iterable, value) -> None:
  *head, last = list(path)
  for key in head:
    tree = tree.setdefault(key, {})
  tree[last] = value


def load_state(directory: str | os.PathLike, config: Config,
               reader: CheckpointReader | None = None) -> dict:
  """The model's pure state dict (``nnx.to_pure_dict`` layout) from a checkpoint.

  Validates first (:func:`validate`); floats in ``config.param_dtype``
  (``Fp8WeightLinear`` leaves stay e4m3 + float32 scales).
  """
  reader = reader or CheckpointReader(directory)
  validate(reader, config)
  weight = config.weight_dtype
  pieces: dict[tuple, dict] = {}  # (root, path) -> {(layer, expert): array}
  for name, spec in checkpoint_tensors(config).items():
    root, layer, path, expert = spec.target
    if spec.kind == "copy":
      continue
    if spec.kind == "linear":
      for leaf, a in _linear_leaves(reader, name, config).items():
        pieces.setdefault((root, path + (leaf,)), {})[(layer, expert)] = a
      continue
    if spec.kind == "bias":
      a = np.asarray(reader.get(name), np.float32)
    else:
      a = _dequantized(reader, name)
      if spec.kind in ("dense", "router", "shared"):
        a = a.T
    pieces.setdefault((root, path), {})[(layer, expert)] = a
  pure: dict = {}
  for (root, path), parts in pieces.items():
    def cast(a):
      return a if a.dtype in (_E4M3,) or path[-1] in ("gate_bias", "weight_scale_inv") else (
          a.astype(weight))
    if root == "top":
      _set(pure, path, cast(parts[(None, None)]))
    elif root == "dense":
      for (layer, _), a in parts.items():
        _set(pure, ("dense_layers", layer) + path, cast(a))
    elif root == "mtp_top":
      _set(pure, ("mtp",) + path, cast(parts[(0, None)]))
    elif root == "mtp":
      a = parts[(0, None)] if (0, None) in parts else np.stack(
          [parts[(0, e)] for e in range(config.n_routed_experts)])
      _set(pure, ("mtp", "block") + path, cast(a))
    else:  # moe: stacked over layers (and experts)
      def layer_array(layer):
        if (layer, None) in parts:
          return parts[(layer, None)]
        return np.stack([parts[(layer, e)] for e in range(config.n_routed_experts)])
      _set(pure, ("moe_layers",) + path,
           cast(np.stack([layer_array(i) for i in range(config.n_moe_layers)])))
  return pure


def load(directory: str | os.PathLike, config: Config | None = None,
         **run_settings) -> model_lib.DeepSeekV3:
  """A :class:`DeepSeekV3` from a DeepSeek-layout checkpoint directory.

  Args:
    directory: holds ``config.json`` and the safetensors shards.
    config: the config to load into (default: from ``config.json`` with
      ``run_settings``); its architecture must equal the checkpoint's.
    run_settings: ``Config`` run fields (dtype, param_dtype, linear, ...).

  Raises:
    ValueError: missing files, another config's checkpoint (architecture,
      tensor names or shapes), bad FP8 scales: before any array is built.
  """
  stored = load_config(directory, **run_settings)
  if config is None:
    config = stored
  else:
    diff = config.arch_mismatch(stored)
    if diff:
      raise ValueError(f"checkpoint {os.fspath(directory)!r} is for another config: "
                       f"{ {k: f'ours {a}, checkpoint {b}' for k, (a, b) in diff.items()} }")
  reader = CheckpointReader(directory)
  validate(reader, config)
  graphdef, abstract = nnx.split(model_lib.abstract_model(config))
  want = nnx.to_pure_dict(abstract)
  pure = load_state(directory, config, reader)
  flat_want = dict(traverse_util.flatten_dict(want))
  flat_got = dict(traverse_util.flatten_dict(pure))
  if set(flat_want) != set(flat_got):
    raise ValueError(f"load: the layout does not cover the model: missing "
                     f"{sorted(set(flat_want) - set(flat_got))[:4]}, extra "
                     f"{sorted(set(flat_got) - set(flat_want))[:4]}")
  for key, leaf in flat_want.items():
    got = flat_got[key]
    if tuple(got.shape) != tuple(leaf.shape) or np.dtype(got.dtype) != np.dtype(leaf.dtype):
      raise ValueError(f"load: {'/'.join(map(str, key))} is {got.dtype} {got.shape}, the model "
                       f"needs {leaf.dtype} {leaf.shape}")
  arrays = traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat_got.items()})
  return nnx.merge(graphdef, arrays)


# --- writing ----------------------------------------------------------------------------------------


def write_checkpoint(directory: str | os.PathLike, config: Config,
                     tensors: dict[str, np.ndarray], *, num_shards: int = 2) -> None:
  """Writes ``config.json``, ``num_shards`` safetensors shards
  (``model-0000i-of-0000n.safetensors``) and the index, like DeepSeek's release."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(config.to_hf(), f, indent=2, default=float)
  names = sorted(tensors)
  num_shards = max(1, min(num_shards, len(names)))
  per = -(-len(names) // num_shards)
  weight_map = {}
  for i in range(num_shards):
    file = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
    chunk = names[i * per:(i + 1) * per]
    write_safetensors(os.path.join(directory, file), {n: tensors[n] for n in chunk},
                      metadata={"format": "pt"})
    weight_map.update({n: file for n in chunk})
  total = sum(np.asarray(t).nbytes for t in tensors.values())
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def synthetic_checkpoint(directory: str | os.PathLike, config: Config, *, seed: int = 0,
                         fp8: bool = True, num_shards: int = 2) -> dict[str, np.ndarray]:
  """Writes a random checkpoint of ``config`` in DeepSeek's layout; returns the stored tensors.

  Weights that DeepSeek's release stores in FP8 are e4m3 with random
  128 x 128 ``weight_scale_inv`` blocks when ``fp8``; the rest are bf16
  (norm weights around 1, the bias float32). The MTP layer's embedding and
  head are copies of the main model's.
  """
  rng = np.random.default_rng(seed)
  bf16, out = np.dtype(jnp.bfloat16), {}
  for name, spec in checkpoint_tensors(config).items():
    if spec.kind == "copy":
      continue
    if spec.kind == "bias":
      out[name] = rng.normal(0.0, 0.01, spec.shape).astype(np.float32)
    elif spec.kind == "norm":
      out[name] = (1.0 + 0.1 * rng.standard_normal(spec.shape)).astype(bf16)
    elif spec.fp8 and fp8:
      values = rng.standard_normal(spec.shape).astype(np.float32) * 0.5
      out[name] = np.clip(values * 448 / 4, -448, 448).astype(_E4M3)
      out[name + "_scale_inv"] = (rng.uniform(0.5, 1.5, _scale_shape(spec.shape))
                                  / (448 / 4) / np.sqrt(spec.shape[1])).astype(np.float32)
    else:
      out[name] = (rng.standard_normal(spec.shape) / np.sqrt(spec.shape[-1])).astype(bf16)
  for k in range(config.n_mtp_layers):
    p = f"model.layers.{config.n_layers + k}."
    out[p + "embed_tokens.weight"] = out["model.embed_tokens.weight"]
    out[p + "shared_head.head.weight"] = out["lm_head.weight"]
  write_checkpoint(directory, config, out, num_shards=num_shards)
  return out


__all__ = ["CheckpointReader", "Spec", "checkpoint_tensors", "load", "load_config", "load_state",
           "read_safetensors_header", "synthetic_checkpoint", "validate", "write_checkpoint",
           "write_safetensors"]
