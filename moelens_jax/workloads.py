"""Seeded synthetic request workloads (token-id prompts with generation lengths).

`synthetic` draws prompt lengths from a log-normal distribution with the requested mean
(sigma = 0.5, clipped to [min_len, 3 x mean]) and fixes the generation length, mimicking the
MTBench setting of the MoE-Lens paper (prompt mean ~98 tokens; generation 32..256). Token ids
are uniform over the vocabulary: with random weights only the lengths matter for throughput.
"""

from __future__ import annotations

import numpy as np

from moelens_jax.runtime.engine import Request


def synthetic(num_requests: int, prompt_mean: float, gen_len: int, vocab_size: int,
              seed: int = 0, sigma: float = 0.5, min_len: int = 4) -> list[Request]:
    """`num_requests` requests with log-normal prompt lengths of mean `prompt_mean`."""
    if num_requests <= 0 or prompt_mean < 1 or gen_len <= 0:
        raise ValueError("num_requests, prompt_mean and gen_len must be positive")
    rng = np.random.default_rng(seed)
    mu = np.log(prompt_mean) - sigma ** 2 / 2  # E[lognormal] = exp(mu + sigma^2/2)
    lens = np.clip(np.rint(rng.lognormal(mu, sigma, num_requests)), min_len,
                   max(min_len, 3 * prompt_mean)).astype(int)
    return [Request(tuple(int(t) for t in rng.integers(0, vocab_size, n)), gen_len)
            for n in lens]
