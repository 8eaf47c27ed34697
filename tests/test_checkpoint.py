"""Checkpoint loading: orbax round trip, dtypes, and every malformed input named clearly."""

from __future__ import annotations

import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch

import moelens_jax as mj
from moelens_jax import reference
from moelens_jax.checkpoint.safetensors_io import CheckpointError
from tests.conftest import HF_CASES, hf_model

CASE = "qwen2-g2-top2-shared"  # has biases and a shared expert: the most tensor kinds


@pytest.fixture
def ckpt(hf_checkpoints, tmp_path):
    """A private, editable copy of a float32 HF checkpoint."""
    dst = tmp_path / "ckpt"
    shutil.copytree(hf_checkpoints[CASE], dst)
    return dst


def _edit_tensors(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_orbax_round_trip_is_bit_identical(preset, tmp_path):
    model = mj.load_model(preset, seed=5)
    mj.save_model(model, tmp_path / "ck")
    back = mj.load_model(tmp_path / "ck")
    assert back.config == model.config
    for a, b in zip(model.host_layers, back.host_layers, strict=True):
        assert np.array_equal(a.buffer, b.buffer)
    for k in ("embed", "final_norm", "lm_head"):
        assert np.array_equal(np.asarray(getattr(model.weights, k)).view(np.uint8),
                              np.asarray(getattr(back.weights, k)).view(np.uint8))
    tokens = np.arange(24).reshape(2, 12) % model.config.vocab_size
    assert np.array_equal(np.asarray(model.forward(tokens)), np.asarray(back.forward(tokens)))


def test_orbax_refuses_to_overwrite(tmp_path):
    model = mj.load_model("tiny-mixtral")
    mj.save_model(model, tmp_path / "ck")
    with pytest.raises(FileExistsError):
        mj.save_model(model, tmp_path / "ck")


def test_orbax_config_mismatch_is_an_error(tmp_path):
    mj.save_model(mj.load_model("tiny-mixtral"), tmp_path / "ck")
    meta_path = tmp_path / "ck" / "moelens_config.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["hidden_size"] = 96
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"tensor \['embed'\] is bfloat16\[256, 64\], the "
                                              r"config implies bfloat16\[256, 96\]"):
        mj.load_model(tmp_path / "ck")


def test_orbax_restore_with_dtype_conversion(tmp_path):
    model = mj.load_model("tiny-qwen3-moe", dtype="float32")
    mj.save_model(model, tmp_path / "ck")
    back = mj.load_model(tmp_path / "ck", dtype="bfloat16")
    assert back.dtype == "bfloat16" and back.config.dtype == "bfloat16"
    np.testing.assert_array_equal(
        np.asarray(back.weights.layers[1].w_down),
        np.asarray(model.weights.layers[1].w_down).astype(ml_dtypes.bfloat16))


def test_bf16_checkpoint_loads_as_bf16_bit_exact(tmp_path):
    family, kw = HF_CASES["mixtral-g2-top2"]
    hf = hf_model(family, **kw).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "bf16")
    model = mj.load_model(tmp_path / "bf16")
    assert model.dtype == "bfloat16" and model.config.dtype == "bfloat16"
    bits = lambda t: t.detach().view(torch.int16).numpy()  # noqa: E731
    sd = load_torch(str(tmp_path / "bf16" / "model.safetensors"))  # names as saved, per expert
    np.testing.assert_array_equal(np.asarray(model.weights.embed).view(np.int16),
                                  bits(sd["model.embed_tokens.weight"]))
    np.testing.assert_array_equal(
        np.asarray(model.weights.layers[1].w_down[3]).view(np.int16),
        bits(sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"]).T)
    # bf16 weights with float32 accumulation vs HF's float32 math on the same (upcast) weights:
    # the only difference is rounding activations to bf16 before each matmul.
    tokens = np.random.default_rng(0).integers(0, 128, (2, 13))
    with torch.no_grad():
        ref = hf.float()(torch.tensor(tokens)).logits.numpy()
    reference.assert_close(model.forward(tokens), ref, rel_l2=2e-2, name="bf16 logits")


def test_dtype_argument_converts(hf_checkpoints):
    model = mj.load_model(hf_checkpoints[CASE], dtype="bfloat16")
    assert model.dtype == "bfloat16"
    assert np.asarray(model.weights.layers[0].wq).dtype == ml_dtypes.bfloat16


# ----- bad input ---------------------------------------------------------------------------

def test_missing_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.pop("model.layers.1.mlp.experts.2.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.mlp\.experts"
                                              r"\.2\.up_proj\.weight'"):
        mj.load_model(ckpt)


def test_unexpected_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.mystery.weight":
                                            np.zeros((2, 2), np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.mystery"):
        mj.load_model(ckpt)


def test_misshaped_tensor(ckpt):
    _edit_tensors(ckpt, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight":
                                            np.zeros((16, 31), np.float32)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \[16, 31\], "
                                              r"expected \[16, 32\]"):
        mj.load_model(ckpt)


@pytest.mark.parametrize("np_dtype,st_name", [(np.int8, "I8"), (np.float64, "F64")])
def test_unsupported_dtype(ckpt, np_dtype, st_name):
    _edit_tensors(ckpt, lambda t: t.update({"model.norm.weight": np.ones(32, np_dtype)}))
    with pytest.raises(CheckpointError, match=rf"'model\.norm\.weight' has unsupported dtype "
                                              rf"{st_name}"):
        mj.load_model(ckpt)


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        mj.load_model(ckpt)


def test_corrupt_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:20] = b"#garbage####"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        mj.load_model(ckpt)


def test_missing_config(ckpt):
    os.remove(ckpt / "config.json")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        mj.load_model(ckpt)


def test_unknown_architecture(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mj.ConfigError, match="GPT2LMHeadModel.*supported architectures"):
        mj.load_model(ckpt)


def test_missing_shard(hf_checkpoints, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(hf_checkpoints["mixtral-g2-top2-sharded"], dst)
    shard = sorted(p for p in os.listdir(dst) if p.endswith(".safetensors"))[-1]
    os.remove(dst / shard)
    with pytest.raises(CheckpointError, match="shards listed in the index are missing"):
        mj.load_model(dst)


def test_not_a_checkpoint_or_preset(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint folder nor a "
                                                "preset"):
        mj.load_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="missing config.json"):
        mj.load_model(tmp_path)
    with pytest.raises(mj.ConfigError, match="shape-only"):
        mj.load_model("dbrx")


@pytest.mark.parametrize("tokens,match", [
    ([[1, 2, 256]], r"token id 256 at position \(0, 2\) is outside the vocabulary \[0, 256\)"),
    ([[1, -1]], "token id -1"),
    ([1, 2, 3], "rank 2"),
    (np.zeros((1, 0), np.int32), "empty"),
    ([[1.0, 2.0]], "integers"),
])
def test_bad_tokens(tokens, match):
    model = mj.load_model("tiny-mixtral")
    with pytest.raises(mj.TokenError, match=match):
        model.forward(tokens)


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_save_hf_round_trips_and_loads_in_transformers(preset, tmp_path):
    import transformers

    from moelens_jax.checkpoint import save_hf
    model = mj.load_model(preset, dtype="float32", seed=2)
    save_hf(model, str(tmp_path / "hf"))
    back = mj.load_model(tmp_path / "hf")
    for a, b in zip(model.host_layers, back.host_layers, strict=True):
        assert np.array_equal(a.buffer, b.buffer)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                           dtype=torch.float32).eval()
    tokens = np.random.default_rng(0).integers(0, 256, (2, 9))
    with torch.no_grad():
        ref = hf(torch.tensor(tokens)).logits.numpy()
    reference.assert_close(model.forward(tokens), ref, rel_l2=1e-4, name=f"{preset} via HF")


def test_save_hf_writes_bf16(tmp_path):
    from moelens_jax.checkpoint import save_hf
    model = mj.load_model("tiny-mixtral", seed=4)  # bf16 preset
    save_hf(model, str(tmp_path / "hf"))
    back = mj.load_model(tmp_path / "hf")
    assert back.dtype == "bfloat16"
    assert all(np.array_equal(a.buffer, b.buffer)
               for a, b in zip(model.host_layers, back.host_layers, strict=True))
    with pytest.raises(FileExistsError):
        save_hf(model, str(tmp_path / "hf"))


def test_corrupt_tokenizer_is_a_clear_error(ckpt):
    (ckpt / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable tokenizer"):
        mj.load_model(ckpt)
