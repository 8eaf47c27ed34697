"""Token sampling on the host: greedy, or temperature / top-k / top-p with a seed.

Each draw uses its own generator keyed by (seed, request id, step), so the tokens of a request
do not depend on what else shared its batch, on page size, token budget or preemptions.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling parameters {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def sample(logits_v: np.ndarray, params: SamplingParams, rid: int, step: int) -> int:
    """One token from float logits [V]."""
    if params.greedy:
        return int(np.argmax(logits_v))
    z = logits_v.astype(np.float64) / params.temperature
    order = np.argsort(-z, kind="stable")
    if params.top_k:
        order = order[:params.top_k]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = np.searchsorted(np.cumsum(p), params.top_p) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    rng = np.random.default_rng((params.seed, rid, step))
    return int(order[rng.choice(len(order), p=p)])
