"""Shared fixtures: tiny random HF checkpoints written with `transformers.save_pretrained`."""

from __future__ import annotations

import os

import pytest

# Tiny HF configs covering the families and the shapes that break naive code: GQA group 1 and
# > 1, top-1 and top-2, head_dim != hidden / heads, tied embeddings, a shared expert.
HF_CASES = {
    "mixtral-g2-top2": ("mixtral", dict(num_attention_heads=4, num_key_value_heads=2,
                                        num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-g1-top1-hd12": ("mixtral", dict(num_attention_heads=4, num_key_value_heads=4,
                                             head_dim=12, num_local_experts=4,
                                             num_experts_per_tok=1)),
    "qwen2-g2-top2-shared": ("qwen2_moe", dict(num_attention_heads=4, num_key_value_heads=2,
                                               num_experts=6, num_experts_per_tok=2,
                                               moe_intermediate_size=24,
                                               shared_expert_intermediate_size=40,
                                               norm_topk_prob=False)),
    "qwen2-g1-top1-norm": ("qwen2_moe", dict(num_attention_heads=4, num_key_value_heads=4,
                                             num_experts=4, num_experts_per_tok=1,
                                             moe_intermediate_size=16,
                                             shared_expert_intermediate_size=24,
                                             norm_topk_prob=True)),
    "qwen3-g4-top2-hd12": ("qwen3_moe", dict(num_attention_heads=4, num_key_value_heads=1,
                                             head_dim=12, num_experts=8, num_experts_per_tok=2,
                                             moe_intermediate_size=24, norm_topk_prob=True)),
    "qwen3-g2-top1-tied": ("qwen3_moe", dict(num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16, num_experts=4, num_experts_per_tok=1,
                                             moe_intermediate_size=24, norm_topk_prob=False,
                                             tie_word_embeddings=True)),
}


@pytest.fixture(autouse=True, scope="session")
def _isolated_calibration_cache(tmp_path_factory):
    """`run_throughput` and `perf.calibrate` read a cached calibration (the engine itself reads
    nothing from disk): keep tests from seeing the user's cache (~/.cache/moelens_jax) so every
    run starts from the same state."""
    os.environ["MOELENS_CACHE"] = str(tmp_path_factory.mktemp("moelens_cache"))


def hf_model(family: str, seed: int = 0, **overrides):
    """A tiny random HF model of `family` (float32, weights ~N(0, 0.1) so routing is decisive)."""
    import torch
    import transformers as tf

    cls = {"mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM),
           "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM),
           "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM)}[family]
    kw = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
              max_position_embeddings=256, initializer_range=0.1, rope_theta=10000.0)
    kw.update(overrides)
    torch.manual_seed(seed)
    model = cls[1](cls[0](**kw)).eval()
    with torch.no_grad():  # random (not ones) norm scales, so a swapped norm cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """{case: folder} for every HF_CASES entry (plus one sharded copy), built once per session."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for i, (case, (family, kw)) in enumerate(HF_CASES.items()):
        folder = os.path.join(root, case)
        hf_model(family, seed=i, **kw).save_pretrained(folder)
        out[case] = folder
    sharded = os.path.join(root, "mixtral-g2-top2-sharded")
    family, kw = HF_CASES["mixtral-g2-top2"]
    hf_model(family, seed=0, **kw).save_pretrained(sharded, max_shard_size="40KB")
    out["mixtral-g2-top2-sharded"] = sharded
    return out
