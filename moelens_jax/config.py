"""Model configuration: one frozen, validated `ModelConfig` for every supported MoE family.

Model differences are config fields, never model names inside shared layers:

* ``mixtral``   — Mixtral (softmax router, top-k always renormalised).
* ``qwen2_moe`` — Qwen1.5/Qwen2-MoE: q/k/v biases, a shared expert gated by a sigmoid, optional
  top-k renormalisation (``norm_topk_prob``).
* ``qwen3_moe`` — Qwen3-MoE: per-head RMSNorm on q and k before RoPE, explicit ``head_dim``.
* ``dbrx``      — shape-only (LayerNorm, clipped fused QKV are not implemented): used by the
  performance model, which needs sizes but never runs the forward pass.

Presets carry the real shapes of published checkpoints (values from each model's HF
``config.json``) plus small presets for tests and the demo job. ``ModelConfig.from_hf`` maps a HF
``config.json`` (folder or dict); ``to_hf`` is its inverse for the supported families.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "dbrx")
RUNNABLE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
DTYPES = ("float32", "bfloat16", "float16")

# HF `architectures` / `model_type` names this package can load.
_HF_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_HF_MODEL_TYPES = {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}


class ConfigError(ValueError):
    """A model configuration is invalid or not supported."""


def dtype_itemsize(dtype: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "float8_e4m3fn": 1}[dtype]


# KV formats stored as 8-bit codes with a float32 scale per (token, kv head).
QUANTISED_KV_DTYPES = ("int8", "float8_e4m3fn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of one MoE decoder-only transformer.

    Sizes: ``h = hidden_size``, ``f = intermediate_size`` (per routed expert), ``E =
    num_experts``, ``k = num_experts_per_tok``, ``n_q = num_heads``, ``n_kv = num_kv_heads``.
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # routed-expert FFN width
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # 0 = no shared expert (Qwen2-MoE has one)
    qkv_bias: bool = False  # Qwen2-MoE
    qk_norm: bool = False  # Qwen3-MoE: RMSNorm over head_dim on q and k before RoPE
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"  # storage dtype of the weights
    name: str = ""  # informational (preset name or checkpoint folder)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ConfigError(f"unknown family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"unsupported dtype {self.dtype!r}; supported: {', '.join(DTYPES)}")
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "num_experts", "num_experts_per_tok",
                    "max_position_embeddings")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{field} must be a positive integer, got {value!r}")
        if self.shared_expert_intermediate_size < 0:
            raise ConfigError("shared_expert_intermediate_size must be >= 0")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                              f"({self.num_kv_heads})")
        if self.num_experts_per_tok > self.num_experts:
            raise ConfigError(f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                              f"num_experts ({self.num_experts})")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and self.rope_theta > 0):
            raise ConfigError("rms_norm_eps and rope_theta must be positive")

    # ----- derived sizes -------------------------------------------------------------------
    @property
    def group_size(self) -> int:
        """GQA group s = query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def itemsize(self) -> int:
        return dtype_itemsize(self.dtype)

    @property
    def runnable(self) -> bool:
        """Whether the forward pass is implemented for this family (DBRX is shape-only)."""
        return self.family in RUNNABLE_FAMILIES

    @property
    def attention_params_per_layer(self) -> int:
        h = self.hidden_size
        n = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.qkv_bias:
            n += self.q_size + 2 * self.kv_size
        if self.qk_norm:
            n += 2 * self.head_dim
        return n

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (SwiGLU: gate, up, down)."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def shared_expert_params(self) -> int:
        if not self.shared_expert_intermediate_size:
            return 0
        # gate/up/down of the shared expert plus its scalar sigmoid gate (h -> 1).
        return 3 * self.hidden_size * self.shared_expert_intermediate_size + self.hidden_size

    @property
    def params_per_layer(self) -> int:
        """All parameters of one decoder layer (norms, attention, router, experts)."""
        h = self.hidden_size
        return (2 * h + self.attention_params_per_layer + h * self.num_experts
                + self.num_experts * self.expert_params + self.shared_expert_params)

    @property
    def active_params_per_layer(self) -> int:
        h = self.hidden_size
        return (2 * h + self.attention_params_per_layer + h * self.num_experts
                + self.num_experts_per_tok * self.expert_params + self.shared_expert_params)

    @property
    def flops_per_token_per_layer(self) -> float:
        """GEMM FLOPs of one token through one layer (2 per active weight; the experts compute
        exactly the top-k routed rows). Attention over the context is not included."""
        return 2.0 * self.active_params_per_layer

    @property
    def lm_head_flops_per_row(self) -> float:
        """GEMM FLOPs of the lm_head for one logits row."""
        return 2.0 * self.vocab_size * self.hidden_size

    @property
    def embedding_params(self) -> int:
        """Token embedding, final norm and (untied) lm_head."""
        n = self.vocab_size * self.hidden_size + self.hidden_size
        if not self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        return n

    @property
    def total_params(self) -> int:
        return self.num_layers * self.params_per_layer + self.embedding_params

    @property
    def active_params_per_token(self) -> int:
        """Parameters one token touches in a forward pass (top-k experts only)."""
        return self.num_layers * self.active_params_per_layer + self.embedding_params

    @property
    def weight_bytes_per_layer(self) -> int:
        return self.params_per_layer * self.itemsize

    @property
    def total_weight_bytes(self) -> int:
        return self.total_params * self.itemsize

    def kv_bytes_per_token(self, kv_dtype: str | None = None) -> int:
        """Bytes of K and V cached per token over all layers (default: the weights' dtype);
        the 8-bit formats add a float32 scale per kv head."""
        dtype = kv_dtype or self.dtype
        scales = 4 * self.num_kv_heads if dtype in QUANTISED_KV_DTYPES else 0
        return 2 * self.num_layers * (self.kv_size * dtype_itemsize(dtype) + scales)

    # ----- conversion ----------------------------------------------------------------------
    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown ModelConfig fields: {unknown}")
        return cls(**d)

    @classmethod
    def from_hf(cls, folder_or_dict: str | os.PathLike | Mapping[str, Any]) -> ModelConfig:
        """Maps a HF ``config.json`` (a checkpoint folder, the file, or its dict)."""
        name = ""
        if isinstance(folder_or_dict, Mapping):
            hf = dict(folder_or_dict)
        else:
            path = os.fspath(folder_or_dict)
            if os.path.isdir(path):
                name = os.path.basename(os.path.normpath(path))
                path = os.path.join(path, "config.json")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"no config.json at {path}")
            try:
                with open(path) as f:
                    hf = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return _from_hf_dict(hf, name)

    def to_hf(self) -> dict[str, Any]:
        """The HF ``config.json`` dict of this config (inverse of `from_hf`)."""
        if not self.runnable:
            raise ConfigError(f"family {self.family!r} has no HF export")
        arch = {v: k for k, v in _HF_ARCHITECTURES.items()}[self.family]
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "num_experts_per_tok": self.num_experts_per_tok,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
            "hidden_act": "silu",
        }
        if self.family == "mixtral":
            d.update(num_local_experts=self.num_experts, intermediate_size=self.intermediate_size)
        else:
            d.update(num_experts=self.num_experts, moe_intermediate_size=self.intermediate_size,
                     norm_topk_prob=self.norm_topk_prob, decoder_sparse_step=1, mlp_only_layers=[])
        if self.family == "qwen2_moe":
            d.update(shared_expert_intermediate_size=self.shared_expert_intermediate_size,
                     qkv_bias=self.qkv_bias)
        if self.family == "qwen3_moe":
            d.update(attention_bias=False)
        return d


def _from_hf_dict(hf: Mapping[str, Any], name: str) -> ModelConfig:
    archs = hf.get("architectures") or []
    family = None
    for arch in archs:
        family = _HF_ARCHITECTURES.get(arch)
        if family:
            break
    if family is None:
        family = _HF_MODEL_TYPES.get(hf.get("model_type", ""))
    if family is None:
        raise ConfigError(
            f"unsupported architecture {archs or None} / model_type {hf.get('model_type')!r}; "
            f"supported architectures: {', '.join(_HF_ARCHITECTURES)} "
            f"(model_type: {', '.join(_HF_MODEL_TYPES)})")

    def get(key, *alts, default=None, required=True):
        for k in (key, *alts):
            if hf.get(k) is not None:
                return hf[k]
        if required and default is None:
            raise ConfigError(f"config.json ({family}) lacks required field {key!r}")
        return default

    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (only 'silu')")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"rope_type {rope_type!r} is not supported (only 'default')")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("use_sliding_window"):
        raise ConfigError("use_sliding_window=true is not supported")
    if family in ("qwen2_moe", "qwen3_moe"):
        if hf.get("mlp_only_layers"):
            raise ConfigError("mlp_only_layers (dense layers between MoE layers) is not supported")
        if hf.get("decoder_sparse_step", 1) != 1:
            raise ConfigError("decoder_sparse_step != 1 is not supported")

    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    head_dim = hf.get("head_dim") or hidden // heads
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    if dtype not in DTYPES:
        raise ConfigError(f"unsupported checkpoint dtype {dtype!r}; supported: {', '.join(DTYPES)}")
    common = dict(
        family=family,
        vocab_size=int(get("vocab_size")),
        hidden_size=hidden,
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(get("num_key_value_heads", default=heads)),
        head_dim=int(head_dim),
        num_experts_per_tok=int(get("num_experts_per_tok")),
        rms_norm_eps=float(get("rms_norm_eps", default=1e-6)),
        rope_theta=float(rope_theta),
        max_position_embeddings=int(get("max_position_embeddings", default=32768)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
        name=name,
    )
    if family == "mixtral":
        return ModelConfig(num_experts=int(get("num_local_experts", "num_experts")),
                           intermediate_size=int(get("intermediate_size")),
                           norm_topk_prob=True, **common)
    moe = dict(num_experts=int(get("num_experts", "num_local_experts")),
               intermediate_size=int(get("moe_intermediate_size")),
               norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
    if family == "qwen2_moe":
        return ModelConfig(shared_expert_intermediate_size=int(
                               get("shared_expert_intermediate_size", default=0, required=False)),
                           qkv_bias=bool(hf.get("qkv_bias", True)), **moe, **common)
    if hf.get("attention_bias"):
        raise ConfigError("qwen3_moe with attention_bias=true is not supported")
    return ModelConfig(qk_norm=True, **moe, **common)


# ----- presets -----------------------------------------------------------------------------
# Real shapes, from each model's published HF config.json.
_PRESETS: dict[str, ModelConfig] = {
    # mistralai/Mixtral-8x7B-v0.1: 46.7B params, 12.9B active.
    "mixtral-8x7b": ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, num_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, name="mixtral-8x7b"),
    # mistralai/Mixtral-8x22B-v0.1: 141B params, 39B active.
    "mixtral-8x22b": ModelConfig(
        family="mixtral", vocab_size=32768, hidden_size=6144, intermediate_size=16384,
        num_layers=56, num_heads=48, num_kv_heads=8, head_dim=128, num_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=65536, name="mixtral-8x22b"),
    # Qwen/Qwen2-57B-A14B: 57B params, 14B active; 64 routed experts top-8 + shared expert.
    "qwen2-57b-a14b": ModelConfig(
        family="qwen2_moe", vocab_size=151936, hidden_size=3584, intermediate_size=2560,
        shared_expert_intermediate_size=20480, num_layers=28, num_heads=28, num_kv_heads=4,
        head_dim=128, num_experts=64, num_experts_per_tok=8, norm_topk_prob=False,
        qkv_bias=True, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=32768,
        name="qwen2-57b-a14b"),
    # Qwen/Qwen3-30B-A3B: 30.5B params, 3.3B active; 128 experts top-8.
    "qwen3-30b-a3b": ModelConfig(
        family="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=768,
        num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, qk_norm=True, rms_norm_eps=1e-6,
        rope_theta=1e6, max_position_embeddings=40960, name="qwen3-30b-a3b"),
    # databricks/dbrx-base: 132B params, 36B active; 16 experts top-4. Shape-only here.
    "dbrx": ModelConfig(
        family="dbrx", vocab_size=100352, hidden_size=6144, intermediate_size=10752,
        num_layers=40, num_heads=48, num_kv_heads=8, head_dim=128, num_experts=16,
        num_experts_per_tok=4, rms_norm_eps=1e-5, rope_theta=5e5,
        max_position_embeddings=32768, name="dbrx"),
    # Small presets. small-mixtral keeps Mixtral's ratios (f = 3.5 h, GQA group 4, 8 experts
    # top-2, head_dim 64 instead of 128) at 1/8 of the width and 4 layers: the demo default.
    "small-mixtral": ModelConfig(
        family="mixtral", vocab_size=32000, hidden_size=512, intermediate_size=1792,
        num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64, num_experts=8,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6,
        max_position_embeddings=32768, name="small-mixtral"),
    "tiny-mixtral": ModelConfig(
        family="mixtral", vocab_size=256, hidden_size=64, intermediate_size=224, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        rope_theta=1e4, max_position_embeddings=4096, name="tiny-mixtral"),
    "tiny-qwen2-moe": ModelConfig(
        family="qwen2_moe", vocab_size=256, hidden_size=64, intermediate_size=32,
        shared_expert_intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        head_dim=16, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, qkv_bias=True,
        rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=4096,
        name="tiny-qwen2-moe"),
    "tiny-qwen3-moe": ModelConfig(
        family="qwen3_moe", vocab_size=256, hidden_size=64, intermediate_size=32, num_layers=2,
        num_heads=4, num_kv_heads=1, head_dim=24, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, qk_norm=True, rms_norm_eps=1e-6, rope_theta=1e4,
        max_position_embeddings=4096, name="tiny-qwen3-moe"),
}

DEFAULT_PRESET = "small-mixtral"


def preset_names() -> tuple[str, ...]:
    return tuple(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(_PRESETS)}") from None


def resolve_config(name_or_path: str | os.PathLike) -> ModelConfig:
    """A preset by name, or the config.json of a HF checkpoint folder (no weights loaded)."""
    if str(name_or_path) in _PRESETS:
        return _PRESETS[str(name_or_path)]
    if os.path.isdir(name_or_path):
        return ModelConfig.from_hf(name_or_path)
    raise ConfigError(f"{name_or_path!r} is neither a preset ({', '.join(_PRESETS)}) nor a "
                      "checkpoint folder")
