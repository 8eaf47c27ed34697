"""The scheduler alone: paging, admission, preemption and rejection, driven in simulation."""

from __future__ import annotations

import numpy as np
import pytest

from moelens_jax.runtime import RequestRejected, Scheduler
from moelens_jax.runtime.scheduler import StaticBatchScheduler, make_scheduler


def drive(sched: Scheduler, max_iters: int = 10_000):
    """Runs a scheduler to completion with no model: every processed sequence emits a token."""
    plans = []
    while not sched.done:
        plan = sched.schedule()
        assert not plan.empty, "no progress"
        plans.append(plan)
        assert 0 <= sched.free_pages <= sched.num_pages
        sched.complete(plan)
        assert len(plans) < max_iters
    return plans


def test_pages_follow_tokens_and_are_never_reserved_up_front():
    s = Scheduler(num_pages=100, page_size=16, token_budget=1000)
    s.add(0, prompt_len=20, max_new_tokens=100)
    plan = s.schedule()
    assert plan.prefill == ((0, 20),) and s.used_pages() == 2  # 20 tokens, not 20 + 100
    s.complete(plan)
    for _ in range(12):  # decode up to 32 cached tokens: still 2 pages
        s.complete(s.schedule())
    assert s.seqs[0].cached == 32 and s.used_pages() == 2
    s.complete(s.schedule())
    assert s.used_pages() == 3


def test_token_budget_and_fifo_admission():
    s = Scheduler(num_pages=1000, page_size=16, token_budget=100)
    for rid, n in enumerate([40, 50, 30, 5]):
        s.add(rid, n, 4)
    plan = s.schedule()
    assert [r for r, _ in plan.prefill] == [0, 1]  # 90 tokens; 30 more would exceed 100
    s.complete(plan)
    plan = s.schedule()
    assert plan.decode == (0, 1) and [r for r, _ in plan.prefill] == [2, 3]
    s.complete(plan)


def test_prompt_longer_than_budget_is_admitted_alone():
    s = Scheduler(num_pages=1000, page_size=16, token_budget=10)
    s.add(0, 50, 2)
    s.add(1, 3, 2)
    plan = s.schedule()
    assert plan.prefill == ((0, 50),)


def test_preemption_frees_the_most_recent_and_recomputes():
    s = Scheduler(num_pages=4, page_size=4, token_budget=100)
    s.add(0, 4, 8)  # 1 page now, 3 pages at the end
    s.add(1, 4, 8)
    s.add(2, 4, 8)
    plans = drive(s)
    assert s.total_preemptions > 0
    assert any(p.preempted for p in plans)
    victims = [v for p in plans for v in p.preempted]
    assert 0 not in victims  # the oldest always progresses
    # a preempted sequence is re-prefilled with prompt + everything generated so far
    for p in plans:
        for rid, n in p.prefill:
            assert n >= s.seqs[rid].prompt_len
    assert all(st.generated == 8 for st in s.seqs.values())
    assert s.free_pages == s.num_pages


def test_rejects_what_can_never_fit():
    s = Scheduler(num_pages=4, page_size=4, token_budget=100)
    s.add(0, 10, 7)  # 16 KV tokens: exactly the cache
    with pytest.raises(RequestRejected, match="needs 17 KV tokens but the whole cache holds 16"):
        s.add(1, 10, 8)
    with pytest.raises(RequestRejected, match="empty prompt"):
        s.add(2, 0, 3)
    with pytest.raises(RequestRejected, match="max_new_tokens must be >= 1"):
        s.add(3, 2, 0)
    drive(s)


@pytest.mark.parametrize("seed", range(5))
def test_random_workloads_finish_with_consistent_accounting(seed):
    rng = np.random.default_rng(seed)
    pages, ps = int(rng.integers(8, 40)), int(rng.choice([1, 4, 16]))
    s = Scheduler(num_pages=pages, page_size=ps, token_budget=int(rng.integers(1, 200)))
    for rid in range(40):
        p, g = int(rng.integers(1, 60)), int(rng.integers(1, 40))
        try:
            s.add(rid, p, g)
        except RequestRejected:
            assert p + g - 1 > pages * ps
    plans = drive(s)
    for plan in plans:
        assert len(set(plan.decode)) == len(plan.decode)
    assert all(st.generated == st.max_new_tokens for st in s.seqs.values())
    assert s.free_pages == pages


@pytest.mark.parametrize("seed", range(6))
def test_static_batches_follow_moe_lightning_packing(seed):
    """Algorithm 2: longest prompts first, each batch's KV reservation for prompt +
    generation fits the cache, nothing admitted mid-batch, whole batch prefilled before any
    decode, never a preemption; all requests finish with every page returned."""
    rng = np.random.default_rng(seed)
    pages, ps = int(rng.integers(10, 40)), int(rng.choice([1, 4, 16]))
    max_batch = None if seed % 2 else int(rng.integers(1, 6))
    s = StaticBatchScheduler(pages, ps, int(rng.integers(8, 200)), max_batch=max_batch)
    lens = {}
    for rid in range(30):
        p, g = int(rng.integers(1, 60)), int(rng.integers(1, 30))
        try:
            s.add(rid, p, g)
            lens[rid] = (p, g)
        except RequestRejected:
            assert p + g - 1 > pages * ps
    plans = drive(s)
    assert s.total_preemptions == 0 and s.free_pages == pages
    assert sorted(r for b in s.batches for r in b) == sorted(lens)
    for batch, reserved in zip(s.batches, s.reserved_pages, strict=True):
        assert reserved == sum(-(-(lens[r][0] + lens[r][1] - 1) // ps) for r in batch)
        assert reserved <= pages and (max_batch is None or len(batch) <= max_batch)
        prompts = [lens[r][0] for r in batch]
        assert prompts == sorted(prompts, reverse=True)
    # Plans touch one batch at a time (batch index never goes back), and within a batch all
    # prefill-only plans come before the decode-only plans.
    batch_of = {r: k for k, b in enumerate(s.batches) for r in b}
    last_batch, decoding = 0, False
    for plan in plans:
        rids = [r for r, _ in plan.prefill] + list(plan.decode)
        ks = {batch_of[r] for r in rids}
        assert len(ks) == 1, "a plan mixes batches"
        k = ks.pop()
        assert k >= last_batch, "a finished batch came back"
        if k > last_batch:
            last_batch, decoding = k, False
        assert not (plan.prefill and plan.decode)
        if plan.decode:
            decoding = True
        else:
            assert not decoding, "prefill after the batch started decoding"


def test_make_scheduler_policies():
    assert type(make_scheduler("moe-lens", 4, 16, 64)) is Scheduler
    assert type(make_scheduler("moe-lightning", 4, 16, 64)) is StaticBatchScheduler
    with pytest.raises(ValueError, match="unknown policy"):
        make_scheduler("vllm", 4, 16, 64)


@pytest.mark.parametrize("seed", range(20))
def test_invariants_on_random_workloads(seed):
    """Every iteration of random workloads (random stops too): tokens <= budget unless one
    prompt alone exceeds it; pages held == pages taken <= pages, each running sequence holding
    exactly the pages its tokens need; first admissions FIFO; preemption takes the most
    recently admitted first; every request finishes once."""
    rng = np.random.default_rng(100 + seed)
    pages, ps = int(rng.integers(4, 60)), int(rng.choice([1, 2, 4, 16]))
    budget = int(rng.integers(1, 300))
    s = Scheduler(num_pages=pages, page_size=ps, token_budget=budget)
    added = []
    for rid in range(int(rng.integers(1, 60))):
        try:
            s.add(rid, int(rng.integers(1, 80)), int(rng.integers(1, 50)))
            added.append(rid)
        except RequestRejected:
            pass
    first_admitted, finished = [], []
    for _ in range(20_000):
        if s.done:
            break
        running_before = list(s.running)
        plan = s.schedule()
        assert not plan.empty
        n_pre = [n for _, n in plan.prefill]
        alone = len(plan.prefill) == 1 and not plan.decode and n_pre[0] > budget
        assert plan.num_tokens <= budget or alone, (plan, budget)
        k = len(plan.preempted)
        assert list(plan.preempted) == running_before[::-1][:k]  # newest first
        for rid, _ in plan.prefill:
            if rid not in first_admitted:
                first_admitted.append(rid)
        held = sum(st.pages for st in s.seqs.values())
        assert held == pages - s.free_pages and 0 <= s.free_pages <= pages
        stopped = {r for r in list(plan.decode) + [r for r, _ in plan.prefill]
                   if rng.random() < 0.05}
        done = s.complete(plan, stopped)
        finished += sorted(done)
        for rid in s.running:  # a running sequence holds the pages of its cached tokens
            st = s.seqs[rid]
            assert st.pages == s.pages_for(st.cached) and st.cached == st.total - 1
    assert s.done and s.free_pages == pages
    assert first_admitted == sorted(first_admitted)  # FIFO
    assert sorted(finished) == added  # each exactly once
