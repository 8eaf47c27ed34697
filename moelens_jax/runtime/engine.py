"""The engine: offline batch generation driven by the resource-aware scheduler.

Each iteration runs the scheduler's plan as one pass over all layers, every layer in the three
stages of DESIGN section 3:

* GA (jitted, default device; `model.stages`): RMSNorm, QKV, RoPE for every token of the
  iteration, and causal attention of prefill tokens within their own sequence (on the CPU
  backend a C++ kernel over
  each row's own context; elsewhere block-sparse over 64-row tiles: only tile pairs that share
  a sequence are computed, merged by log-sum-exp);
* C (host): the new K/V of every token are appended to the paged C++ store (an eager host call,
  so JAX can never drop or repeat it), then decode tokens attend over their cached tokens with
  the C++ kernel (`cpu_decode_attention`, jitted on the CPU device: XLA FFI there);
* GB (jitted, default device): O projection, residual, norm, router, experts over prefill and
  decode tokens together, residual: one computation on every backend, the experts computing
  only the routed rows (`moe.expert_ffn`: the C++ grouped kernel on CPU, "blocked" elsewhere).

Logits are computed for the last token of each sequence only. Row counts are padded to
buckets (at most 4 sizes per octave: `layout`) so a run compiles
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
import logging
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from moelens_jax.kv import PagedKVStore, cpu_decode_attention, kv_compute_dtype
from moelens_jax.model import transformer
from moelens_jax.model.model import Model
from moelens_jax.model.stages import ga_stage, gb_stage
from moelens_jax.model.weights import ModelWeights
from moelens_jax.runtime.config import EngineConfig
from moelens_jax.runtime.layout import (
    PAD_SEQ,
    Group,
    GroupShape,
    IterationShape,
    build_group,
    logit_rows,
    plan_groups,
)
from moelens_jax.runtime.memory import DevicePlan, plan_device_memory
from moelens_jax.runtime.mover import (
    WeightMover,
    experts_stay_quantised,
    layer_window_bytes,
    resident_bytes,
    streamed_layers_held,
    typed_layer_bytes,
)
from moelens_jax.runtime.requests import GenerationResult, Request
from moelens_jax.runtime.sampling import SamplingParams, sample
from moelens_jax.runtime.scheduler import Plan, RequestRejected, make_scheduler
from moelens_jax.runtime.stats import IterationRecord, RunStats, StageClock

log = logging.getLogger(__name__)


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


def host_device() -> jax.Device:
    """JAX's CPU device, where stage C (K/V append, decode attention) runs.

    Raises:
      RuntimeError: JAX was started without its CPU backend (e.g. JAX_PLATFORMS=cuda)."""
    try:
        return jax.devices("cpu")[0]
    except RuntimeError as e:
        raise RuntimeError(
            "the engine runs decode attention on the host (stage C) and needs JAX's CPU "
            "backend beside the accelerator, but JAX started without it "
            f"(JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS')!r}): set "
            "JAX_PLATFORMS=cuda,cpu or leave it unset") from e


DEVICE_HEADROOM = 0.05  # of the allocator's free bytes, for library workspaces (cuBLAS, ...)


def device_capacity(device: jax.Device) -> int | None:
    """Bytes the engine may still allocate on an accelerator (XLA's allocator limit minus what
    is in use, less `DEVICE_HEADROOM` for what no analysis sees), or None where the backend
    does not say (the CPU; the platform allocator)."""
    stats = device.memory_stats() if device.platform != "cpu" else None
    if not stats or "bytes_limit" not in stats:
        return None
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return int(free * (1 - DEVICE_HEADROOM))


def _plan_device(model: Model, config: EngineConfig, device, on_cpu: bool) -> DevicePlan | None:
    """The device-memory plan under the configured cap, or the accelerator's own capacity;
    None where there is neither (a CPU-only run uses host memory in place)."""
    cap = config.device_memory_bytes
    if cap is None and not on_cpu:
        cap = device_capacity(device)
    if cap is None:
        return None
    held = streamed_layers_held(config.device_weight_layers, model.config.num_layers)
    layer = model.host_layers[0].layout.nbytes
    kept = config.kept_layer_bytes(layer)
    window = layer_window_bytes(layer, model.config.num_layers, config.device_weight_layers,
                                kept, typed_layer_bytes(model, experts_stay_quantised(device)))
    groups = 2 if config.resolved_pipeline(on_cpu) == "vslpipe" else 1
    kept_desc = f", {kept} B of every layer kept" if kept else ""
    return plan_device_memory(
        model.config, model.dtype, config.token_budget, resident_bytes(model) + window,
        cap, groups, window_desc=f"({held} layer(s) of {layer} B: the window of "
                                 f"{config.device_weight_layers} plus one in flight{kept_desc}, "
                                 "and the resident embedding/lm_head) ")


class Engine:
    """Offline batch generation with host KV paging (MoE-Lens scheduling).

    Args:
      model: a loaded `Model`.
      config: an `EngineConfig` (its fields document every setting and default).
      **overrides: `EngineConfig` fields, applied over `config` (or making one when `config`
        is None): `Engine(model, kv_cache_bytes=2**30, page_size=16)`.

    The engine reads nothing from disk: `perf.engine_config(...)` turns a calibration into a
    config with the performance model's token budget. Device memory is planned first
    (`device_plan`, `runtime.memory`): on an accelerator, or under a `device_memory_bytes`
    cap, the weights must fit and the token budget is lowered until its activations fit too
    (`config.token_budget` is the budget that runs). On a GPU, JAX needs its CPU backend too
    (stage C runs there): `JAX_PLATFORMS=cuda,cpu` or unset. Use it as a context manager (or call
    `close()`) to stop the weight mover's thread and free its window promptly.
    """

    def __init__(self, model: Model, config: EngineConfig | None = None, **overrides):
        config = (EngineConfig(**overrides) if config is None
                  else dataclasses.replace(config, **overrides))
        # Stage C runs on the host: an accelerator-only JAX (JAX_PLATFORMS=cuda) cannot run it.
        self._host = host_device()
        self._device = jax.devices()[0]
        if config.weight_dtype != model.weight_dtype:
            raise ValueError(f"EngineConfig.weight_dtype={config.weight_dtype!r} but the model "
                             f"stores its layers as {model.weight_dtype or model.dtype} "
                             "(quantise it with Model.quantised, or set the field to match)")
        self.on_cpu = jax.default_backend() == "cpu"
        cfg = model.config
        # Device memory is planned before the KV pool and the weight staging exist.
        self.device_plan = _plan_device(model, config, self._device, self.on_cpu)
        if self.device_plan is not None and self.device_plan.reason:
            config = dataclasses.replace(config, token_budget=self.device_plan.token_budget)
        self.config = config
        self.mode = config.resolved_pipeline(self.on_cpu)
        self.model, self.cfg = model, cfg
        self.store = PagedKVStore.for_model(cfg, config.kv_cache_bytes,
                                            page_size=config.page_size,
                                            dtype=config.kv_dtype or model.dtype)
        if self.store.num_pages < 2:
            raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds "
                             f"{self.store.num_pages} page(s) of {self.store.page_bytes} bytes; "
                             "at least 2 are needed (one is reserved for padding)")
        zero = np.zeros((1, cfg.num_kv_heads, cfg.head_dim), np.float32)
        self.store.add_sequence(PAD_SEQ)
        for layer in range(cfg.num_layers):
            self.store.append([PAD_SEQ], [1], layer, zero, zero)
        # On a CPU-only machine the layers stay where they are (zero-copy views) unless a link
        # cap or a device-memory cap asks for a GPU to be emulated.
        self.mover = WeightMover(model, depth=config.device_weight_layers,
                                 h2d_limit_gb_per_s=config.h2d_limit_gb_per_s,
                                 resident=not config.streams_weights(self.on_cpu),
                                 device=self._device,
                                 kept_bytes=config.kept_layer_bytes(
                                     model.host_layers[0].layout.nbytes))
        self.device_weight_bytes = resident_bytes(model) + self.mover.device_bytes()
        if self.mover.pinned and model.pageable and not config.keep_pageable_weights:
            freed = model.release_pageable()
            log.info("freed the %.2f GB pageable copy of the layers: the pinned staging is "
                     "their only host copy now", freed / 1e9)
        w = model.weights
        self._weights = jax.device_put(ModelWeights(embed=w.embed, layers=(),
                                                    final_norm=w.final_norm, lm_head=w.lm_head))
        self._fn = _stage_functions(cfg, kv_compute_dtype(self.store.dtype))
        # Stage C is jitted on the CPU device (inputs are committed there), so on a GPU machine
        # the callback never sits on the GPU stream.
        self._decode_attn = jax.jit(
            lambda q, ids, layer: cpu_decode_attention(self.store, q, ids, layer))
        self.stats = RunStats()

    def close(self) -> None:
        """Stops the weight mover's thread and frees its window (idempotent)."""
        self.mover.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _scheduler(self):
        c = self.config
        return make_scheduler(c.policy, self.kv_pages, c.page_size, c.token_budget, c.max_batch)

    def _check_request(self, i: int, r: Request) -> None:
        """Rejects a request whose token ids or max_new_tokens are not what they must be
        (integers, ids inside the vocabulary); a float id such as 2.7 is an error, never
        truncated."""
        for t in r.prompt:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                if not (isinstance(t, (float, np.floating)) and float(t).is_integer()):
                    raise RequestRejected(f"request {i}: token id {t!r} is not an integer")
            if not 0 <= int(t) < self.cfg.vocab_size:
                raise RequestRejected(f"request {i}: token id {t} is outside the vocabulary "
                                      f"[0, {self.cfg.vocab_size})")
        n = r.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise RequestRejected(f"request {i}: max_new_tokens must be an integer >= 1, "
                                  f"got {n!r}")

    def _check_prompt(self, i: int, n: int) -> None:
        """Rejects a prompt whose iteration cannot fit the device (`DevicePlan`)."""
        plan = self.device_plan
        if plan is not None and n > plan.max_prompt_tokens:
            raise RequestRejected(
                f"request {i}: its {n}-token prompt would run as one iteration whose "
                f"activations do not fit the device memory beside the weights (at most "
                f"{plan.max_prompt_tokens} tokens fit)")

    def _parts(self, plan: Plan, decode_kv: Sequence[int]):
        """The plan's token groups: MoE-Lightning's micro-batches (`config.micro_batch`),
        VSLPipe's two (balanced on `config.split`), or one."""
        return plan_groups(plan, decode_kv,
                           self.config.split if self.mode == "vslpipe" else None,
                           self.config.micro_batch)

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
        sched = self._scheduler()
        tokens: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            with contextlib.suppress(RequestRejected, TypeError, ValueError):
                self._check_prompt(i, len(r.prompt))
                sched.add(i, len(r.prompt), int(r.max_new_tokens))
                tokens[i] = [0] * len(r.prompt)
        seen: set[tuple] = set()
        lw = self.mover.get(0)
        while not sched.done:
            plan = sched.schedule()
            if plan.empty:
                break
            for d, p in self._parts(plan, [sched.seqs[rid].total for rid in plan.decode]):
                g = build_group(d, p, tokens, tile_pairs=not self.on_cpu)
                key = (g.tok.shape[0], g.pairs.shape[0], g.dec_b, len(g.last_rows))
                if key not in seen:
                    seen.add(key)
                    self._warm_group(lw, g, greedy)
            for rid in list(plan.decode) + [rid for rid, _ in plan.prefill]:
                tokens[rid].append(0)
            sched.complete(plan, set())
        return time.perf_counter() - t0

    def profile_group(self, decode_kv: Sequence[int], prefill_lens: Sequence[int],
                      repeats: int = 5) -> tuple[GroupShape, dict[str, float]]:
        """Times one group's stages on a designed layout (the performance model's calibration
        micro-profile): decode rows attending to `decode_kv[i]` tokens each, prefill sequences
        of `prefill_lens` tokens. One untimed pass, then `repeats` passes, pass r on layer
        r mod L (weights come from memory as in a run); returns the group's shape and the
        median seconds of GA, C and GB. Uses KV pages (placeholder K/V) and frees them; the
        engine must be idle."""
        cfg = self.cfg
        dec = list(range(len(decode_kv)))
        pre = [(len(dec) + j, int(n)) for j, n in enumerate(prefill_lens)]
        rng = np.random.default_rng(0)  # varied tokens: the router spreads them like text
        tokens = {rid: rng.integers(0, cfg.vocab_size, n).tolist()
                  for rid, n in [*zip(dec, decode_kv, strict=True), *pre]}
        try:
            for rid in dec + [r for r, _ in pre]:
                self.store.add_sequence(rid)
            for rid in dec:
                zeros = np.zeros((len(tokens[rid]) - 1, cfg.num_kv_heads, cfg.head_dim),
                                 np.float32)
                for layer in range(cfg.num_layers):
                    self.store.append([rid], [len(zeros)], layer, zeros, zeros)
            g = build_group(dec, pre, tokens, tile_pairs=not self.on_cpu)
            times = {"ga_s": [], "c_s": [], "gb_s": []}
            for r in range(repeats + 1):
                layer = r % cfg.num_layers
                lw = self.mover.get(layer)
                x = self._embed(g)
                t0 = time.perf_counter()
                ga_out = jax.block_until_ready(self._ga(lw, g, x))
                t1 = time.perf_counter()
                attn = self._host_stage(g, layer, ga_out)
                t2 = time.perf_counter()
                jax.block_until_ready(self._gb(lw, g, x, attn))
                t3 = time.perf_counter()
                if r:
                    for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                        times[k].append(v)
        finally:
            for rid in dec + [r for r, _ in pre]:
                if self.store.has_sequence(rid):
                    self.store.free_sequence(rid)
        shape = GroupShape.of([n for _, n in pre], list(decode_kv), tile_pairs=not self.on_cpu)
        return shape, {k: float(np.median(v)) for k, v in times.items()}

    def _embed(self, g: Group) -> jax.Array:
        # Committed like every later layer's input (a GB output), so each stage compiles once
        # per shape rather than once for uncommitted and once for committed inputs.
        return jax.device_put(self._fn.embed(self._weights, g.tok), self._device)

    def _warm_group(self, lw, g: Group, greedy: bool) -> None:
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
        self._reqs = reqs

        def notify(res: GenerationResult) -> None:
            if is_text[res.index] and res.tokens:
                res.text = self.model.decode(res.tokens)
            if on_finish is not None:
                on_finish(res)

        sched = self._scheduler()
        results: list[GenerationResult | None] = [None] * len(reqs)
        tokens: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            try:
                self._check_request(i, r)
                self._check_prompt(i, len(r.prompt))
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
                bar.update(len(stats.per_iteration[-1].finished))
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
        stats.host_weight_bytes = self.model.host_bytes
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
        decode_kv = [sched.seqs[rid].total for rid in plan.decode]  # tokens each attends to
        parts = self._parts(plan, decode_kv)
        clock = StageClock(t0, self.config.record_stages)
        new = self._run_iteration(parts, tokens, clock)
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
        shape = IterationShape.of_groups(parts, plan, decode_kv, tile_pairs=not self.on_cpu)
        stats.per_iteration.append(IterationRecord(
            start_s=t_start - t0, wall_s=t_end - t_start, shape=shape,
            **{f"{k.lower()}_s": v for k, v in clock.sums.items()},
            act_d2h_bytes=clock.d2h_bytes, act_h2d_bytes=clock.h2d_bytes,
            pages_used=pages_used, pages_free=self.kv_pages - pages_used,
            preempted=tuple(plan.preempted), finished=tuple(sorted(finished))))
        stats.stage_events += clock.events

    def _run_iteration(self, parts, tokens: dict[int, list[int]],
                       clock: StageClock) -> dict[int, int]:
        """Runs one plan's groups (`_parts`) through all layers; returns the sampled token of
        each sequence."""
        groups = [build_group(d, p, tokens, tile_pairs=not self.on_cpu) for d, p in parts]
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
            params = {rid: self._reqs[rid].sampling or self._sampling for rid in g.seqs}
            if all(p.greedy for p in params.values()):  # argmax on the device, as np.argmax
                ids = np.asarray(self._fn.greedy(self._weights, x, idx))
                new.update({rid: int(ids[j]) for j, rid in enumerate(g.seqs)})
                continue
            logits = np.asarray(self._fn.logits(self._weights, x, idx))
            # Keyed by the position of the token being generated: independent of batching.
            new.update({rid: sample(logits[j], params[rid], self._key(rid), len(tokens[rid]))
                        for j, rid in enumerate(g.seqs)})
        return new

    def _key(self, rid: int) -> int:
        """What request `rid`'s draws are keyed by (`Request.sample_key`, else its index)."""
        key = self._reqs[rid].sample_key
        return rid if key is None else key

    def _layer(self, layer: int, clock: StageClock, prefetch: bool = True):
        with clock("IO", layer, 0):  # time spent waiting for the weight stream
            return self.mover.get(layer, prefetch=prefetch)

    def _ga(self, lw, g: Group, x):
        return self._fn.ga(lw, x, g.pos, g.seg, g.pairs)

    def _host_stage(self, g: Group, layer: int, ga_out, clock: StageClock | None = None):
        """C: append the group's new K/V to the paged store, decode attention on the host.

        Returns the group's attention output: prefill rows from GA, decode rows from the host
        kernel placed into rows [0, dec_b). `clock` counts the bytes moved between the device
        and host arrays (what `perf.activation_bytes` charges)."""
        q, k, v, attn = ga_out
        k_h, v_h = np.asarray(k), np.asarray(v)  # waits for GA (a true dependency)
        self.store.append(g.seqs_np, g.counts_np, layer,
                          k_h[g.real_rows], v_h[g.real_rows])
        if clock is not None:
            clock.moved(d2h=k_h.nbytes + v_h.nbytes)
        if not g.dec_b:
            return attn
        q_dec = jax.device_put(q[:g.dec_b], self._host)
        dec = self._decode_attn(q_dec, g.dec_ids, layer).block_until_ready()
        if clock is not None:
            clock.moved(d2h=q_dec.nbytes, h2d=dec.nbytes)
        return self._fn.place(attn, jax.device_put(dec, self._device))

    def _gb(self, lw, g: Group, x, attn):
        return self._fn.gb(lw, x, attn, g.mask)

    def _layers_serial(self, groups, xs, clock: StageClock) -> None:
        """Stages one after another, each waited for (and so timed exactly)."""
        for layer in range(self.cfg.num_layers):
            lw = self._layer(layer, clock)
            for gi, g in enumerate(groups):
                with clock("GA", layer, gi):
                    ga_out = jax.block_until_ready(self._ga(lw, g, xs[gi]))
                with clock("C", layer, gi):
                    attn = self._host_stage(g, layer, ga_out, clock)
                with clock("GB", layer, gi):
                    xs[gi] = jax.block_until_ready(self._gb(lw, g, xs[gi], attn))

    def _layers_vslpipe(self, groups, xs, clock: StageClock) -> None:
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
                    attn = self._host_stage(g, layer, gas[gi], clock)
                with clock("GB", layer, gi):
                    xs[gi] = self._gb(lw, g, xs[gi], attn)
                if layer + 1 < num_layers:
                    if nxt is None:
                        nxt = self._layer(layer + 1, clock, prefetch=False)
                    gas[gi] = self._ga(nxt, g, xs[gi])
            if nxt is not None:
                self.mover.prefetch_ahead(layer + 1, after=xs[-1])
                lw = nxt
