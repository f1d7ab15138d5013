"""DeepSeek-V3 model configurations: the published 671B model, ``small`` and ``tiny``.

A :class:`Config` holds every size of the architecture (the fields of Hugging
Face's ``config.json`` under our names, see :data:`HF_FIELDS`) and how the
model runs (dtypes, GEMM kind, MoE capacity, rematerialization).
``CONFIGS["671b"]`` is DeepSeek-V3 as published (``deepseek-ai/DeepSeek-V3``'s
``config.json``); ``tiny`` trains on CPU in minutes; ``small`` is a ~2B
model for one GPU.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxinfra import mla
from jaxinfra import rope as rope_lib

# How the model's linear layers run:
# * "dense": nnx.Linear in the compute dtype (bf16 / f32 GEMMs).
# * "fp8": jaxinfra.gemm.Fp8Dense, FP8 GEMMs forward and backward with master
#   weights in param_dtype (DeepSeek-V3's FP8 training recipe).
# * "fp8_weights": e4m3 weights with 128 x 128 ``weight_scale_inv`` blocks as
#   stored in DeepSeek's checkpoint, activations quantized per token, one
#   ``jaxinfra.gemm.fp8_gemm`` (serving; forward only).
LINEAR_KINDS = ("dense", "fp8", "fp8_weights")
_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class Config:
  """Sizes and run settings of a DeepSeek-V3 model (defaults: the published 671B).

  Architecture (Hugging Face ``config.json`` key in brackets):
    vocab_size [vocab_size], dim [hidden_size], inter_dim (dense MLP)
    [intermediate_size], moe_inter_dim (per expert) [moe_intermediate_size],
    n_layers [num_hidden_layers], n_dense_layers (the first layers, dense MLP)
    [first_k_dense_replace], n_heads [num_attention_heads], q_lora_rank,
    kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim (same names),
    n_routed_experts, n_shared_experts, n_activated_experts
    [num_experts_per_tok], n_expert_groups [n_group], n_limited_groups
    [topk_group], route_scale [routed_scaling_factor], score_func
    [scoring_func], n_mtp_layers [num_nextn_predict_layers], norm_eps
    [rms_norm_eps], rope (YaRN) [rope_theta, rope_scaling,
    max_position_embeddings].

  Training and run settings:
    mtp_loss_weight: lambda of the MTP loss (DeepSeek-V3: 0.3, later 0.1).
    bias_update_rate: gamma of the aux-loss-free bias update (0.001).
    dtype: compute dtype name; param_dtype: parameter dtype name.
    linear: one of :data:`LINEAR_KINDS` for the attention projections and the
      dense MLPs (the routed and shared experts run in ``jaxinfra.moe``).
    fp8_dispatch: FP8 expert-parallel dispatch (``jaxinfra.moe.MoE(fp8=)``).
    capacity_factor: MoE capacity (None: dropless).
    remat: recompute each layer in the backward pass (``jax.checkpoint``).
  """

  vocab_size: int = 129280
  dim: int = 7168
  inter_dim: int = 18432
  moe_inter_dim: int = 2048
  n_layers: int = 61
  n_dense_layers: int = 3
  n_heads: int = 128
  q_lora_rank: int = 1536
  kv_lora_rank: int = 512
  qk_nope_head_dim: int = 128
  qk_rope_head_dim: int = 64
  v_head_dim: int = 128
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  n_activated_experts: int = 8
  n_expert_groups: int = 8
  n_limited_groups: int = 4
  route_scale: float = 2.5
  score_func: str = "sigmoid"
  n_mtp_layers: int = 1
  norm_eps: float = 1e-6
  rope: rope_lib.YarnConfig = rope_lib.YarnConfig()
  mtp_loss_weight: float = 0.3
  bias_update_rate: float = 1e-3
  dtype: str = "bfloat16"
  param_dtype: str = "float32"
  linear: str = "dense"
  fp8_dispatch: bool = False
  capacity_factor: float | None = None
  remat: bool = False

  def __post_init__(self):
    sizes = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.type == "int" and f.name not in ("q_lora_rank", "n_dense_layers", "n_mtp_layers",
                                                    "n_shared_experts")}
    bad = {k: v for k, v in sizes.items() if v < 1}
    bad.update({k: getattr(self, k) for k in ("q_lora_rank", "n_dense_layers", "n_mtp_layers",
                                              "n_shared_experts") if getattr(self, k) < 0})
    if bad:
      raise ValueError(f"Config: sizes must be positive (q_lora_rank, n_dense_layers, "
                       f"n_mtp_layers, n_shared_experts >= 0), got {bad}")
    if self.n_dense_layers > self.n_layers:
      raise ValueError(f"Config: n_dense_layers={self.n_dense_layers} exceeds "
                       f"n_layers={self.n_layers}")
    if self.n_routed_experts % self.n_expert_groups:
      raise ValueError(f"Config: n_routed_experts={self.n_routed_experts} must be divisible by "
                       f"n_expert_groups={self.n_expert_groups}")
    group = self.n_routed_experts // self.n_expert_groups
    if self.n_limited_groups > self.n_expert_groups or (
        self.n_activated_experts > self.n_limited_groups * group):
      raise ValueError(f"Config: top-{self.n_activated_experts} routing over "
                       f"{self.n_limited_groups} of {self.n_expert_groups} groups of {group} "
                       f"experts is impossible")
    if self.rope.dim != self.qk_rope_head_dim:
      raise ValueError(f"Config: rope.dim={self.rope.dim} must equal "
                       f"qk_rope_head_dim={self.qk_rope_head_dim}")
    if self.linear not in LINEAR_KINDS:
      raise ValueError(f"Config: linear must be one of {LINEAR_KINDS}, got {self.linear!r}")
    for name in ("dtype", "param_dtype"):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f"Config: {name} must be one of {_DTYPES}, got {getattr(self, name)!r}")
    if self.score_func not in ("sigmoid", "softmax"):
      raise ValueError(f"Config: score_func must be 'sigmoid' or 'softmax', got "
                       f"{self.score_func!r}")
    if self.capacity_factor is not None and self.capacity_factor <= 0:
      raise ValueError(f"Config: capacity_factor must be positive, got {self.capacity_factor}")

  # -- derived ------------------------------------------------------------------------------------

  @property
  def n_moe_layers(self) -> int:
    return self.n_layers - self.n_dense_layers

  @property
  def compute_dtype(self) -> np.dtype:
    return np.dtype(getattr(jnp, self.dtype))

  @property
  def weight_dtype(self) -> np.dtype:
    return np.dtype(getattr(jnp, self.param_dtype))

  @property
  def mla(self) -> mla.MLAConfig:
    """The attention layer's sizes."""
    return mla.MLAConfig(dim=self.dim, n_heads=self.n_heads, q_lora_rank=self.q_lora_rank,
                         kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                         qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                         norm_eps=self.norm_eps, rope=self.rope, interleaved_rope=True)

  @property
  def supports_paged_decode(self) -> bool:
    """FlashMLA's 576/512 latent layout, which ``mla_decode`` needs."""
    return self.kv_lora_rank == 512 and self.qk_rope_head_dim == 64

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)

  # -- Hugging Face config.json -------------------------------------------------------------------

  def to_hf(self) -> dict:
    """The architecture as DeepSeek's ``config.json`` keys (plus the FP8
    ``quantization_config`` of the released checkpoint)."""
    hf = {hf_key: getattr(self, key) for key, hf_key in HF_FIELDS.items()}
    r = self.rope
    hf.update(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"],
        hidden_act="silu", norm_topk_prob=True, topk_method="noaux_tc",
        tie_word_embeddings=False, rope_theta=r.theta, max_position_embeddings=r.max_position,
        num_key_value_heads=self.n_heads,
        quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                             "quant_method": "fp8", "weight_block_size": [128, 128]})
    if r.extended:
      hf["rope_scaling"] = {"type": "yarn", "factor": r.factor,
                            "original_max_position_embeddings": r.original_max_position,
                            "beta_fast": r.beta_fast, "beta_slow": r.beta_slow,
                            "mscale": r.mscale, "mscale_all_dim": r.mscale}
    return hf

  @classmethod
  def from_hf(cls, hf: dict, **run_settings) -> "Config":
    """A :class:`Config` from a DeepSeek-V3 ``config.json`` dict; ``run_settings``
    (dtype, linear, ...) override the defaults.

    Raises ``ValueError`` for settings this model does not implement (tied
    embeddings, routing other than ``noaux_tc`` with normalized top-k, a
    YaRN ``mscale`` different from ``mscale_all_dim``).
    """
    missing = [k for k in HF_FIELDS.values() if k not in hf]
    if missing:
      raise ValueError(f"Config.from_hf: config.json lacks {missing}")
    if hf.get("tie_word_embeddings", False):
      raise ValueError("Config.from_hf: tied embeddings are not supported")
    if hf.get("topk_method", "noaux_tc") != "noaux_tc" or not hf.get("norm_topk_prob", True):
      raise ValueError(f"Config.from_hf: only noaux_tc routing with norm_topk_prob is "
                       f"implemented, got topk_method={hf.get('topk_method')!r}, "
                       f"norm_topk_prob={hf.get('norm_topk_prob')!r}")
    scaling = hf.get("rope_scaling") or {}
    max_pos = int(hf.get("max_position_embeddings", 4096))
    if scaling:
      if scaling.get("type", scaling.get("rope_type")) != "yarn":
        raise ValueError(f"Config.from_hf: only YaRN rope_scaling is implemented, got {scaling}")
      mscale = float(scaling.get("mscale", 1.0))
      if float(scaling.get("mscale_all_dim", mscale)) != mscale:
        raise ValueError(f"Config.from_hf: mscale != mscale_all_dim is not implemented: {scaling}")
      rope = rope_lib.YarnConfig(
          dim=int(hf["qk_rope_head_dim"]), theta=float(hf.get("rope_theta", 10000.0)),
          factor=float(scaling["factor"]),
          original_max_position=int(scaling["original_max_position_embeddings"]),
          max_position=max_pos, beta_fast=float(scaling.get("beta_fast", 32)),
          beta_slow=float(scaling.get("beta_slow", 1)), mscale=mscale)
    else:
      rope = rope_lib.YarnConfig(dim=int(hf["qk_rope_head_dim"]),
                                 theta=float(hf.get("rope_theta", 10000.0)), factor=1.0,
                                 original_max_position=max_pos, max_position=max_pos)
    # Each field's type is its default's (int, float or str).
    arch = {key: type(getattr(cls, key))(hf[hf_key]) for key, hf_key in HF_FIELDS.items()}
    return cls(**arch, rope=rope, **run_settings)

  def arch_mismatch(self, other: "Config") -> dict[str, tuple]:
    """Architecture fields (and RoPE) that differ from ``other``'s: ``{name: (ours, theirs)}``."""
    names = list(HF_FIELDS) + ["rope"]
    return {n: (getattr(self, n), getattr(other, n)) for n in names
            if getattr(self, n) != getattr(other, n)}


# Our field -> Hugging Face config.json key.
HF_FIELDS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "inter_dim": "intermediate_size",
    "moe_inter_dim": "moe_intermediate_size", "n_layers": "num_hidden_layers",
    "n_dense_layers": "first_k_dense_replace", "n_heads": "num_attention_heads",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim",
    "v_head_dim": "v_head_dim", "n_routed_experts": "n_routed_experts",
    "n_shared_experts": "n_shared_experts", "n_activated_experts": "num_experts_per_tok",
    "n_expert_groups": "n_group", "n_limited_groups": "topk_group",
    "route_scale": "routed_scaling_factor", "score_func": "scoring_func",
    "n_mtp_layers": "num_nextn_predict_layers", "norm_eps": "rms_norm_eps",
}

# DeepSeek-V3 as published (deepseek-ai/DeepSeek-V3 config.json): every default above.
DEEPSEEK_V3 = Config()

# ~2B parameters (~0.4B activated): one GPU.
SMALL = Config(
    vocab_size=32768, dim=1024, inter_dim=4096, moe_inter_dim=512, n_layers=16, n_dense_layers=1,
    n_heads=16, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=64, qk_rope_head_dim=64,
    v_head_dim=64, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
    n_expert_groups=8, n_limited_groups=4, route_scale=2.5, n_mtp_layers=1,
    rope=rope_lib.YarnConfig(dim=64, factor=4.0, original_max_position=4096,
                             max_position=16384))

# Trains on 8 CPU devices in minutes. kv_lora_rank 512 and rope 64 keep FlashMLA's
# 576/512 cache layout, so mla_decode serves it; YaRN is on (512 -> 2048).
TINY = Config(
    vocab_size=512, dim=64, inter_dim=128, moe_inter_dim=32, n_layers=5, n_dense_layers=1,
    n_heads=4, q_lora_rank=32, kv_lora_rank=512, qk_nope_head_dim=32, qk_rope_head_dim=64,
    v_head_dim=32, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
    n_expert_groups=4, n_limited_groups=2, route_scale=2.5, n_mtp_layers=1,
    rope=rope_lib.YarnConfig(dim=64, factor=4.0, original_max_position=512, max_position=2048),
    dtype="float32")

CONFIGS = {"tiny": TINY, "small": SMALL, "671b": DEEPSEEK_V3}


def get_config(name: str, **changes) -> Config:
  """``CONFIGS[name]`` with ``changes`` applied (``ValueError`` for an unknown name)."""
  if name not in CONFIGS:
    raise ValueError(f"unknown config {name!r}; choose one of {sorted(CONFIGS)}")
  return dataclasses.replace(CONFIGS[name], **changes)


def ceil_div(a: int, b: int) -> int:
  return -(-a // b)


def check_mesh(config: Config, mesh, *, expert_axis: str | None = None,
               pipe_axis: str | None = None, num_stages: int | None = None) -> None:
  """Raises ``ValueError`` (before anything is compiled) when the config does
  not fit the mesh: experts not divisible by the expert axis, MoE layers not
  divisible into ``num_stages`` pipeline stages, missing axes."""
  if mesh is None:
    if expert_axis is not None or pipe_axis is not None:
      raise ValueError("check_mesh: expert_axis / pipe_axis given without a mesh")
    return
  for role, axis in (("expert_axis", expert_axis), ("pipe_axis", pipe_axis)):
    if axis is not None and axis not in mesh.axis_names:
      raise ValueError(f"check_mesh: {role}={axis!r} is not an axis of the mesh "
                       f"{dict(mesh.shape)}")
  if expert_axis is not None:
    ranks = mesh.shape[expert_axis]
    if config.n_routed_experts % ranks:
      raise ValueError(f"check_mesh: n_routed_experts={config.n_routed_experts} is not divisible "
                       f"by the {ranks} devices of mesh axis {expert_axis!r}")
  if num_stages is not None:
    if num_stages < 1 or config.n_moe_layers % num_stages:
      raise ValueError(f"check_mesh: the {config.n_moe_layers} MoE layers (n_layers="
                       f"{config.n_layers} - n_dense_layers={config.n_dense_layers}) do not "
                       f"split into {num_stages} equal pipeline stages")


def describe(config: Config) -> str:
  """One line of the main sizes."""
  return (f"{config.n_layers} layers ({config.n_dense_layers} dense), dim {config.dim}, "
          f"{config.n_heads} heads, {config.n_routed_experts} routed experts (top-"
          f"{config.n_activated_experts}, {config.n_expert_groups} groups, "
          f"{config.n_limited_groups} kept) + {config.n_shared_experts} shared, vocab "
          f"{config.vocab_size}, {config.n_mtp_layers} MTP layer(s)")


__all__ = ["CONFIGS", "Config", "DEEPSEEK_V3", "HF_FIELDS", "LINEAR_KINDS", "SMALL", "TINY",
           "ceil_div", "check_mesh", "describe", "get_config"]
