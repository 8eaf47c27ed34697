"""The engine: offline batch generation driven by the resource-aware scheduler.

Each iteration runs the scheduler's plan as one pass over all layers, every layer in the three
stages of DESIGN section 3:

* GA (jitted, default device): RMSNorm, QKV, RoPE for every token of the iteration, and causal
  attention of prefill tokens within their own sequence (block-sparse over 64-row tiles: only
  tile pairs that share a sequence are computed, merged by log-sum-exp);
* C (host): the new K/V of every token are appended to the paged C++ store (an eager host call,
  so JAX can never drop or repeat it), then decode tokens attend over their cached tokens with
  the C++ kernel (`cpu_decode_attention`, jitted on the CPU device: XLA FFI there);
* GB (jitted, default device): O projection, residual, norm, router, experts over prefill and
  decode tokens together, residual.

Logits are computed for the last token of each sequence only. Token counts are padded to
power-of-two buckets so a run compiles a handful of shapes; padding rows are masked out of
prefill attention and point decode attention at a one-token pad sequence.

Weights stay on the host: the `WeightMover` streams each layer's contiguous buffer into a
device window of `device_weight_layers` layers on its own thread while earlier layers compute
(optionally capped to a link bandwidth); only embedding, final norm and lm_head stay resident.

Status: serial mode only (stages run one after another; the right default on a CPU-only
backend, where all stages share the cores). VSLPipe overlap is not implemented yet.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moelens_jax.kv import PagedKVStore, cpu_decode_attention
from moelens_jax.model import transformer
from moelens_jax.model.model import Model
from moelens_jax.model.weights import ModelWeights
from moelens_jax.runtime.mover import WeightMover, resident_bytes
from moelens_jax.runtime.sampling import SamplingParams, sample
from moelens_jax.runtime.scheduler import Plan, RequestRejected, Scheduler

PAD_SEQ = -1  # a one-token sequence in the store that padding rows of decode attention read


@dataclasses.dataclass(frozen=True)
class Request:
    """A prompt (token ids, or text when the model has a tokenizer) and how many tokens to
    generate."""

    prompt: tuple[int, ...] | str
    max_new_tokens: int
    stop_ids: tuple[int, ...] = ()


@dataclasses.dataclass
class GenerationResult:
    index: int  # position in the request list
    tokens: list[int]  # generated token ids (prompt excluded)
    finish_reason: str  # "length", "stop" or "rejected"
    prompt_len: int
    error: str | None = None
    preemptions: int = 0
    text: str | None = None  # decoded output, for text prompts


@dataclasses.dataclass
class RunStats:
    iterations: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    processed_tokens: int = 0  # tokens run through the layers (recomputation included)
    wall_s: float = 0.0
    kv_peak_pages: int = 0
    kv_pages: int = 0
    h2d_bytes: int = 0  # weight bytes streamed host -> device in this run
    h2d_gb_per_s: float | None = None  # achieved over the link's busy time (engine lifetime)
    per_iteration: list[dict] = dataclasses.field(default_factory=list)

    @property
    def kv_peak_fraction(self) -> float:
        return self.kv_peak_pages / max(self.kv_pages, 1)

    @property
    def mean_tokens_per_iteration(self) -> float:
        return self.processed_tokens / max(self.iterations, 1)

    def chrome_trace(self) -> dict:
        """The run as a Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing):
        one slice per iteration plus counters for tokens and KV pages."""
        events = []
        for i, it in enumerate(self.per_iteration):
            ts = it["start_s"] * 1e6
            events.append({"name": f"iteration {i}", "ph": "X", "ts": ts,
                           "dur": it["wall_s"] * 1e6, "pid": 0, "tid": 0,
                           "args": {k: v for k, v in it.items()
                                    if k not in ("start_s", "wall_s")}})
            events.append({"name": "tokens", "ph": "C", "ts": ts, "pid": 0,
                           "args": {"prefill": it["prefill_tokens"],
                                    "decode": it["decode_tokens"]}})
            events.append({"name": "kv_pages", "ph": "C", "ts": ts, "pid": 0,
                           "args": {"used": it["pages_used"], "free": it["pages_free"]}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}


def _bucket(n: int, minimum: int = 8) -> int:
    return max(minimum, 1 << (max(int(n), 1) - 1).bit_length())


TILE = 64  # rows per tile of the block-sparse prefill attention


def prefill_tile_pairs(seg: np.ndarray, n_pre: int, n_rows: int, tile: int = TILE) -> np.ndarray:
    """(query tile, key tile) pairs whose rows can attend (same segment, causal), padded.

    Prefill segments are contiguous runs of rows, so query tile i needs key tiles from the
    tile holding its first row's segment start up to i. Returns int32 [P_bucket, 3]: query
    tile, key tile, and 1 for a real pair / 0 for bucket padding (ignored by the attention).
    """
    pairs = []
    starts = np.zeros(n_pre, np.int64)
    if n_pre:
        new_seg = np.r_[True, seg[1:n_pre] != seg[:n_pre - 1]]
        starts = np.maximum.accumulate(np.where(new_seg, np.arange(n_pre), 0))
    for i in range(-(-n_pre // tile)):
        for j in range(starts[i * tile] // tile, i + 1):
            pairs.append((i, j, 1))
    pairs += [(0, 0, 0)] * (_bucket(len(pairs), 1) - len(pairs))
    return np.asarray(pairs, np.int32).reshape(-1, 3)


def tiled_prefill_attention(q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3):
    """`reference.segment_causal_attention` computed only on the listed tile pairs, merged by
    LSE.

    Costs O(pairs * TILE^2) instead of O(n^2): an iteration of many short prompts touches a
    thin band around the diagonal.
    """
    n, hq, d = q_nhd.shape
    g = k_ngd.shape[1]
    s = hq // g
    nt = n // TILE
    qt = q_nhd.astype(jnp.float32).reshape(nt, TILE, g, s, d)
    kt = k_ngd.astype(jnp.float32).reshape(nt, TILE, g, d)
    vt = v_ngd.astype(jnp.float32).reshape(nt, TILE, g, d)
    segt, post = seg_n.reshape(nt, TILE), pos_n.reshape(nt, TILE)
    qi, kj, real = pairs_p3[:, 0], pairs_p3[:, 1], pairs_p3[:, 2] > 0
    logits = jnp.einsum("ptgsd,pugd->pgstu", qt[qi], kt[kj]) * d ** -0.5
    sq, sk, pq, pk = segt[qi], segt[kj], post[qi], post[kj]
    valid = ((sq[:, :, None] == sk[:, None, :]) & (sq[:, :, None] >= 0)
             & (pk[:, None, :] <= pq[:, :, None]) & real[:, None, None])[:, None, None]
    logits = jnp.where(valid, logits, -1e30)
    m = jnp.max(logits, axis=-1)  # [P, g, s, T]
    p = jnp.where(valid, jnp.exp(logits - m[..., None]), 0.0)
    l_ = jnp.sum(p, axis=-1)
    o = jnp.einsum("pgstu,pugd->pgstd", p, vt[kj])
    big_m = jax.ops.segment_max(m, qi, num_segments=nt)  # [nt, g, s, T]
    w = jnp.exp(m - big_m[qi])
    den = jax.ops.segment_sum(l_ * w, qi, num_segments=nt)
    num = jax.ops.segment_sum(o * w[..., None], qi, num_segments=nt)
    out = jnp.where(den[..., None] > 0, num / jnp.maximum(den, 1e-30)[..., None], 0.0)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(n, hq, d)


@dataclasses.dataclass(frozen=True)
class _StageFunctions:
    embed: object
    ga: object
    gb: object
    prefill_attn: object
    place: object
    logits: object


@functools.lru_cache(maxsize=16)
def _stage_functions(cfg) -> _StageFunctions:
    """Jitted device stages, shared by every engine of one config (compiles are reused)."""
    return _StageFunctions(
        embed=jax.jit(transformer.embed),
        ga=jax.jit(functools.partial(transformer.pre_attention, cfg)),
        gb=jax.jit(functools.partial(transformer.post_attention, cfg)),
        prefill_attn=jax.jit(tiled_prefill_attention),
        place=jax.jit(lambda a, b, start: jax.lax.dynamic_update_slice(a, b, (start, 0, 0))),
        logits=jax.jit(lambda w, x, idx: transformer.logits(cfg, w, x[idx])))


class Engine:
    """Offline batch generation with host KV paging (MoE-Lens scheduling).

    Args:
      model: a loaded `Model`.
      kv_cache_bytes: host memory for the paged KV cache.
      page_size: tokens per KV page.
      token_budget: tokens per iteration that prefill admission fills up to (n_real); default
        512 until the performance model supplies it.
      kv_dtype: KV storage dtype (default: the model's dtype).
      policy: "moe-lens" (the only policy implemented so far).
      device_weight_layers: decoder layers resident on the device at once (2 = double buffer).
      h2d_limit_gb_per_s: optional cap on the host-to-device weight stream (research knob).
      device_memory_bytes: optional device-memory cap; the weight window plus resident
        embedding/lm_head must fit under it.
    """

    def __init__(self, model: Model, *, kv_cache_bytes: int, page_size: int = 16,
                 device_weight_layers: int = 2, token_budget: int | None = None,
                 kv_dtype: str | None = None, policy: str = "moe-lens",
                 h2d_limit_gb_per_s: float | None = None,
                 device_memory_bytes: int | None = None):
        if policy != "moe-lens":
            raise ValueError(f"unknown policy {policy!r}; implemented: 'moe-lens'")
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.page_size = page_size
        self.token_budget = token_budget or 512
        if self.token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        self.store = PagedKVStore.for_model(cfg, kv_cache_bytes, page_size=page_size,
                                            dtype=kv_dtype or model.dtype)
        if self.store.num_pages < 2:
            raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds {self.store.num_pages} "
                             f"page(s) of {self.store.page_bytes} bytes; at least 2 are needed "
                             "(one is reserved for padding)")
        zero = np.zeros((1, cfg.num_kv_heads, cfg.head_dim), np.float32)
        self.store.add_sequence(PAD_SEQ)
        for layer in range(cfg.num_layers):
            self.store.append([PAD_SEQ], [1], layer, zero, zero)
        self.mode = "serial"
        self.mover = WeightMover(model, depth=device_weight_layers,
                                 h2d_limit_gb_per_s=h2d_limit_gb_per_s)
        self.h2d_limit_gb_per_s = h2d_limit_gb_per_s
        self.device_memory_bytes = device_memory_bytes
        self.device_weight_bytes = resident_bytes(model) + self.mover.device_bytes()
        if device_memory_bytes is not None and self.device_weight_bytes > device_memory_bytes:
            raise ValueError(
                f"device_memory_bytes={device_memory_bytes} is too small: the weight window of "
                f"{self.mover.depth} layer(s) x {self.mover.layer_bytes} B plus resident "
                f"embedding/lm_head needs {self.device_weight_bytes} B")
        w = model.weights
        self._weights = jax.device_put(ModelWeights(embed=w.embed, layers=(),
                                                    final_norm=w.final_norm, lm_head=w.lm_head))
        self._fn = _stage_functions(cfg)
        self._decode_attn = jax.jit(
            lambda q, ids, layer: cpu_decode_attention(self.store, q, ids, layer))
        self.stats = RunStats()

    @property
    def kv_pages(self) -> int:
        """Pages available to requests (one is reserved for the padding sequence)."""
        return self.store.num_pages - 1

    def generate(self, requests: Sequence[Request | Sequence[int]],
                 sampling: SamplingParams | None = None, max_new_tokens: int | None = None, *,
                 on_finish: Callable[[GenerationResult], None] | None = None,
                 progress: bool = False) -> list[GenerationResult]:
        """Generates for every request; results come back in request order.

        Requests that can never be served (empty prompt, bad token ids, max_new_tokens < 1,
        prompt + max_new_tokens beyond the whole KV cache) get finish_reason "rejected" with an
        error message; the rest of the batch completes.

        Args:
          requests: `Request`s, token-id sequences or strings (then `max_new_tokens` applies,
            default 16). Text needs a model loaded with a tokenizer.json; its results carry the
            decoded `text` too.
          sampling: greedy by default.
          on_finish: called with each result as soon as its request finishes (or is rejected),
            e.g. to stream results to disk.
          progress: show a progress bar (requests done, generated tokens/s, KV use).
        """
        self._sampling = sampling or SamplingParams()
        reqs = [r if isinstance(r, Request) else
                Request(r if isinstance(r, str) else tuple(r), max_new_tokens or 16)
                for r in requests]
        is_text = [isinstance(r.prompt, str) for r in reqs]
        if any(is_text):
            reqs = [dataclasses.replace(r, prompt=tuple(self.model.encode(r.prompt)))
                    if t else r for r, t in zip(reqs, is_text, strict=True)]
        def notify(res: GenerationResult) -> None:
            if is_text[res.index] and res.tokens:
                res.text = self.model.decode(res.tokens)
            if on_finish is not None:
                on_finish(res)

        sched = Scheduler(self.kv_pages, self.page_size, self.token_budget)
        results: list[GenerationResult | None] = [None] * len(reqs)
        tokens: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            try:
                bad = [t for t in r.prompt if not 0 <= int(t) < self.cfg.vocab_size]
                if bad:
                    raise RequestRejected(f"request {i}: token id {bad[0]} is outside the "
                                          f"vocabulary [0, {self.cfg.vocab_size})")
                sched.add(i, len(r.prompt), r.max_new_tokens)
                tokens[i] = [int(t) for t in r.prompt]
            except RequestRejected as e:
                results[i] = GenerationResult(i, [], "rejected", len(r.prompt), error=str(e))
                notify(results[i])
        stats = RunStats(kv_pages=self.kv_pages,
                         prompt_tokens=sum(len(reqs[i].prompt) for i in tokens))
        self.stats = stats
        bar = tqdm(total=len(tokens), disable=not progress, unit="req", desc="generate")
        h2d_before = self.mover.bytes_moved
        t0 = time.perf_counter()
        try:
            while not sched.done:
                self._step(sched, reqs, tokens, results, stats, notify, t0)
                bar.update(len(stats.per_iteration[-1]["finished"]))
                rate = stats.generated_tokens / (time.perf_counter() - t0)
                bar.set_postfix(gen_tok_s=f"{rate:.1f}",
                                kv=f"{sched.used_pages() / self.kv_pages:.0%}", refresh=False)
        finally:
            bar.close()
            for rid in tokens:  # an interrupted run must not leak pages
                if self.store.has_sequence(rid):
                    self.store.free_sequence(rid)
        stats.wall_s = time.perf_counter() - t0
        stats.preemptions = sched.total_preemptions
        stats.h2d_bytes = self.mover.bytes_moved - h2d_before
        stats.h2d_gb_per_s = self.mover.h2d_gb_per_s
        assert self.store.free_pages() == self.kv_pages, "KV pages leaked"
        return results

    def _step(self, sched, reqs, tokens, results, stats, notify, t0) -> None:
        """Schedules and runs one iteration, then finishes what is done."""
        t_start = time.perf_counter()
        plan = sched.schedule()
        for rid in plan.preempted:
            self.store.free_sequence(rid)
        if plan.empty:
            raise RuntimeError("scheduler made no progress (internal error)")
        for rid, _ in plan.prefill:
            self.store.add_sequence(rid)
        pages_used = sched.used_pages()
        stats.kv_peak_pages = max(stats.kv_peak_pages, pages_used)
        new = self._run_iteration(plan, tokens)
        stopped = set()
        for rid, tok in new.items():
            tokens[rid].append(tok)
            if tok in reqs[rid].stop_ids:
                stopped.add(rid)
        finished = sched.complete(plan, stopped)
        stats.generated_tokens += len(new)
        for rid in sorted(finished):
            self.store.free_sequence(rid)
            s = sched.seqs[rid]
            results[rid] = GenerationResult(
                rid, tokens[rid][s.prompt_len:], "stop" if rid in stopped else "length",
                s.prompt_len, preemptions=s.preemptions)
            notify(results[rid])
        stats.iterations += 1
        stats.processed_tokens += plan.num_tokens
        t_end = time.perf_counter()
        stats.per_iteration.append({
            "start_s": t_start - t0, "wall_s": t_end - t_start,
            "prefill_tokens": sum(n for _, n in plan.prefill), "decode_tokens": len(plan.decode),
            "preempted": list(plan.preempted), "finished": sorted(finished),
            "pages_used": pages_used, "pages_free": self.kv_pages - pages_used})

    def _run_iteration(self, plan: Plan, tokens: dict[int, list[int]]) -> dict[int, int]:
        """Runs one plan through all layers; returns the sampled token of each sequence."""
        ids, counts, rows, pos, seg, last = [], [], [], [], [], []
        for k, (rid, n) in enumerate(plan.prefill):
            ids.append(rid)
            counts.append(n)
            rows += tokens[rid][:n]
            pos += range(n)
            seg += [k] * n
            last.append(len(rows) - 1)
        n_pre = len(rows)
        for rid in plan.decode:
            ids.append(rid)
            counts.append(1)
            rows.append(tokens[rid][-1])
            pos.append(len(tokens[rid]) - 1)
            seg.append(-1)
            last.append(len(rows) - 1)
        n_dec = len(plan.decode)
        n_real = len(rows)
        dec_b = _bucket(n_dec) if n_dec else 0
        nb = _bucket(n_pre + dec_b, TILE)
        pad = nb - n_real
        tok = jnp.asarray(np.array(rows + [0] * pad, np.int32))
        pos_a = jnp.asarray(np.array(pos + [0] * pad, np.int32))
        seg_a = jnp.asarray(np.array(seg + [-1] * pad, np.int32))
        dec_ids = jnp.asarray(np.array(list(plan.decode) + [PAD_SEQ] * (dec_b - n_dec), np.int32))
        ids_np, counts_np = np.array(ids, np.int64), np.array(counts, np.int32)
        pairs = jnp.asarray(prefill_tile_pairs(np.array(seg, np.int64), n_pre, nb))

        x = self._fn.embed(self._weights, tok)
        for layer in range(self.cfg.num_layers):
            lw = self.mover.get(layer)
            q, k, v = self._fn.ga(lw, x, pos_a)
            # Slice on the host: a device-side k[:n_real] would dispatch an op per layer.
            self.store.append(ids_np, counts_np, layer, np.asarray(k)[:n_real],
                              np.asarray(v)[:n_real])
            attn = self._fn.prefill_attn(q, k, v, seg_a, pos_a, pairs)
            if n_dec:
                dec = self._decode_attn(q[n_pre:n_pre + dec_b], dec_ids, layer)
                attn = self._fn.place(attn, dec, n_pre)
            x = self._fn.gb(lw, x, attn)
        idx = np.array(last + [0] * (_bucket(len(last), 1) - len(last)), np.int32)
        logits = np.asarray(self._fn.logits(self._weights, x, jnp.asarray(idx)))
        # Keyed by the position of the token being generated: independent of batching.
        return {rid: sample(logits[j], self._sampling, rid, len(tokens[rid]))
                for j, rid in enumerate(ids)}
