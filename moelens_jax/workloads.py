"""Seeded request workloads: the published length statistics, and JSONL files of real prompts.

Synthetic workloads draw token ids uniformly over the vocabulary (with random weights only
the lengths matter for throughput) and lengths from the distributions below. Each states its
source; lengths are in tokens of the paper's tokenizer, so with another tokenizer they are a
length model, not the dataset.

* ``mtbench`` - prompt mean 98 (MoE-Lens's MTBench setup), log-normal (sigma 0.5) clipped to
  [4, 532]; generation 32 by default, the paper sweeps 32/64/128/256. (MoE-Lightning reports
  mean 77 / max 418 with its tokenizer; 532 = 418 * 98 / 77 keeps that max-to-mean ratio.)
* ``rag`` - prompt mean 926, generation 128 (MoE-Lens RAG setting), log-normal sigma 0.25.
* ``helm_reasoning`` - HELM synthetic reasoning as in MoE-Lightning Table 3: prompt mean 242,
  max 256, generation 50; normal (sd 10) clipped to [200, 256].
* ``helm_summarization`` - HELM summarization (MoE-Lightning Table 3): prompt mean 1693,
  max 1984, generation 64; normal (sd 150) clipped to [1200, 1984].
* ``aime`` - long generations as in MoE-Lens's AIME2024 case. The paper does not state its
  lengths (paper-notes.md lists them as unknown); this is a reconstruction: prompt mean 150
  (log-normal sigma 0.3, an AIME problem statement), generation 2048 (a reasoning trace).

`scale` multiplies every length (prompt and generation, at least 1) so a workload keeps its
shape on a small machine; say so when reporting scaled runs.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from moelens_jax.runtime.requests import Request


@dataclasses.dataclass(frozen=True)
class WorkloadSpec:
    name: str
    prompt_mean: float
    gen_len: int
    dist: str  # "lognormal" or "normal"
    spread: float  # sigma of the log for lognormal; sd for normal
    min_len: int
    max_len: int
    source: str


WORKLOADS: dict[str, WorkloadSpec] = {
    "mtbench": WorkloadSpec("mtbench", 98, 32, "lognormal", 0.5, 4, 532,
                            "MoE-Lens MTBench setup (p~98); max/mean ratio of MoE-Lightning's "
                            "77/418"),
    "rag": WorkloadSpec("rag", 926, 128, "lognormal", 0.25, 16, 4096,
                        "MoE-Lens RAG setting (p~926, g=128)"),
    "helm_reasoning": WorkloadSpec("helm_reasoning", 242, 50, "normal", 10, 200, 256,
                                   "MoE-Lightning Table 3: HELM synthetic reasoning 242/256, "
                                   "g=50"),
    "helm_summarization": WorkloadSpec("helm_summarization", 1693, 64, "normal", 150, 1200,
                                       1984, "MoE-Lightning Table 3: HELM summarization "
                                       "1693/1984, g=64"),
    "aime": WorkloadSpec("aime", 150, 2048, "lognormal", 0.3, 16, 1024,
                         "reconstruction: AIME-like long generation (paper gives no lengths)"),
}


def _lengths(rng, spec: WorkloadSpec, n: int) -> np.ndarray:
    if spec.dist == "lognormal":
        mu = np.log(spec.prompt_mean) - spec.spread ** 2 / 2  # E[lognormal] = exp(mu + s^2/2)
        x = rng.lognormal(mu, spec.spread, n)
    else:
        x = rng.normal(spec.prompt_mean, spec.spread, n)
    return np.clip(np.rint(x), spec.min_len, spec.max_len).astype(int)


def make(name: str, num_requests: int, vocab_size: int, seed: int = 0,
         gen_len: int | None = None, scale: float = 1.0) -> list[Request]:
    """`num_requests` seeded requests of the named workload (see the module docstring).

    Args:
      gen_len: override the workload's generation length (e.g. MTBench's 64/128/256).
      scale: multiply prompt and generation lengths (>= 1 token each).
    """
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    if num_requests <= 0 or scale <= 0:
        raise ValueError("num_requests and scale must be positive")
    spec = WORKLOADS[name]
    rng = np.random.default_rng(seed)
    lens = np.maximum(1, np.rint(_lengths(rng, spec, num_requests) * scale)).astype(int)
    g = max(1, round((gen_len or spec.gen_len) * scale))
    return [Request(tuple(int(t) for t in rng.integers(0, vocab_size, n)), g) for n in lens]


def synthetic(num_requests: int, prompt_mean: float, gen_len: int, vocab_size: int,
              seed: int = 0, sigma: float = 0.5, min_len: int = 4) -> list[Request]:
    """`num_requests` requests with log-normal prompt lengths of mean `prompt_mean` (sigma
    0.5, clipped to [min_len, 3 x mean]) and a fixed generation length: an MTBench-like
    length model at any mean."""
    if num_requests <= 0 or prompt_mean < 1 or gen_len <= 0:
        raise ValueError("num_requests, prompt_mean and gen_len must be positive")
    spec = WorkloadSpec("synthetic", prompt_mean, gen_len, "lognormal", sigma, min_len,
                        max(min_len, int(3 * prompt_mean)), "")
    rng = np.random.default_rng(seed)
    lens = _lengths(rng, spec, num_requests)
    return [Request(tuple(int(t) for t in rng.integers(0, vocab_size, n)), gen_len)
            for n in lens]


def load_jsonl(path: str | os.PathLike, model=None, max_new_tokens: int = 128) -> list[Request]:
    """Requests from a JSONL file, one object per line:

        {"prompt": "text ...", "max_new_tokens": 64}      (text: needs `model`'s tokenizer)
        {"prompt_ids": [1, 2, 3], "max_new_tokens": 64, "stop_ids": [2]}

    `max_new_tokens` defaults to the argument. Blank lines are skipped; anything else
    malformed raises ValueError naming the line.
    """
    reqs = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not JSON ({e.msg})") from None
            if not isinstance(obj, dict) or ("prompt" in obj) == ("prompt_ids" in obj):
                raise ValueError(f"{where}: needs exactly one of 'prompt' (text) or "
                                 "'prompt_ids' (token ids)")
            n = obj.get("max_new_tokens", max_new_tokens)
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"{where}: max_new_tokens must be a positive integer, got {n!r}")
            stop = tuple(obj.get("stop_ids", ()))
            if "prompt" in obj:
                if model is None:
                    raise ValueError(f"{where}: a text prompt needs a model with a tokenizer")
                ids = tuple(model.encode(str(obj["prompt"])))
            else:
                ids = obj["prompt_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise ValueError(f"{where}: prompt_ids must be a list of integers")
                ids = tuple(ids)
            reqs.append(Request(ids, n, stop))
    if not reqs:
        raise ValueError(f"{path}: no requests")
    return reqs
