"""Stage 2 of the performance model: what the engine achieves, by running the engine's own
scheduler (`Scheduler`, or `StaticBatchScheduler` for the MoE-Lightning policy) in simulation
with calibrated costs (one scheduler, two uses).

The simulation feeds the workload to a real `Scheduler` sized exactly as the engine sizes it
(pages from the KV bytes, one page reserved for padding), and charges each planned iteration

  t_dev  = L * (layer_fixed_s + layer_token_s * n + padded_row_s * rows
                + attn_pair_s * tile_pairs)
           + head_s_per_seq * logits rows   (lm_head + sampling; sequences, bucketed)
  t_host = L * (attn_fixed_s + attn_s_per_token * n
           + kv_tokens_read * kv_bytes_per_token_per_layer / cpu_attn_bytes_per_s)
  t_io   = streamed weight bytes / h2d_bytes_per_s

  t_iter = iteration_fixed_s + max(t_io, t_dev + t_host)   if shared_cores (CPU-only machine)
           iteration_fixed_s + max(t_io, t_dev, t_host)    otherwise (VSLPipe overlaps them)

(layer_token_s = 2 * active_params_per_layer / gemm_flops on a datasheet spec; the experts
compute exactly the routed rows, top_k per token, so their cost is in the token term; rows, tile
pairs and logits rows are the engine's own shape rules), plus
request_s per request outside the iterations. Ramp-up (prefill-only iterations), drain (a
decode-only tail that still pays t_io), partly filled last pages and preemptions are exactly
those the scheduler produces.
"""

from __future__ import annotations

import dataclasses

from moelens_jax.config import ModelConfig
from moelens_jax.perf.hardware import HardwareSpec
from moelens_jax.perf.stage1 import Workload
from moelens_jax.runtime.engine import (
    TILE,
    logit_rows,
    padded_rows,
    tile_pair_count,
)
from moelens_jax.runtime.scheduler import DEFAULT_TOKEN_BUDGET, RequestRejected, make_scheduler


@dataclasses.dataclass(frozen=True)
class Stage2Result:
    generated_tokens_per_s: float
    processed_tokens_per_s: float  # (prompt + generated) of served requests / time
    total_s: float
    computed_tokens: int  # tokens run through the layers, recomputation after preemption incl.
    iterations: int
    preemptions: int
    rejected: int
    mean_tokens_per_iteration: float
    kv_peak_fraction: float
    kv_use: tuple[float, ...]  # used fraction of the pages per iteration
    seconds_by_term: dict  # summed t_dev, t_host, t_io, fixed over the run

    def as_dict(self, with_series: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_series:
            d.pop("kv_use")
        return d


def iteration_seconds(cfg: ModelConfig, hw: HardwareSpec, n_tokens: int, n_seqs: int,
                      kv_tokens_read: int, kv_dtype: str | None = None,
                      rows: int | None = None, device_weight_layers: int = 2,
                      tile_pairs: int = 0) -> dict:
    """Cost terms of one iteration (see module docstring); key "total" is t_iter. `n_seqs` is
    the logits rows, `rows` the padded rows (default n_tokens). With `device_weight_layers` >=
    the layer count the mover's window holds the whole model, so nothing is streamed after the
    first pass (t_io = 0)."""
    rows = n_tokens if rows is None else rows
    L = cfg.num_layers
    per_layer_kv = cfg.kv_bytes_per_token(kv_dtype) / L
    head, token_s, pair_s = hw.head_s_per_seq, hw.layer_token_s, hw.attn_pair_s
    if not hw.fitted:  # a datasheet spec: what it leaves at 0 comes from its GEMM rate
        head = head or 2.0 * cfg.vocab_size * cfg.hidden_size / hw.gemm_flops
        token_s = token_s or 2.0 * cfg.active_params_per_layer / hw.gemm_flops
        pair_s = pair_s or 4.0 * TILE * TILE * cfg.num_heads * cfg.head_dim / hw.gemm_flops
    t_dev = L * (hw.layer_fixed_s + token_s * n_tokens + hw.padded_row_s * rows
                 + pair_s * tile_pairs) + head * n_seqs
    t_host = L * (hw.attn_fixed_s + hw.attn_s_per_token * n_tokens
                  + kv_tokens_read * per_layer_kv / hw.cpu_attn_bytes_per_s)
    streamed = 0 if device_weight_layers >= L else L * cfg.weight_bytes_per_layer
    t_io = streamed / hw.h2d_bytes_per_s
    busy = max(t_io, t_dev + t_host) if hw.shared_cores else max(t_io, t_dev, t_host)
    return {"dev": t_dev, "host": t_host, "io": t_io, "fixed": hw.iteration_fixed_s,
            "total": hw.iteration_fixed_s + busy}


def engine_pages(cfg: ModelConfig, kv_cache_bytes: float, page_size: int,
                 kv_dtype: str | None = None) -> int:
    """KV pages the engine gives requests: floor(bytes / page bytes) minus the padding page."""
    return int(kv_cache_bytes // (page_size * cfg.kv_bytes_per_token(kv_dtype))) - 1


def predict(cfg: ModelConfig, hw: HardwareSpec, workload: Workload, kv_cache_bytes: float, *,
            page_size: int = 16, token_budget: int | None = None,
            kv_dtype: str | None = None, policy: str = "moe-lens",
            max_batch: int | None = None, device_weight_layers: int = 2) -> Stage2Result:
    """Predicted throughput of the engine on `workload` (every request, in order).

    Args:
      cfg: model shape; hw: rates (a preset or `calibrate()`).
      workload: prompt/generation lengths per request (`Workload.fixed(p, g, K)` for K
        identical requests).
      kv_cache_bytes, page_size, token_budget, kv_dtype, policy, max_batch,
        device_weight_layers: as given to the `Engine` ("moe-lightning" simulates its static
        batches).
    """
    num_pages = engine_pages(cfg, kv_cache_bytes, page_size, kv_dtype)
    if num_pages < 1:
        raise ValueError(f"kv_cache_bytes={kv_cache_bytes} holds no usable KV page")
    sched = make_scheduler(policy, num_pages, page_size, token_budget or DEFAULT_TOKEN_BUDGET,
                           max_batch)
    rejected = useful = 0
    for rid, (p, g) in enumerate(zip(workload.prompt_lens, workload.gen_lens, strict=True)):
        try:
            sched.add(rid, p, g)
            useful += p + g
        except RequestRejected:
            rejected += 1
    total = hw.request_s * len(workload.prompt_lens)  # outside the iterations
    terms = dict.fromkeys(("dev", "host", "io", "fixed"), 0.0)
    terms["fixed"] = total
    generated = processed = iterations = 0
    kv_use = []
    while not sched.done:
        plan = sched.schedule()
        if plan.empty:
            raise RuntimeError("scheduler made no progress in simulation")
        kv_read = sum(sched.seqs[rid].total for rid in plan.decode)
        n_seqs = len(plan.prefill) + len(plan.decode)
        prefill = [n for _, n in plan.prefill]
        cost = iteration_seconds(cfg, hw, plan.num_tokens, logit_rows(n_seqs), kv_read, kv_dtype,
                                 padded_rows(sum(prefill), len(plan.decode)),
                                 device_weight_layers, tile_pair_count(prefill, len(plan.decode)))
        kv_use.append(sched.used_pages() / num_pages)
        sched.complete(plan, set())
        total += cost["total"]
        for k in terms:
            terms[k] += cost[k]
        generated += n_seqs
        processed += plan.num_tokens
        iterations += 1
    return Stage2Result(
        generated_tokens_per_s=generated / total if total else 0.0,
        processed_tokens_per_s=useful / total if total else 0.0,
        total_s=total, computed_tokens=processed, iterations=iterations,
        preemptions=sched.total_preemptions,
        rejected=rejected, mean_tokens_per_iteration=processed / max(iterations, 1),
        kv_peak_fraction=max(kv_use, default=0.0), kv_use=tuple(kv_use),
        seconds_by_term=terms)
