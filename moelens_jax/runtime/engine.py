"""The engine: offline batch generation driven by the resource-aware scheduler.

Each iteration runs the scheduler's plan as one pass over all layers, every layer in the three
stages of DESIGN section 3:

* GA (jitted, default device): RMSNorm, QKV, RoPE for every token of the iteration, and causal
  attention of prefill tokens within their own sequence (on the CPU backend a C++ kernel over
  each row's own context; elsewhere block-sparse over 64-row tiles: only tile pairs that share
  a sequence are computed, merged by log-sum-exp);
* C (host): the new K/V of every token are appended to the paged C++ store (an eager host call,
  so JAX can never drop or repeat it), then decode tokens attend over their cached tokens with
  the C++ kernel (`cpu_decode_attention`, jitted on the CPU device: XLA FFI there);
* GB (jitted, default device): O projection, residual, norm, router, experts over prefill and
  decode tokens together, residual: one computation on every backend, the experts computing
  only the routed rows (`moe.expert_ffn`: the C++ grouped kernel on CPU, "blocked" elsewhere).

Logits are computed for the last token of each sequence only. Row counts are padded to
buckets (decode rows to powers of two, a group's rows to 4 sizes per octave) so a run compiles
a handful of shapes (`Engine.warmup` compiles them ahead); padding rows are masked out of
prefill attention and the experts and point decode attention at a one-token pad sequence.

Weights stay on the host: the `WeightMover` streams each layer's contiguous buffer into a
device window of `device_weight_layers` layers on its own thread while earlier layers compute
(optionally capped to a link bandwidth); only embedding, final norm and lm_head stay resident.
On a CPU-only backend with neither cap the "device" is host memory: nothing streams, the layers
are used in place (`WeightMover.resident`).

Two executors (`pipeline=`): "serial" runs and times each stage in turn (the default on a
CPU-only backend, where every stage shares the same cores); "vslpipe" splits the iteration's
sequences into two groups and interleaves them so one group's host stage overlaps the other's
device stages (see `Engine._layers_vslpipe`). Both give the same tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moelens_jax.kv import PagedKVStore, cpu_decode_attention
from moelens_jax.model import transformer
from moelens_jax.model.model import Model
from moelens_jax.model.weights import ModelWeights
from moelens_jax.ops.prefill import packed_prefill_attention
from moelens_jax.runtime.mover import WeightMover, resident_bytes
from moelens_jax.runtime.sampling import SamplingParams, sample
from moelens_jax.runtime.scheduler import (
    DEFAULT_TOKEN_BUDGET,
    POLICIES,
    Plan,
    RequestRejected,
    make_scheduler,
)

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
    mode: str = "serial"  # the pipeline that ran ("serial" or "vslpipe")
    # One dict per iteration: start_s, wall_s, prefill/decode tokens, prefill_seqs,
    # kv_tokens_read (cached tokens the decode attention read, per layer), padded_rows,
    # tile_pairs, logit_rows, preempted/finished ids,
    # pages used/free, and wall seconds per stage ga_s, c_s, gb_s, io_s (summed over layers).
    per_iteration: list[dict] = dataclasses.field(default_factory=list)
    # (stage, layer, group, start_s, dur_s) per stage interval when the engine records them.
    stage_events: list[tuple] = dataclasses.field(default_factory=list)

    def stage_seconds(self) -> dict[str, float]:
        """Total wall seconds per stage over the run (GA, C, GB, IO)."""
        return {k: sum(it[f"{k.lower()}_s"] for it in self.per_iteration) for k in STAGES}

    @property
    def kv_peak_fraction(self) -> float:
        return self.kv_peak_pages / max(self.kv_pages, 1)

    @property
    def mean_tokens_per_iteration(self) -> float:
        return self.processed_tokens / max(self.iterations, 1)

    def chrome_trace(self) -> dict:
        """The run as a Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing):
        one slice per iteration plus counters for tokens and KV pages, and, when the engine
        recorded stages, one slice per stage interval on a track per stage and group."""
        tracks = {}
        events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": 0,
                   "args": {"name": f"iterations ({self.mode})"}}]
        for stage, layer, group, start, dur in self.stage_events:
            key = (stage, group if stage != "IO" else 0)
            if key not in tracks:
                tracks[key] = len(tracks) + 1
                label = stage if stage == "IO" else f"{stage} group {group}"
                events.append({"name": "thread_name", "ph": "M", "pid": 0,
                               "tid": tracks[key], "args": {"name": label}})
            events.append({"name": f"{stage} L{layer}", "ph": "X", "ts": start * 1e6,
                           "dur": dur * 1e6, "pid": 0, "tid": tracks[key],
                           "args": {"layer": layer, "group": group}})
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
    """`n` rounded up to one of at most 4 sizes per octave (<= 25 % padding; power-of-two
    buckets padded 78 decode rows to 128, and their lm_head rows with them), >= `minimum`."""
    n = max(int(n), minimum, 1)
    step = 1 << max(0, n.bit_length() - 3)
    return -(-n // step) * step


TILE = 64  # rows per tile of the block-sparse prefill attention


def prefill_tile_pairs(seg: np.ndarray, tile: int = TILE) -> np.ndarray:
    """(query tile, key tile) pairs whose rows can attend (same segment, causal), padded.

    `seg[r]` is the prefill segment of row r (-1 for decode and padding rows); each segment is
    a contiguous run of rows, so query tile i needs key tiles from the one holding the start of
    its first prefill row's segment up to i. Returns int32 [P_bucket, 3]: query tile, key tile,
    and 1 for a real pair / 0 for bucket padding (ignored by the attention).
    """
    seg = np.asarray(seg)
    is_pre = seg >= 0
    new_seg = is_pre & np.r_[True, seg[1:] != seg[:-1]]
    starts = np.maximum.accumulate(np.where(new_seg, np.arange(len(seg)), 0))
    pairs = []
    for i in range(len(seg) // tile):
        rows = np.flatnonzero(is_pre[i * tile:(i + 1) * tile])
        if len(rows):
            pairs += [(i, j, 1) for j in range(starts[i * tile + rows[0]] // tile, i + 1)]
    pairs += [(0, 0, 0)] * (_bucket(len(pairs), 1) - len(pairs))
    return np.asarray(pairs, np.int32).reshape(-1, 3)


def tiled_prefill_attention(q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3):
    """`reference.segment_causal_attention` computed only on the listed tile pairs, merged by
    LSE.

    Costs O(pairs * TILE^2) instead of O(n^2): an iteration of many short prompts touches a
    thin band around the diagonal. Rows with seg < 0 get zeros.
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


def ga_stage(cfg, kv_dtype, lw, x_nh, pos_n, seg_n, pairs_p3):
    """GA: QKV + RoPE for every row, causal attention of the prefill rows (zeros elsewhere).

    Prefill attention reads K/V rounded to the KV store's dtype, exactly what decode reads back
    from the store later, so a sequence recomputed after preemption sees the same numbers."""
    q, k, v = transformer.pre_attention(cfg, lw, x_nh, pos_n)
    k_s, v_s = k.astype(kv_dtype), v.astype(kv_dtype)
    return q, k, v, prefill_attention(q, k_s, v_s, seg_n, pos_n, pairs_p3)


def prefill_attention(q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3):
    """The C++ packed-prefill kernel on the CPU backend (work proportional to the rows each row
    attends to), `tiled_prefill_attention` on any other (chosen at lowering)."""
    return jax.lax.platform_dependent(
        q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3,
        cpu=lambda q, k, v, seg, pos, _: packed_prefill_attention(q, k, v, seg, pos),
        default=tiled_prefill_attention)


def gb_stage(cfg, lw, x_nh, attn_nqd, mask_n):
    """GB in one computation on every backend: O projection, residual, norm, router, experts
    over the routed rows only (`moe.expert_ffn`'s default path: the C++ grouped kernel on CPU,
    "blocked" elsewhere; the group sizes never leave the device), residual."""
    x, xn, routing = transformer.attention_out_and_route(cfg, lw, x_nh, attn_nqd)
    return transformer.experts_residual(cfg, lw, x, xn, routing, token_mask_n=mask_n)


@dataclasses.dataclass(frozen=True)
class _StageFunctions:
    embed: object
    ga: object
    place: object
    gb: object
    logits: object
    greedy: object


@functools.lru_cache(maxsize=16)
def _stage_functions(cfg, kv_dtype: str) -> _StageFunctions:
    """Jitted device stages, shared by every engine of one config and KV dtype (compiles are
    reused)."""
    p = functools.partial
    return _StageFunctions(
        embed=jax.jit(transformer.embed),
        ga=jax.jit(p(ga_stage, cfg, jnp.dtype(kv_dtype))),
        place=jax.jit(lambda attn, dec: attn.at[:dec.shape[0]].set(dec.astype(attn.dtype))),
        gb=jax.jit(p(gb_stage, cfg)),
        logits=jax.jit(lambda w, x, idx: transformer.logits(cfg, w, x[idx])),
        # Greedy decoding needs only the argmax: [rows] ids cross to the host, not [rows, V].
        greedy=jax.jit(lambda w, x, idx: jnp.argmax(transformer.logits(cfg, w, x[idx]), -1)))


@dataclasses.dataclass
class _Group:
    """One group of an iteration's tokens laid out for the stages.

    Rows: decode tokens first (their queries are q[:dec_b]), padding to dec_b, then every
    prefill sequence's tokens, then padding to nb (a multiple of TILE).
    """

    seqs: list[int]  # sequence ids in row order
    seqs_np: np.ndarray  # the same as int64, for the per-layer K/V append
    last_rows: list[int]  # row of each sequence's last token (its logits row)
    counts_np: np.ndarray  # int32 rows per sequence, for the KV append
    real_rows: np.ndarray  # rows holding real tokens, in append order
    mask_np: np.ndarray  # bool [nb]: real rows
    dec_b: int
    tok: jax.Array
    pos: jax.Array
    seg: jax.Array
    pairs: jax.Array
    dec_ids: jax.Array
    mask: jax.Array


def _row_bucket(n: int) -> int:
    """Rows of a group: a multiple of TILE, at most 4 sizes per octave (<= 25 % padding, so a
    run compiles few shapes without doubling the rows of an iteration just over a power of
    two)."""
    n = max(int(n), TILE)
    step = max(TILE, 1 << (n.bit_length() - 3))
    return -(-n // step) * step


def padded_rows(n_prefill_tokens: int, n_decode: int) -> int:
    """Rows one group of the engine computes for these tokens (bucket padding included)."""
    dec_b = _bucket(n_decode) if n_decode else 0
    return _row_bucket(dec_b + n_prefill_tokens)


def tile_pair_count(prefill_lens: Sequence[int], n_decode: int) -> int:
    """Tile pairs the prefill attention of one group computes (bucket padding included):
    `len(prefill_tile_pairs(seg))` for the layout `_build_group` makes, without building it."""
    lens = np.asarray(prefill_lens, np.int64)
    dec_b = _bucket(n_decode) if n_decode else 0
    if not len(lens):
        return _bucket(0, 1)
    starts = dec_b + np.concatenate([[0], np.cumsum(lens)[:-1]])
    end = dec_b + int(lens.sum())
    tiles = np.arange(dec_b // TILE, -(-end // TILE))
    first_row = np.maximum(tiles * TILE, dec_b)  # first prefill row of each tile
    seg_start = starts[np.searchsorted(starts, first_row, side="right") - 1]
    return _bucket(int((tiles - seg_start // TILE + 1).sum()), 1)


def logit_rows(n_seqs: int) -> int:
    """Rows the lm_head computes for `n_seqs` sequences (bucket padding included)."""
    return _bucket(n_seqs, 1)


_NO_PAIRS = np.zeros((1, 3), np.int32)  # the CPU kernel needs no tile pairs: one shape


def _build_group(decode: Sequence[int], prefill: Sequence[tuple[int, int]],
                 tokens: dict[int, list[int]], tile_pairs: bool = True) -> _Group:
    n_dec = len(decode)
    dec_b = _bucket(n_dec) if n_dec else 0
    rows = [tokens[rid][-1] for rid in decode] + [0] * (dec_b - n_dec)
    pos = [len(tokens[rid]) - 1 for rid in decode] + [0] * (dec_b - n_dec)
    seg = [-1] * dec_b
    last = list(range(n_dec))
    for k, (rid, n) in enumerate(prefill):
        rows += tokens[rid][:n]
        pos += range(n)
        seg += [k] * n
        last.append(len(rows) - 1)
    nb = padded_rows(len(rows) - dec_b, n_dec)  # the rule Stage 2 charges for, too
    pad = nb - len(rows)
    mask = np.zeros(nb, bool)
    mask[:n_dec] = True
    mask[dec_b:len(rows)] = True
    seg_np = np.array(seg + [-1] * pad, np.int32)
    host = jax.devices("cpu")[0]
    seqs = list(decode) + [rid for rid, _ in prefill]
    return _Group(
        seqs=seqs, seqs_np=np.asarray(seqs, np.int64), last_rows=last,
        counts_np=np.array([1] * n_dec + [n for _, n in prefill], np.int32),
        real_rows=np.flatnonzero(mask), mask_np=mask, dec_b=dec_b,
        tok=jax.device_put(np.array(rows + [0] * pad, np.int32)),
        pos=jax.device_put(np.array(pos + [0] * pad, np.int32)),
        seg=jax.device_put(seg_np),
        pairs=jax.device_put(prefill_tile_pairs(seg_np) if tile_pairs else _NO_PAIRS),
        dec_ids=jax.device_put(
            np.array(list(decode) + [PAD_SEQ] * (dec_b - n_dec), np.int32), host),
        mask=jax.device_put(mask))


class SplitCosts(NamedTuple):
    """What `split_plan` balances: per-layer seconds per token (device stages + host K/V
    append) and per KV token a decode row's host attention reads. The default balances token
    counts; `perf.split_costs` derives both from a calibration or preset."""

    token_s: float = 1.0
    kv_token_s: float = 0.0


TOKEN_COUNT_SPLIT = SplitCosts()


def split_plan(plan: Plan, decode_kv: Sequence[int] | None = None,
               costs: SplitCosts = TOKEN_COUNT_SPLIT
               ) -> tuple[tuple[list[int], list[tuple[int, int]]], ...]:
    """VSLPipe's two groups (decode ids, prefill (id, tokens)), balanced on predicted time: a
    group's GA -> C -> GB is a chain, so the layer period is at least the longer chain.
    Sequences by decreasing cost go to the group with less so far (LPT); `decode_kv[i]` is
    the context decode sequence i attends to. Order within a group follows the plan. One
    group if either would be empty."""
    kv = decode_kv if decode_kv is not None else [0] * len(plan.decode)
    items = ([(costs.token_s + costs.kv_token_s * c, 0, i) for i, c in enumerate(kv)]
             + [(costs.token_s * n, 1, j) for j, (_, n) in enumerate(plan.prefill)])
    load, side = [0.0, 0.0], {}
    for cost, kind, i in sorted(items, key=lambda t: (-t[0], t[1], t[2])):
        g = 0 if load[0] <= load[1] else 1
        side[kind, i] = g
        load[g] += cost
    groups = tuple(([rid for i, rid in enumerate(plan.decode) if side[0, i] == g],
                    [p for j, p in enumerate(plan.prefill) if side[1, j] == g])
                   for g in (0, 1))
    if not all(d or p for d, p in groups):
        return ((list(plan.decode), list(plan.prefill)),)
    return groups


PIPELINES = ("auto", "serial", "vslpipe")
STAGES = ("GA", "C", "GB", "IO")


class _StageClock:
    """Wall time per stage (GA, C, GB, IO) for one iteration, summed; with `keep`, also every
    interval as (stage, layer, group, start_s, dur_s) for the trace."""

    def __init__(self, t0: float, keep: bool):
        self.t0, self.keep = t0, keep
        self.sums = dict.fromkeys(STAGES, 0.0)
        self.events: list[tuple] = []

    @contextlib.contextmanager
    def __call__(self, stage: str, layer: int, group: int):
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.sums[stage] += end - start
            if self.keep:
                self.events.append((stage, layer, group, start - self.t0, end - start))


class Engine:
    """Offline batch generation with host KV paging (MoE-Lens scheduling).

    Args:
      model: a loaded `Model`.
      kv_cache_bytes: host memory for the paged KV cache.
      page_size: tokens per KV page.
      token_budget: tokens per iteration that prefill admission fills up to (n_real); by
        default the performance model's choice (`perf.default_token_budget`) when this
        machine has a cached calibration for the model's shape, else 512
        (`engine.token_budget_source` says which).
      kv_dtype: KV storage dtype (default: the model's dtype).
      policy: "moe-lens" (continuous admission, KV paged as tokens arrive) or
        "moe-lightning" (its static batches with KV reserved for prompt + generation; see
        `scheduler.StaticBatchScheduler`), on the same kernels.
      max_batch: "moe-lightning" batch size N (default: what the KV reservation allows).
      device_weight_layers: decoder layers resident on the device at once (2 = double buffer).
      h2d_limit_gb_per_s: optional cap on the host-to-device weight stream (research knob).
      device_memory_bytes: optional device-memory cap; the weight window plus resident
        embedding/lm_head must fit under it.
      pipeline: "serial" (stages one after another, each timed), "vslpipe" (two token groups
        interleaved so one group's host attention overlaps the other's device stages), or
        "auto": serial on a CPU-only backend (host and "device" share the cores, so overlap
        only adds contention), vslpipe elsewhere. `engine.mode` says which runs.
      record_stages: keep every per-layer stage interval for `RunStats.chrome_trace`
        (per-iteration sums are always kept).
    """

    def __init__(self, model: Model, *, kv_cache_bytes: int, page_size: int = 16,
                 device_weight_layers: int = 2, token_budget: int | None = None,
                 kv_dtype: str | None = None, policy: str = "moe-lens",
                 h2d_limit_gb_per_s: float | None = None,
                 device_memory_bytes: int | None = None, pipeline: str = "auto",
                 record_stages: bool = False, max_batch: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
        self.policy, self.max_batch = policy, max_batch
        if pipeline not in PIPELINES:
            raise ValueError(f"pipeline must be one of {PIPELINES}, got {pipeline!r}")
        self.on_cpu = jax.default_backend() == "cpu"
        if pipeline == "auto":
            pipeline = "serial" if self.on_cpu else "vslpipe"
        if pipeline == "vslpipe" and device_weight_layers < 2:
            raise ValueError("pipeline='vslpipe' needs device_weight_layers >= 2")
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.page_size = page_size
        self.token_budget, self.token_budget_source = token_budget, "given"
        from moelens_jax import perf  # perf imports the runtime: import late
        hw = perf.cached(cfg)
        # VSLPipe's group split balances the model's per-group time when calibrated.
        self._split_costs = perf.split_costs(cfg, hw, kv_dtype) if hw else TOKEN_COUNT_SPLIT
        if token_budget is None:
            self.token_budget = (perf.default_token_budget(cfg, hw) if hw
                                 else DEFAULT_TOKEN_BUDGET)
            self.token_budget_source = (f"perf model ({hw.name})" if hw else
                                        f"default {DEFAULT_TOKEN_BUDGET} (no calibration "
                                        "cached; python -m experiments.calibrate)")
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
        self.mode = pipeline
        self.record_stages = record_stages
        # On a CPU-only machine the layers stay where they are (zero-copy views) unless a link
        # cap or a device-memory cap asks for a GPU to be emulated.
        self.mover = WeightMover(model, depth=device_weight_layers,
                                 h2d_limit_gb_per_s=h2d_limit_gb_per_s,
                                 resident=False if device_memory_bytes is not None else None)
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
        self._fn = _stage_functions(cfg, self.store.dtype)
        # Stage C is jitted on the CPU device (inputs are committed there), so on a GPU machine
        # the callback never sits on the GPU stream.
        self._host = jax.devices("cpu")[0]
        self._device = jax.devices()[0]
        self._decode_attn = jax.jit(
            lambda q, ids, layer: cpu_decode_attention(self.store, q, ids, layer))
        self.stats = RunStats()

    @property
    def kv_pages(self) -> int:
        """Pages available to requests (one is reserved for the padding sequence)."""
        return self.store.num_pages - 1

    def _normalise(self, requests, max_new_tokens) -> tuple[list[Request], list[bool]]:
        """Requests as `Request`s with token-id prompts, and which were text."""
        reqs = [r if isinstance(r, Request) else
                Request(r if isinstance(r, str) else tuple(r), max_new_tokens or 16)
                for r in requests]
        is_text = [isinstance(r.prompt, str) for r in reqs]
        if any(is_text):
            reqs = [dataclasses.replace(r, prompt=tuple(self.model.encode(r.prompt)))
                    if t else r for r, t in zip(reqs, is_text, strict=True)]
        return reqs, is_text

    def warmup(self, requests: Sequence[Request | Sequence[int]],
               sampling: SamplingParams | None = None,
               max_new_tokens: int | None = None) -> float:
        """Compiles every stage shape that `generate(requests, sampling)` will use, so a timed
        run that follows measures no compilation; returns the seconds it took.

        The engine's own scheduler plans the run in simulation (every request generating its
        full max_new_tokens; a stop token only ends a request early, which uses a subset of
        these shapes); each distinct group layout then runs once through the stages of layer
        0 on placeholder tokens (decode rows attend to the padding sequence). No KV page is
        used and no request is served."""
        t0 = time.perf_counter()
        greedy = (sampling or SamplingParams()).greedy
        reqs, _ = self._normalise(requests, max_new_tokens)
        sched = make_scheduler(self.policy, self.kv_pages, self.page_size, self.token_budget,
                               self.max_batch)
        tokens: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            with contextlib.suppress(RequestRejected, TypeError, ValueError):
                sched.add(i, len(r.prompt), int(r.max_new_tokens))
                tokens[i] = [0] * len(r.prompt)
        seen: set[tuple] = set()
        lw = self.mover.get(0)
        while not sched.done:
            plan = sched.schedule()
            if plan.empty:
                break
            parts = (split_plan(plan, [len(tokens[rid]) for rid in plan.decode],
                                self._split_costs)
                     if self.mode == "vslpipe" else ((list(plan.decode), list(plan.prefill)),))
            for d, p in parts:
                g = _build_group(d, p, tokens, tile_pairs=not self.on_cpu)
                key = (g.tok.shape[0], g.pairs.shape[0], g.dec_b, len(g.last_rows))
                if key not in seen:
                    seen.add(key)
                    self._warm_group(lw, g, greedy)
            for rid in list(plan.decode) + [rid for rid, _ in plan.prefill]:
                tokens[rid].append(0)
            sched.complete(plan, set())
        return time.perf_counter() - t0

    def _embed(self, g: _Group) -> jax.Array:
        # Committed like every later layer's input (a GB output), so each stage compiles once
        # per shape rather than once for uncommitted and once for committed inputs.
        return jax.device_put(self._fn.embed(self._weights, g.tok), self._device)

    def _warm_group(self, lw, g: _Group, greedy: bool) -> None:
        """One layer's stages and the logits for group `g` (compiling their shapes)."""
        x = self._embed(g)
        q, k, v, attn = self._ga(lw, g, x)
        if g.dec_b:
            pad_ids = jax.device_put(np.full(g.dec_b, PAD_SEQ, np.int32), self._host)
            dec = self._decode_attn(jax.device_put(q[:g.dec_b], self._host), pad_ids, 0)
            attn = self._fn.place(attn, jax.device_put(dec, self._device))
        x = self._gb(lw, g, x, attn)
        idx = jax.device_put(np.zeros(logit_rows(len(g.last_rows)), np.int32))
        jax.block_until_ready((self._fn.greedy if greedy else self._fn.logits)(
            self._weights, x, idx))

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
        reqs, is_text = self._normalise(requests, max_new_tokens)

        def notify(res: GenerationResult) -> None:
            if is_text[res.index] and res.tokens:
                res.text = self.model.decode(res.tokens)
            if on_finish is not None:
                on_finish(res)

        sched = make_scheduler(self.policy, self.kv_pages, self.page_size, self.token_budget,
                               self.max_batch)
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
        stats = RunStats(kv_pages=self.kv_pages, mode=self.mode,
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
        kv_read = sum(sched.seqs[rid].total for rid in plan.decode)  # tokens decode attends to
        clock = _StageClock(t0, self.record_stages)
        new = self._run_iteration(plan, tokens, clock)
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
        prefill_lens = [n for _, n in plan.prefill]
        stats.per_iteration.append({
            "start_s": t_start - t0, "wall_s": t_end - t_start,
            "prefill_tokens": sum(prefill_lens), "decode_tokens": len(plan.decode),
            "prefill_seqs": len(plan.prefill), "kv_tokens_read": kv_read,
            "padded_rows": padded_rows(sum(prefill_lens), len(plan.decode)),
            "tile_pairs": tile_pair_count(prefill_lens, len(plan.decode)),
            "logit_rows": logit_rows(len(plan.prefill) + len(plan.decode)),
            "preempted": list(plan.preempted), "finished": sorted(finished),
            "pages_used": pages_used, "pages_free": self.kv_pages - pages_used,
            **{f"{k.lower()}_s": v for k, v in clock.sums.items()}})
        stats.stage_events += clock.events

    def _run_iteration(self, plan: Plan, tokens: dict[int, list[int]],
                       clock: _StageClock) -> dict[int, int]:
        """Runs one plan through all layers; returns the sampled token of each sequence."""
        parts = (split_plan(plan, [len(tokens[rid]) for rid in plan.decode], self._split_costs)
                 if self.mode == "vslpipe" else ((list(plan.decode), list(plan.prefill)),))
        groups = [_build_group(d, p, tokens, tile_pairs=not self.on_cpu) for d, p in parts]
        xs = [self._embed(g) for g in groups]
        if len(groups) == 1 or self.mode == "serial":
            self._layers_serial(groups, xs, clock)
        else:
            self._layers_vslpipe(groups, xs, clock)
        new = {}
        for g, x in zip(groups, xs, strict=True):
            idx = np.array(g.last_rows + [0] * (logit_rows(len(g.last_rows)) - len(g.last_rows)),
                           np.int32)
            idx = jax.device_put(idx)  # (jnp.asarray would compile a copy per shape)
            if self._sampling.greedy:  # argmax on the device, first maximum as np.argmax
                ids = np.asarray(self._fn.greedy(self._weights, x, idx))
                new.update({rid: int(ids[j]) for j, rid in enumerate(g.seqs)})
                continue
            logits = np.asarray(self._fn.logits(self._weights, x, idx))
            # Keyed by the position of the token being generated: independent of batching.
            new.update({rid: sample(logits[j], self._sampling, rid, len(tokens[rid]))
                        for j, rid in enumerate(g.seqs)})
        return new

    def _layer(self, layer: int, clock: _StageClock, prefetch: bool = True):
        with clock("IO", layer, 0):  # time spent waiting for the weight stream
            return self.mover.get(layer, prefetch=prefetch)

    def _ga(self, lw, g: _Group, x):
        return self._fn.ga(lw, x, g.pos, g.seg, g.pairs)

    def _host_stage(self, g: _Group, layer: int, ga_out):
        """C: append the group's new K/V to the paged store, decode attention on the host.

        Returns the group's attention output: prefill rows from GA, decode rows from the host
        kernel placed into rows [0, dec_b)."""
        q, k, v, attn = ga_out
        k_h, v_h = np.asarray(k), np.asarray(v)  # waits for GA (a true dependency)
        self.store.append(g.seqs_np, g.counts_np, layer,
                          k_h[g.real_rows], v_h[g.real_rows])
        if not g.dec_b:
            return attn
        q_dec = jax.device_put(q[:g.dec_b], self._host)
        dec = self._decode_attn(q_dec, g.dec_ids, layer).block_until_ready()
        return self._fn.place(attn, jax.device_put(dec, self._device))

    def _gb(self, lw, g: _Group, x, attn):
        return self._fn.gb(lw, x, attn, g.mask)

    def _layers_serial(self, groups, xs, clock: _StageClock) -> None:
        """Stages one after another, each waited for (and so timed exactly)."""
        for layer in range(self.cfg.num_layers):
            lw = self._layer(layer, clock)
            for gi, g in enumerate(groups):
                with clock("GA", layer, gi):
                    ga_out = jax.block_until_ready(self._ga(lw, g, xs[gi]))
                with clock("C", layer, gi):
                    attn = self._host_stage(g, layer, ga_out)
                with clock("GB", layer, gi):
                    xs[gi] = jax.block_until_ready(self._gb(lw, g, xs[gi], attn))

    def _layers_vslpipe(self, groups, xs, clock: _StageClock) -> None:
        """VSLPipe over two groups A, B. Device work is only dispatched (JAX async dispatch);
        the host blocks only on true dependencies (a group's K/V before its C stage). Device
        order per layer l: GB_A(l), GA_A(l+1), GB_B(l), GA_B(l+1), so C_B(l) runs on the host
        while the device computes GB_A(l)/GA_A(l+1), and C_A(l+1) while it computes
        GB_B(l)/GA_B(l+1). Layer l+1's weights are fetched without evicting layer l (still
        used by GB_B(l)); layer l+2's copy waits until GB_B(l) has run.

        Recorded intervals here are host-side: "C" (host attention and K/V append) and "GB"
        (GB dispatch), so the trace shows what the host did while device work was queued.
        """
        num_layers = self.cfg.num_layers
        lw = self._layer(0, clock)
        gas = [self._ga(lw, g, x) for g, x in zip(groups, xs, strict=True)]
        for layer in range(num_layers):
            nxt = None
            for gi, g in enumerate(groups):
                with clock("C", layer, gi):
                    attn = self._host_stage(g, layer, gas[gi])
                with clock("GB", layer, gi):
                    xs[gi] = self._gb(lw, g, xs[gi], attn)
                if layer + 1 < num_layers:
                    if nxt is None:
                        nxt = self._layer(layer + 1, clock, prefetch=False)
                    gas[gi] = self._ga(nxt, g, xs[gi])
            if nxt is not None:
                self.mover.prefetch_ahead(layer + 1, after=xs[-1])
                lw = nxt
