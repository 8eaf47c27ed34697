"""ModelConfig: presets, derived sizes against published parameter counts, HF mapping."""

from __future__ import annotations

import json

import pytest

from moelens_jax.config import ConfigError, ModelConfig, get_preset, preset_names

# Published totals / active parameters (billions) of the real checkpoints, and the tolerance
# our count must meet (the published figures are rounded).
PUBLISHED = {"mixtral-8x7b": (46.7, 12.9), "mixtral-8x22b": (141.0, 39.0),
             "qwen2-57b-a14b": (57.4, 14.2), "qwen3-30b-a3b": (30.5, 3.3), "dbrx": (132.0, 36.0)}


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_parses_and_round_trips(name):
    cfg = get_preset(name)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.total_params > cfg.active_params_per_token > 0
    if cfg.runnable:
        back = ModelConfig.from_hf(cfg.to_hf())
        assert back == cfg.replace(name="")


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_counts_match_published(name):
    total, active = PUBLISHED[name]
    cfg = get_preset(name)
    assert cfg.total_params / 1e9 == pytest.approx(total, rel=0.02)
    assert cfg.active_params_per_token / 1e9 == pytest.approx(active, rel=0.05)


def test_derived_sizes_mixtral_8x7b():
    cfg = get_preset("mixtral-8x7b")
    assert cfg.group_size == 4
    assert cfg.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2  # 128 KiB in bf16
    assert cfg.kv_bytes_per_token("float32") == 2 * cfg.kv_bytes_per_token()
    per_layer = 4096 * 2 + 4096 * (4096 + 2 * 1024) + 4096 * 4096 + 4096 * 8 + 8 * 3 * 4096 * 14336
    assert cfg.params_per_layer == per_layer
    assert cfg.weight_bytes_per_layer == 2 * per_layer
    assert cfg.total_weight_bytes == 2 * cfg.total_params


def test_from_hf_folder(tmp_path):
    hf = get_preset("qwen2-57b-a14b").to_hf()
    hf["rope_theta"] = hf.pop("rope_parameters")["rope_theta"]  # transformers-4 style field
    hf["torch_dtype"] = hf.pop("dtype")
    (tmp_path / "config.json").write_text(json.dumps(hf))
    cfg = ModelConfig.from_hf(tmp_path)
    assert cfg.replace(name="") == get_preset("qwen2-57b-a14b").replace(name="")
    assert cfg.name == tmp_path.name


def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError, match="LlamaForCausalLM.*supported.*MixtralForCausalLM"):
        ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})


@pytest.mark.parametrize("change,match", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope_type"),
    (dict(mlp_only_layers=[0]), "mlp_only_layers"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(dtype="int8"), "dtype"),
])
def test_unsupported_hf_fields_are_named(change, match):
    hf = get_preset("tiny-qwen3-moe").to_hf()
    hf.update(change)
    with pytest.raises(ConfigError, match=match):
        ModelConfig.from_hf(hf)


def test_missing_required_field():
    hf = get_preset("tiny-mixtral").to_hf()
    del hf["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelConfig.from_hf(hf)


@pytest.mark.parametrize("change,match", [
    (dict(num_heads=6, num_kv_heads=4), "multiple of num_kv_heads"),
    (dict(num_experts_per_tok=5), "exceeds num_experts"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(head_dim=15), "even"),
    (dict(family="llama"), "unknown family"),
    (dict(dtype="int4"), "dtype"),
])
def test_validation(change, match):
    with pytest.raises(ConfigError, match=match):
        get_preset("tiny-mixtral").replace(**change)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="presets: .*mixtral-8x7b"):
        get_preset("mixtral-9x9b")
