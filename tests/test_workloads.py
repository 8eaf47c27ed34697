"""Workload generators: seeded determinism, published length statistics, JSONL input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moelens_jax import workloads


@pytest.mark.parametrize("name", list(workloads.WORKLOADS))
def test_lengths_follow_the_stated_statistics(name):
    spec = workloads.WORKLOADS[name]
    reqs = workloads.make(name, 2000, vocab_size=1000, seed=3)
    p = np.array([len(r.prompt) for r in reqs])
    assert abs(p.mean() - spec.prompt_mean) <= 0.05 * spec.prompt_mean
    assert p.min() >= spec.min_len and p.max() <= spec.max_len
    assert all(r.max_new_tokens == spec.gen_len for r in reqs)
    assert all(0 <= t < 1000 for r in reqs[:50] for t in r.prompt)
    assert spec.source


def test_seeded_and_scaled():
    a = workloads.make("mtbench", 20, 500, seed=1)
    assert a == workloads.make("mtbench", 20, 500, seed=1)
    assert a != workloads.make("mtbench", 20, 500, seed=2)
    half = workloads.make("rag", 200, 500, seed=0, scale=0.5, gen_len=100)
    assert all(r.max_new_tokens == 50 for r in half)
    assert abs(np.mean([len(r.prompt) for r in half]) - 463) < 0.05 * 463
    with pytest.raises(ValueError, match="unknown workload"):
        workloads.make("sharegpt", 1, 10)


def test_jsonl_prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt_ids": [1, 2, 3], "max_new_tokens": 4}) + "\n\n"
                    + json.dumps({"prompt_ids": [5], "stop_ids": [7]}) + "\n")
    reqs = workloads.load_jsonl(path, max_new_tokens=9)
    assert [(r.prompt, r.max_new_tokens, r.stop_ids) for r in reqs] == [
        ((1, 2, 3), 4, ()), ((5,), 9, (7,))]


@pytest.mark.parametrize("line,msg", [
    ("{not json", "not JSON"),
    ('{"max_new_tokens": 3}', "exactly one of"),
    ('{"prompt_ids": [1, "a"]}', "list of integers"),
    ('{"prompt_ids": [1], "max_new_tokens": 0}', "positive integer"),
    ('{"prompt": "hello"}', "needs a model"),
])
def test_jsonl_errors_name_the_line(tmp_path, line, msg):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt_ids": [1]}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=msg) as e:
        workloads.load_jsonl(path)
    assert "bad.jsonl:2" in str(e.value)
