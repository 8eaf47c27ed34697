"""Parity with HF transformers (the external oracle) on tiny random checkpoints, float32."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import transformers

import moelens_jax as mj
from moelens_jax import reference
from tests.conftest import HF_CASES

LOGITS_REL_L2 = 1e-4  # float32 vs float32: only summation order differs
GREEDY_TOKENS = 16


def _hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.mark.parametrize("case", [*HF_CASES, "mixtral-g2-top2-sharded"])
def test_logits_match_hf(hf_checkpoints, case):
    folder = hf_checkpoints[case]
    model = mj.load_model(folder)
    assert model.dtype == "float32"
    tokens = np.random.default_rng(1).integers(0, model.config.vocab_size, (3, 21))
    ours = model.forward(tokens)
    with torch.no_grad():
        theirs = _hf(folder)(torch.tensor(tokens)).logits.numpy()
    reference.assert_close(ours, theirs, rel_l2=LOGITS_REL_L2, name=f"{case} logits")


def test_sharded_checkpoint_really_is_sharded(hf_checkpoints):
    files = os.listdir(hf_checkpoints["mixtral-g2-top2-sharded"])
    assert "model.safetensors.index.json" in files
    assert sum(f.endswith(".safetensors") for f in files) > 1


@pytest.mark.parametrize("case", list(HF_CASES))
def test_greedy_continuation_matches_hf(hf_checkpoints, case):
    folder = hf_checkpoints[case]
    model = mj.load_model(folder)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (1, 5, 17, 9)]
    ours = reference.greedy_generate(model, prompts, GREEDY_TOKENS)
    hf = _hf(folder)
    for prompt, got in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt]), do_sample=False,
                              max_new_tokens=GREEDY_TOKENS, min_new_tokens=GREEDY_TOKENS,
                              eos_token_id=None, pad_token_id=0)
        assert got == out[0, len(prompt):].tolist(), f"{case}: prompt of {len(prompt)} tokens"
