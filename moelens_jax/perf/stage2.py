"""Stage 2 of the performance model: what the engine achieves, by running the engine's own
scheduler (`Scheduler`, or `StaticBatchScheduler` for the MoE-Lightning policy) in simulation
and charging each planned iteration with `EngineCosts` (one scheduler, two uses).

The simulation takes the same `EngineConfig` the engine takes, feeds the workload to a real
scheduler sized exactly as the engine sizes it (pages from the KV bytes, one page reserved for
padding), lays each plan out exactly as the engine does (`IterationShape.of`: row buckets, tile
pairs, logits rows, VSLPipe's two groups when that pipeline runs) and charges it
(`EngineCosts.iteration`, whose docstring has the formula). Ramp-up (prefill-only iterations),
drain (a decode-only tail that still pays t_io), partly filled last pages and preemptions are
exactly those the scheduler produces.
"""

from __future__ import annotations

import dataclasses

from moelens_jax.config import ModelConfig
from moelens_jax.perf.costs import EngineCosts
from moelens_jax.perf.hardware import HardwareSpec
from moelens_jax.perf.stage1 import Workload, layer_bytes
from moelens_jax.runtime.config import EngineConfig
from moelens_jax.runtime.layout import IterationShape
from moelens_jax.runtime.scheduler import RequestRejected, make_scheduler


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
    seconds_by_term: dict  # each term of `EngineCosts.iteration` summed over the run

    def as_dict(self, with_series: bool = False) -> dict:
        d = dataclasses.asdict(self)
        if not with_series:
            d.pop("kv_use")
        return d


def engine_pages(cfg: ModelConfig, kv_cache_bytes: float, page_size: int,
                 kv_dtype: str | None = None) -> int:
    """KV pages the engine gives requests: floor(bytes / page bytes) minus the padding page."""
    return int(kv_cache_bytes // (page_size * cfg.kv_bytes_per_token(kv_dtype))) - 1


def streamed_bytes(cfg: ModelConfig, config: EngineConfig, on_cpu: bool) -> float:
    """Weight bytes the engine streams per iteration: every layer each pass less the part
    kept on the device (`resident_weight_fraction`), unless the window holds the whole model
    (after the first pass) or the layers are used in place (a CPU-only backend with no link
    or device-memory cap)."""
    if not config.streams_weights(on_cpu) or config.device_weight_layers >= cfg.num_layers:
        return 0.0
    layer = layer_bytes(cfg, config.weight_dtype)
    return float(cfg.num_layers * (layer - config.kept_layer_bytes(layer)))


def predict(cfg: ModelConfig, costs: EngineCosts | HardwareSpec, workload: Workload,
            config: EngineConfig) -> Stage2Result:
    """Predicted throughput of the engine on `workload` (every request, in order).

    Args:
      cfg: model shape.
      costs: an `EngineCosts` (from `calibrate()`), or a `HardwareSpec` whose datasheet
        derivation (`EngineCosts.from_hardware`) is used.
      workload: prompt/generation lengths per request (`Workload.fixed(p, g, K)` for K
        identical requests).
      config: the `EngineConfig` the engine runs with. The backend is taken to be CPU-only
        exactly when `costs.shared_cores` (pipeline "auto" and in-place weights follow).
    """
    if isinstance(costs, HardwareSpec):
        costs = EngineCosts.from_hardware(cfg, costs)
    on_cpu = costs.shared_cores
    split = config.split if config.resolved_pipeline(on_cpu) == "vslpipe" else None
    streamed = streamed_bytes(cfg, config, on_cpu)
    # every streamed layer is unpacked (a quantised one dequantised) whole after its copy
    dequantised = cfg.num_layers * layer_bytes(cfg) if streamed else 0.0
    num_pages = engine_pages(cfg, config.kv_cache_bytes, config.page_size, config.kv_dtype)
    if num_pages < 1:
        raise ValueError(f"kv_cache_bytes={config.kv_cache_bytes} holds no usable KV page")
    sched = make_scheduler(config.policy, num_pages, config.page_size, config.token_budget,
                           config.max_batch)
    rejected = useful = 0
    for rid, (p, g) in enumerate(zip(workload.prompt_lens, workload.gen_lens, strict=True)):
        try:
            sched.add(rid, p, g)
            useful += p + g
        except RequestRejected:
            rejected += 1
    total = costs.request_s * len(workload.prompt_lens)  # outside the iterations
    terms = dict.fromkeys(("dev", "host", "io", "d2h", "mem", "deq", "fixed"), 0.0)
    terms["fixed"] = total
    generated = processed = iterations = 0
    kv_use = []
    while not sched.done:
        plan = sched.schedule()
        if plan.empty:
            raise RuntimeError("scheduler made no progress in simulation")
        decode_kv = [sched.seqs[rid].total for rid in plan.decode]
        shape = IterationShape.of(plan, decode_kv, split, tile_pairs=not on_cpu,
                                  micro_batch=config.micro_batch)
        cost = costs.iteration(cfg, shape, streamed, config.kv_dtype, config.weight_dtype,
                               dequantised)
        kv_use.append(sched.used_pages() / num_pages)
        sched.complete(plan, set())
        total += cost["total"]
        for k in terms:
            terms[k] += cost[k]
        generated += len(plan.prefill) + len(plan.decode)
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


@dataclasses.dataclass(frozen=True)
class DataParallelResult:
    generated_tokens_per_s: float  # all hosts together, over the job's makespan
    one_host_tokens_per_s: float  # the same job on one host
    makespan_s: float
    bound: str  # "hosts" or "driver" (the one process reading and writing the lines)

    @property
    def scaling(self) -> float:
        return self.generated_tokens_per_s / self.one_host_tokens_per_s


def predict_data_parallel(cfg: ModelConfig, costs: EngineCosts | HardwareSpec,
                          workload: Workload, config: EngineConfig, hosts: int, chunk: int,
                          driver_lines_per_s: float | None = None) -> DataParallelResult:
    """Predicted throughput of a batch job on `hosts` identical hosts, one engine each
    (`batch_ray`): the requests are cut into blocks of `chunk` in input order, each block runs
    as its own `generate` (Stage 2 of that block), and each block goes to the host that
    becomes free first. Hosts share nothing but the driver, which reads and writes every line:
    `driver_lines_per_s` (measured; None = unbounded) caps the lines per second."""
    if hosts < 1 or chunk < 1:
        raise ValueError(f"hosts and chunk must be >= 1, got {hosts}, {chunk}")
    k = workload.num_requests
    blocks = [Workload(workload.prompt_lens[i:i + chunk], workload.gen_lens[i:i + chunk])
              for i in range(0, k, chunk)]
    runs = [predict(cfg, costs, b, config) for b in blocks]
    times = [r.total_s for r in runs]
    generated = sum(r.generated_tokens_per_s * r.total_s for r in runs)  # rejected: none
    free = [0.0] * hosts
    for t in times:  # list scheduling in input order, as the actor pool takes blocks
        i = min(range(hosts), key=free.__getitem__)
        free[i] += t
    makespan = max(free)
    bound = "hosts"
    if driver_lines_per_s is not None and k / driver_lines_per_s > makespan:
        makespan, bound = k / driver_lines_per_s, "driver"
    return DataParallelResult(generated_tokens_per_s=generated / makespan,
                              one_host_tokens_per_s=generated / sum(times),
                              makespan_s=makespan, bound=bound)
