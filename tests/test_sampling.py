"""Sampling against the exact filtered distribution: many seeded draws of `sampling.sample`
must match softmax(logits / T) cut to the top k and then to the smallest prefix whose mass
reaches top_p, renormalised (no token outside that set may ever appear; total variation and
the chi-square statistic stay within bounds derived from the number of draws)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from moelens_jax.runtime.sampling import SamplingParams, sample

DRAWS = 20_000


def exact_distribution(logits: np.ndarray, p: SamplingParams) -> np.ndarray:
    """The distribution a draw must follow, written the slow way: a loop over tokens by
    decreasing probability (ties by token id)."""
    z = logits.astype(np.float64) / p.temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    order = sorted(range(len(z)), key=lambda t: (-probs[t], t))
    if p.top_k:
        order = order[:p.top_k]
    mass = sum(probs[t] for t in order)
    kept, cum = [], 0.0
    for t in order:  # the smallest prefix whose renormalised mass reaches top_p
        kept.append(t)
        cum += probs[t] / mass
        if p.top_p < 1.0 and cum >= p.top_p:
            break
    out = np.zeros(len(z))
    out[kept] = probs[kept]
    return out / out.sum()


def _logits(seed: int, vocab: int = 40) -> np.ndarray:
    """Distinct, evenly spaced logits in a random order (no ties: every cut is unambiguous)."""
    return np.random.default_rng(seed).permutation(np.linspace(-4.0, 2.0, vocab))


CASES = [
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.5, seed=2),
    SamplingParams(temperature=2.0, top_k=5, seed=3),
    SamplingParams(temperature=1.0, top_p=0.6, seed=4),
    SamplingParams(temperature=0.7, top_p=0.9, seed=5),
    SamplingParams(temperature=1.3, top_k=12, top_p=0.8, seed=6),
    SamplingParams(temperature=1.0, top_k=1, seed=7),
]


@pytest.mark.parametrize("params", CASES, ids=lambda p: f"T{p.temperature}-k{p.top_k}-p"
                         f"{p.top_p}")
def test_draws_follow_the_exact_filtered_distribution(params):
    logits = _logits(params.seed)
    want = exact_distribution(logits, params)
    counts = np.zeros(len(logits))
    for step in range(DRAWS):
        counts[sample(logits, params, rid=17, step=step)] += 1
    outside = counts[want == 0].sum()
    assert outside == 0, f"{outside:.0f} draws of tokens the filter removes"
    support = want > 0
    freq = counts / DRAWS
    tv = 0.5 * np.abs(freq - want).sum()
    # E[TV] <= 0.5 * sum sqrt(p (1-p) / n); 3x that (and a floor) is far outside seeded noise
    # but far below what a wrong temperature or a one-token-off cut moves it by.
    bound = 3 * 0.5 * np.sqrt(want * (1 - want) / DRAWS).sum() + 1e-3
    assert tv <= bound, (tv, bound)
    df = int(support.sum()) - 1
    if df:
        chi2 = float((((counts - DRAWS * want) ** 2)[support] / (DRAWS * want[support])).sum())
        assert chi2 <= df + 6 * math.sqrt(2 * df), (chi2, df)  # mean df, sd sqrt(2 df)
    else:
        assert counts[support].sum() == DRAWS


def test_filter_boundaries_are_exact():
    """top_p keeps the smallest prefix reaching top_p: probabilities 0.5, 0.3, 0.2 with top_p
    0.79 keep two tokens (0.5 + 0.3 reaches it), 0.81 keeps three, 0.5 keeps one."""
    logits = np.log(np.array([0.5, 0.3, 0.2]))
    for top_p, kept in ((0.5, {0}), (0.79, {0, 1}), (0.81, {0, 1, 2})):
        p = SamplingParams(temperature=1.0, top_p=top_p, seed=0)
        seen = {sample(logits, p, rid=0, step=s) for s in range(400)}
        assert seen == kept, (top_p, seen)
        assert set(np.flatnonzero(exact_distribution(logits, p))) == kept


def test_draws_depend_on_seed_request_and_step_only():
    logits = _logits(0)
    p = SamplingParams(temperature=1.0, seed=3)
    a = [sample(logits, p, rid=5, step=s) for s in range(64)]
    assert a == [sample(logits.copy(), p, rid=5, step=s) for s in range(64)]
    assert a != [sample(logits, p, rid=6, step=s) for s in range(64)]
    assert a != [sample(logits, SamplingParams(temperature=1.0, seed=4), rid=5, step=s)
                 for s in range(64)]
