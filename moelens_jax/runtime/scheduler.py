"""The resource-aware scheduler (MoE-Lens, DESIGN section 3): a plain object, no I/O.

Its decisions depend only on request lengths, the KV page budget and the token budget, so the
engine executes its plans and the performance model can drive the very same object in
simulation. It tracks KV pages itself (the engine mirrors every allocation in the C++ store,
which double-checks it).

One iteration (`schedule`):

1. every running sequence gets its next decode step if its next KV page can be allocated
   (oldest first); when pages run out, the most recently admitted running sequence is
   preempted: its pages are freed and it goes back to the front of the waiting queue, to be
   recomputed later from its prompt plus the tokens it already generated;
2. waiting sequences are admitted FIFO as whole prefills (no chunked prefill: a prompt is
   processed in one iteration) until the iteration holds `token_budget` tokens or pages run
   out; a prompt longer than the budget is admitted alone;
3. finished sequences free their pages at once (`complete`).

Pages are allocated as tokens arrive, never reserved for prompt + generation up front. A
request whose prompt + max_new_tokens exceeds the whole cache can never finish and is rejected
at `add`.
"""

from __future__ import annotations

import collections
import dataclasses

DEFAULT_TOKEN_BUDGET = 512  # tokens per iteration when neither the caller nor a model sets one


class RequestRejected(ValueError):
    """A request can never be served by this KV cache (or is malformed)."""


@dataclasses.dataclass
class SeqState:
    rid: int
    prompt_len: int
    max_new_tokens: int
    generated: int = 0  # tokens generated so far
    cached: int = 0  # tokens whose K/V are in the cache
    pages: int = 0  # pages held
    preemptions: int = 0

    @property
    def total(self) -> int:
        """Tokens known: prompt + generated."""
        return self.prompt_len + self.generated


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one iteration processes.

    prefill: (rid, n_tokens) - process tokens [0, n_tokens) of the sequence (prompt plus any
      tokens generated before a preemption), then sample one token.
    decode: rids processing their last token (position total - 1), then sampling one.
    preempted: rids whose pages were freed this iteration (before anything ran).
    """

    prefill: tuple[tuple[int, int], ...]
    decode: tuple[int, ...]
    preempted: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.prefill) + len(self.decode)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Admission, paging and preemption for one batch of requests.

    Args:
      num_pages: KV pages in the cache; page_size: tokens per page.
      token_budget: tokens per iteration (n_real) that prefill admission fills up to.
    """

    def __init__(self, num_pages: int, page_size: int, token_budget: int):
        if num_pages < 1 or page_size < 1 or token_budget < 1:
            raise ValueError("num_pages, page_size and token_budget must be positive")
        self.num_pages, self.page_size, self.token_budget = num_pages, page_size, token_budget
        self.free_pages = num_pages
        self.seqs: dict[int, SeqState] = {}
        self.waiting: collections.deque[int] = collections.deque()
        self.running: list[int] = []  # admission order, oldest first (preemption takes the last)
        self.total_preemptions = 0

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def add(self, rid: int, prompt_len: int, max_new_tokens: int) -> None:
        """Queues a request. Raises RequestRejected if it can never be served."""
        if rid in self.seqs:
            raise ValueError(f"request id {rid} already queued")
        if prompt_len < 1:
            raise RequestRejected(f"request {rid}: empty prompt")
        if max_new_tokens < 1:
            raise RequestRejected(f"request {rid}: max_new_tokens must be >= 1, got "
                                  f"{max_new_tokens}")
        # The last generated token is never fed back, so it needs no KV slot.
        need = prompt_len + max_new_tokens - 1
        if need > self.capacity_tokens:
            raise RequestRejected(
                f"request {rid}: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) needs "
                f"{need} KV tokens but the whole cache holds {self.capacity_tokens} "
                f"({self.num_pages} pages of {self.page_size})")
        self.seqs[rid] = SeqState(rid, prompt_len, max_new_tokens)
        self.waiting.append(rid)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def _grow(self, s: SeqState, tokens_after: int) -> int:
        return max(0, self.pages_for(tokens_after) - s.pages)

    def _preempt(self, rid: int) -> None:
        s = self.seqs[rid]
        if self.running and self.running[-1] == rid:
            self.running.pop()  # the usual victim: the most recently admitted
        else:
            self.running.remove(rid)
        self.free_pages += s.pages
        s.pages, s.cached = 0, 0
        s.preemptions += 1
        self.total_preemptions += 1
        self.waiting.appendleft(rid)

    def schedule(self) -> Plan:
        decode, preempted = [], []
        i = 0
        while i < len(self.running):  # oldest first
            rid = self.running[i]
            s = self.seqs[rid]
            need = self._grow(s, s.total)
            preempted_self = False
            while need > self.free_pages:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                if victim == rid:
                    preempted_self = True
                    break
            if preempted_self:
                break  # it preempted itself: everything after it is gone too
            self.free_pages -= need
            s.pages += need
            decode.append(rid)
            i += 1
        budget = self.token_budget - len(decode)
        prefill = []
        while self.waiting:
            s = self.seqs[self.waiting[0]]
            n = s.total
            if n > budget and (prefill or decode):
                break
            need = self._grow(s, n)
            if need > self.free_pages:
                break
            self.waiting.popleft()
            self.free_pages -= need
            s.pages += need
            self.running.append(s.rid)
            prefill.append((s.rid, n))
            budget -= n
        return Plan(tuple(prefill), tuple(decode), tuple(preempted))

    def complete(self, plan: Plan, stopped: set[int] | frozenset[int] = frozenset()) -> set[int]:
        """Records that `plan` ran: each processed sequence cached its tokens and generated one.

        Args:
          stopped: rids that hit a stop token this iteration.

        Returns:
          The rids finished after this iteration (stopped, or at max_new_tokens); their pages
          are freed at once.
        """
        finished = set()
        for rid, n in plan.prefill:
            self.seqs[rid].cached = n
        for rid in plan.decode:
            self.seqs[rid].cached += 1
        for rid in [r for r, _ in plan.prefill] + list(plan.decode):
            s = self.seqs[rid]
            s.generated += 1
            if rid in stopped or s.generated >= s.max_new_tokens:
                self.free_pages += s.pages
                s.pages = 0
                finished.add(rid)
        if finished:  # one pass, not list.remove per sequence (O(n^2) at paper scale)
            self.running = [r for r in self.running if r not in finished]
        return finished

    def used_pages(self) -> int:
        return self.num_pages - self.free_pages


class StaticBatchScheduler(Scheduler):
    """MoE-Lightning's schedule (its Algorithm 2 and `batch_forward_step`) on the same engine.

    Requests are taken longest prompt first; a batch admits each request whose KV reservation
    for prompt + max_new_tokens still fits the cache (and at most `max_batch` of them), deferring
    the others to a later batch. The whole batch is prefilled (in iterations of at most
    `token_budget` tokens), then decoded until every member finishes; nothing is admitted
    mid-batch, and because KV is reserved up front nothing is ever preempted. Pages are still
    allocated as tokens arrive (so the C++ store sees the same calls), but admission is bounded
    by the reservation. Micro-batches (mu) only shape the accelerator pipeline, not the
    schedule, so they do not appear here.

    Args:
      num_pages, page_size, token_budget: as `Scheduler`.
      max_batch: N, the batch size chosen by the policy search (None: what the KV reservation
        allows).
    """

    def __init__(self, num_pages: int, page_size: int, token_budget: int,
                 max_batch: int | None = None):
        super().__init__(num_pages, page_size, token_budget)
        if max_batch is not None and max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.max_batch = max_batch
        self.to_prefill: collections.deque[int] = collections.deque()
        self.batches: list[tuple[int, ...]] = []  # every batch formed, in order
        self.reserved_pages: list[int] = []  # the reservation of each batch

    @property
    def done(self) -> bool:
        return super().done and not self.to_prefill

    def reservation(self, rid: int) -> int:
        s = self.seqs[rid]
        return self.pages_for(s.prompt_len + s.max_new_tokens - 1)

    def _form_batch(self) -> None:
        order = sorted(self.waiting, key=lambda r: -self.seqs[r].prompt_len)  # stable
        chosen, reserved = [], 0
        for rid in order:
            if self.max_batch is not None and len(chosen) == self.max_batch:
                break
            need = self.reservation(rid)
            if reserved + need <= self.num_pages:
                chosen.append(rid)
                reserved += need
        for rid in chosen:
            self.waiting.remove(rid)
        self.to_prefill.extend(chosen)
        self.batches.append(tuple(chosen))
        self.reserved_pages.append(reserved)

    def schedule(self) -> Plan:
        if not self.running and not self.to_prefill:
            self._form_batch()
        if self.to_prefill:  # prefill phase: prefill-only iterations
            prefill, budget = [], self.token_budget
            while self.to_prefill:
                s = self.seqs[self.to_prefill[0]]
                if s.total > budget and prefill:
                    break
                self.to_prefill.popleft()
                need = self._grow(s, s.total)
                self.free_pages -= need
                s.pages += need
                self.running.append(s.rid)
                prefill.append((s.rid, s.total))
                budget -= s.total
            return Plan(tuple(prefill), (), ())
        decode = []
        for rid in self.running:  # decode phase: the whole batch, no admissions
            s = self.seqs[rid]
            need = self._grow(s, s.total)
            self.free_pages -= need
            s.pages += need
            decode.append(rid)
        return Plan((), tuple(decode), ())


POLICIES = ("moe-lens", "moe-lightning")


def make_scheduler(policy: str, num_pages: int, page_size: int, token_budget: int,
                   max_batch: int | None = None) -> Scheduler:
    """The scheduler of a policy: "moe-lens" (continuous admission, paging as tokens arrive)
    or "moe-lightning" (static batches with KV reserved for prompt + generation)."""
    if policy == "moe-lens":
        return Scheduler(num_pages, page_size, token_budget)
    if policy == "moe-lightning":
        return StaticBatchScheduler(num_pages, page_size, token_budget, max_batch)
    raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
