"""HF checkpoint folders -> `Model`: name mapping per family, a shape check per tensor.

Reads ``config.json`` plus ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``. Tensor names follow the files HF writes (transformers 5 fuses
Mixtral experts in memory but saves them per expert as ``experts.{j}.w1/w2/w3``). Each tensor is
checked against the shape the config implies, converted to the target dtype and transposed to
the ``[in, out]`` layout straight into its layer's contiguous host buffer; every tensor in the
files must be consumed (an unexpected tensor is an error, not silently dropped).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os

import numpy as np
from tqdm.auto import tqdm

from moelens_jax.checkpoint.safetensors_io import (
    CheckpointError,
    SafetensorsFile,
    write_safetensors,
)
from moelens_jax.config import ConfigError, ModelConfig
from moelens_jax.model.model import Model
from moelens_jax.model.weights import NP_DTYPES, HostLayer, LayerLayout

_ST_TO_DTYPE = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one HF tensor goes: `field` of layer `layer` (None: model-level), expert slot."""

    hf_name: str
    hf_shape: tuple[int, ...]
    field: str
    layer: int | None = None
    expert: int | None = None
    transpose: bool = False


def expected_tensors(cfg: ModelConfig) -> list[Source]:
    """Every tensor a HF checkpoint of `cfg` must contain, with its HF shape."""
    h, q, kv, f, d = (cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size,
                      cfg.head_dim)
    moe = "block_sparse_moe" if cfg.family == "mixtral" else "mlp"
    proj = (("w1", "w3", "w2") if cfg.family == "mixtral"
            else ("gate_proj", "up_proj", "down_proj"))
    out = [Source("model.embed_tokens.weight", (cfg.vocab_size, h), "embed"),
           Source("model.norm.weight", (h,), "final_norm")]
    if not cfg.tie_word_embeddings:
        out.append(Source("lm_head.weight", (cfg.vocab_size, h), "lm_head"))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        lin = lambda name, shape, field, **kw: Source(p + name, shape, field, i, **kw)  # noqa
        out += [lin("input_layernorm.weight", (h,), "attn_norm"),
                lin("post_attention_layernorm.weight", (h,), "ffn_norm"),
                lin("self_attn.q_proj.weight", (q, h), "wq", transpose=True),
                lin("self_attn.k_proj.weight", (kv, h), "wk", transpose=True),
                lin("self_attn.v_proj.weight", (kv, h), "wv", transpose=True),
                lin("self_attn.o_proj.weight", (h, q), "wo", transpose=True),
                lin(f"{moe}.gate.weight", (cfg.num_experts, h), "router", transpose=True)]
        if cfg.qkv_bias:
            out += [lin("self_attn.q_proj.bias", (q,), "bq"),
                    lin("self_attn.k_proj.bias", (kv,), "bk"),
                    lin("self_attn.v_proj.bias", (kv,), "bv")]
        if cfg.qk_norm:
            out += [lin("self_attn.q_norm.weight", (d,), "q_norm"),
                    lin("self_attn.k_norm.weight", (d,), "k_norm")]
        for j in range(cfg.num_experts):
            e = f"{moe}.experts.{j}."
            out += [lin(e + f"{proj[0]}.weight", (f, h), "w_gate", expert=j, transpose=True),
                    lin(e + f"{proj[1]}.weight", (f, h), "w_up", expert=j, transpose=True),
                    lin(e + f"{proj[2]}.weight", (h, f), "w_down", expert=j, transpose=True)]
        fs = cfg.shared_expert_intermediate_size
        if fs:
            s = "mlp.shared_expert."
            out += [lin(s + "gate_proj.weight", (fs, h), "shared_gate", transpose=True),
                    lin(s + "up_proj.weight", (fs, h), "shared_up", transpose=True),
                    lin(s + "down_proj.weight", (h, fs), "shared_down", transpose=True),
                    lin("mlp.shared_expert_gate.weight", (1, h), "shared_expert_gate",
                        transpose=True)]
    return out


def _shard_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index} is malformed: {e!r}") from e
        files = sorted(set(weight_map.values()))
        missing = [x for x in files if not os.path.isfile(os.path.join(folder, x))]
        if missing:
            raise CheckpointError(f"{folder}: shards listed in the index are missing: {missing}")
        return [os.path.join(folder, x) for x in files]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder}: no *.safetensors files (only safetensors checkpoints "
                              "are supported)")
    return files


def load_hf(folder: str, dtype: str | None = None, progress: bool = False) -> Model:
    """Loads a HF MoE checkpoint folder.

    Args:
      folder: holds config.json and model.safetensors or sharded model-*.safetensors (+ index).
      dtype: storage dtype of the loaded weights; default = the checkpoint tensors' dtype.
      progress: show a per-layer progress bar.

    Raises:
      FileNotFoundError: no folder / no config.json.
      ConfigError: unsupported architecture or config field.
      CheckpointError: corrupt file, missing / unexpected / misshaped tensor, unsupported dtype.
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder!r} does not exist")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder}: missing config.json (is this a HF checkpoint?)")
    cfg = ModelConfig.from_hf(folder)
    if not cfg.runnable:
        raise ConfigError(f"family {cfg.family!r} cannot be loaded (shape-only)")
    files = [SafetensorsFile(p) for p in _shard_files(folder)]
    where: dict[str, SafetensorsFile] = {}
    for sf in files:
        for name in sf.keys():
            if name in where:
                raise CheckpointError(f"tensor {name!r} appears in both {where[name].path} and "
                                      f"{sf.path}")
            where[name] = sf

    sources = expected_tensors(cfg)
    expected = {s.hf_name for s in sources}
    missing = [s.hf_name for s in sources if s.hf_name not in where]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing[0]!r} "
                              f"({len(missing)} missing in total)")
    ignorable = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = sorted(set(where) - expected - ignorable)
    if extra:
        raise CheckpointError(f"{folder}: unexpected tensor {extra[0]!r} not used by a "
                              f"{cfg.family} model of this config ({len(extra)} unexpected)")

    st_dtypes = {where[s.hf_name].info(s.hf_name)[0] for s in sources}
    if dtype is None:
        dtype = _ST_TO_DTYPE.get(next(iter(st_dtypes))) if len(st_dtypes) == 1 else cfg.dtype
        dtype = dtype or cfg.dtype
    if dtype not in NP_DTYPES:
        raise ConfigError(f"unsupported dtype {dtype!r}; supported: {', '.join(NP_DTYPES)}")
    cfg = cfg.replace(dtype=dtype)
    np_dtype = NP_DTYPES[dtype]

    layout = LayerLayout.for_config(cfg)
    layers = [HostLayer.allocate(layout) for _ in range(cfg.num_layers)]
    rest = {"embed": np.empty((cfg.vocab_size, cfg.hidden_size), np_dtype),
            "final_norm": np.empty((cfg.hidden_size,), np_dtype)}
    if not cfg.tie_word_embeddings:
        rest["lm_head"] = np.empty((cfg.vocab_size, cfg.hidden_size), np_dtype)

    for s in tqdm(sources, desc=f"loading {os.path.basename(folder)}", disable=not progress,
                  unit="tensor"):
        sf = where[s.hf_name]
        st_dtype, shape = sf.info(s.hf_name)
        if shape != s.hf_shape:
            raise CheckpointError(f"{sf.path}: tensor {s.hf_name!r} has shape {list(shape)}, "
                                  f"expected {list(s.hf_shape)} for this config")
        src = sf.get(s.hf_name)  # raises on unsupported dtype
        if s.layer is None:
            dst = rest[s.field]
        else:
            dst = getattr(layers[s.layer].weights, s.field)
            if s.expert is not None:
                dst = dst[s.expert]
        dst[...] = src.T if s.transpose else src
    model = Model(cfg, layers, rest, source=os.path.abspath(folder))
    tok_path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tok_path):
        from tokenizers import Tokenizer
        try:
            model.tokenizer = Tokenizer.from_file(tok_path)
        except Exception as e:  # the tokenizers library raises a bare Exception
            raise CheckpointError(f"{tok_path}: unreadable tokenizer ({e})") from e
    return model


def save_hf(model: Model, folder: str) -> None:
    """Writes `model` as a HF checkpoint folder (config.json + model.safetensors) that
    `transformers` and `load_hf` both read; the inverse of `load_hf`, bit for bit."""
    model.require_pageable("saving")
    model.require_float("saving")
    cfg = model.config.replace(dtype=model.dtype)
    if os.path.exists(folder) and os.listdir(folder):
        raise FileExistsError(f"{folder} exists and is not empty")
    os.makedirs(folder, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    w = model.weights
    rest = {"embed": w.embed, "final_norm": w.final_norm, "lm_head": w.lm_head}
    for s in expected_tensors(cfg):
        if s.layer is None:
            src = np.asarray(rest[s.field])
        else:
            src = np.asarray(getattr(w.layers[s.layer], s.field))
            if s.expert is not None:
                src = src[s.expert]
        arr = np.ascontiguousarray(src.T if s.transpose else src)
        assert arr.shape == s.hf_shape, (s.hf_name, arr.shape, s.hf_shape)
        tensors[s.hf_name] = arr
    write_safetensors(os.path.join(folder, "model.safetensors"), tensors)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg.to_hf(), f, indent=2)
