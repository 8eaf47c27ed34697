"""Stage 1 of the MoE-Lens performance model: the throughput upper bound (DESIGN section 2).

Every iteration streams all decoder layers over the host->device link once (delta =
streamed bytes / B_io). The tokens that share one pass are limited by the KV cache: a
sequence of prompt p and generation g contributes p + g tokens of GEMM work while occupying
sum_{j<g}(p + j) ~ g(2p + g)/2 KV-token-iterations, so with M tokens of KV the system
processes PME * M tokens per iteration, PME = 2(p + g)/((2p + g) g). The bound is the least of

* KV capacity:    PME * M / delta            (the paper's memory-capacity bound)
* accelerator:    C / F  (F = GEMM FLOPs per processed token)
* host attention: PME * R_attn / kv_bytes_per_token (the KV is read once per iteration)

(with `shared_cores`, device and host-attention times add up instead of overlapping).

Length distributions: PME of a workload is the ratio of sums, sum(p_i + g_i) /
sum(g_i (2 p_i + g_i) / 2) - every sequence shares the same KV pool and iteration clock, so
tokens and KV-token-iterations add up across sequences; it is not the mean of per-sequence
PMEs. The overlap factor is likewise sum(p + g) / sum(p + g/2).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from moelens_jax.config import ModelConfig
from moelens_jax.model.weights import LayerLayout
from moelens_jax.perf.hardware import HardwareSpec


@dataclasses.dataclass(frozen=True)
class Workload:
    """Prompt and generation lengths of a batch (one entry per request)."""

    prompt_lens: tuple[int, ...]
    gen_lens: tuple[int, ...]

    def __post_init__(self):
        if len(self.prompt_lens) != len(self.gen_lens) or not self.prompt_lens:
            raise ValueError("prompt_lens and gen_lens must be non-empty and of equal length")
        if min(self.prompt_lens) < 1 or min(self.gen_lens) < 1:
            raise ValueError("prompt and generation lengths must be >= 1")

    @classmethod
    def fixed(cls, prompt_len: int, gen_len: int, num_requests: int = 1) -> Workload:
        return cls((int(prompt_len),) * num_requests, (int(gen_len),) * num_requests)

    @classmethod
    def from_requests(cls, requests: Sequence) -> Workload:
        """From engine `Request`s (token-id prompts)."""
        return cls(tuple(len(r.prompt) for r in requests),
                   tuple(r.max_new_tokens for r in requests))

    @property
    def num_requests(self) -> int:
        return len(self.prompt_lens)

    @property
    def mean_prompt(self) -> float:
        return float(np.mean(self.prompt_lens))

    @property
    def mean_gen(self) -> float:
        return float(np.mean(self.gen_lens))

    @property
    def generated_fraction(self) -> float:
        """Generated / processed tokens, with processed = p + g (the paper's convention)."""
        return sum(self.gen_lens) / (sum(self.prompt_lens) + sum(self.gen_lens))


def pme(p: float, g: float) -> float:
    """Parallelism-memory efficiency of one sequence: 2(p + g) / ((2p + g) g)."""
    return 2.0 * (p + g) / ((2.0 * p + g) * g)


def workload_pme(w: Workload) -> float:
    """PME of a length distribution: ratio of sums (see module docstring)."""
    p, g = np.asarray(w.prompt_lens, float), np.asarray(w.gen_lens, float)
    return float(np.sum(p + g) / np.sum(g * (2 * p + g) / 2))


def overlap_factor(w: Workload) -> float:
    """KV capacity gained by allocating as tokens arrive instead of reserving p + g up front:
    (p + g) / (p + g/2), as a ratio of sums."""
    p, g = np.asarray(w.prompt_lens, float), np.asarray(w.gen_lens, float)
    return float(np.sum(p + g) / np.sum(p + g / 2))


def layer_bytes(cfg: ModelConfig, weight_dtype: str | None = None) -> int:
    """Bytes one decoder layer streams: in the model dtype, or in `weight_dtype`'s quantised
    layout (int8 matrices with their scales, the rest in the model dtype)."""
    if weight_dtype is None:
        return cfg.weight_bytes_per_layer
    return LayerLayout.for_config(cfg, weight_dtype=weight_dtype).nbytes


def gemm_intensity(cfg: ModelConfig, n: float, weight_dtype: str | None = None) -> float:
    """GEMM FLOPs per streamed weight byte when n tokens share one pass over a layer (exact
    for this config: 2 n * active params / layer bytes; the paper's
    n (6 m N_k + 2 + 2/s) / (6 m N_e + 2 + 2/s) for bf16)."""
    return n * cfg.flops_per_token_per_layer / layer_bytes(cfg, weight_dtype)


def tokens_to_saturate(cfg: ModelConfig, hw: HardwareSpec,
                       weight_dtype: str | None = None) -> float:
    """Tokens per iteration at which GEMM time equals transfer time: I(n) = C / B_io."""
    return hw.gemm_flops / hw.h2d_bytes_per_s / gemm_intensity(cfg, 1.0, weight_dtype)


def tokens_to_saturate_approx(cfg: ModelConfig, hw: HardwareSpec) -> float:
    """The paper's approximation n_sat ~ (C / B_io) (N_e / N_k) (bf16 weights)."""
    return hw.gemm_flops / hw.h2d_bytes_per_s * cfg.num_experts / cfg.num_experts_per_tok


def paper_table2(cfg: ModelConfig, tflops: float, link_gb_per_s: float,
                 seq_len: int) -> tuple[float, float]:
    """(tokens, KV "GB") to saturate, in the paper's Table 2 units: tokens =
    C[TFLOP/s] * 1024 / B[GB/s] * N_e / N_k, and KV GB = bytes / (1000 * 2**20). These mixed
    units reproduce the published numbers exactly (A40: 19200 tokens, 614 GB at 256)."""
    tokens = tflops * 1024 / link_gb_per_s * cfg.num_experts / cfg.num_experts_per_tok
    return tokens, tokens * seq_len * cfg.kv_bytes_per_token() / (1000 * 2**20)


@dataclasses.dataclass(frozen=True)
class Stage1Result:
    kv_tokens: float  # M
    pme: float
    delta_s: float  # one pass of the streamed weights over the link
    tokens_to_saturate: float
    tokens_to_saturate_approx: float
    tokens_per_iteration: float  # PME * M, capped where compute binds
    bound_kv_tokens_per_s: float  # PME * M / delta (processed)
    bound_gpu_tokens_per_s: float  # C / F
    bound_cpu_attn_tokens_per_s: float  # PME * R_attn / kv_bytes_per_token
    processed_tokens_per_s: float  # T_max
    generated_tokens_per_s: float
    binding: str  # "kv_capacity", "gpu_compute" or "cpu_attention"
    turning_point_kv_bytes: float  # KV size where the bound switches to compute-bound
    host_bandwidth_need: float  # B_kv + B_io at T_max (bytes/s)
    host_bandwidth_available: float
    cpu_attn_flops_need: float
    overlap_factor: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def stage1(cfg: ModelConfig, hw: HardwareSpec, workload: Workload, kv_cache_bytes: float,
           kv_dtype: str | None = None, weight_dtype: str | None = None) -> Stage1Result:
    """The throughput upper bound for `workload` with `kv_cache_bytes` of host KV cache, the
    KV stored as `kv_dtype` (M) and the layers streamed as `weight_dtype` (delta)."""
    kvb = cfg.kv_bytes_per_token(kv_dtype)
    m = kv_cache_bytes / kvb
    p_eff = workload_pme(workload)
    streamed = cfg.num_layers * layer_bytes(cfg, weight_dtype)
    delta = streamed / hw.h2d_bytes_per_s
    gen_frac = workload.generated_fraction
    flops_per_token = (cfg.num_layers * cfg.flops_per_token_per_layer
                       + cfg.lm_head_flops_per_row * gen_frac)
    t_kv = p_eff * m / delta
    t_gpu = hw.gemm_flops / flops_per_token
    t_attn = p_eff * hw.cpu_attn_bytes_per_s / kvb
    if hw.shared_cores:  # device and host attention take turns on the same cores
        t_gpu_attn = 1.0 / (1.0 / t_gpu + 1.0 / t_attn)
        bounds = {"kv_capacity": t_kv, "gpu_compute": t_gpu_attn}
    else:
        bounds = {"kv_capacity": t_kv, "gpu_compute": t_gpu, "cpu_attention": t_attn}
    binding = min(bounds, key=bounds.get)
    t_max = bounds[binding]
    n_iter = min(p_eff * m, t_max * max(delta, 1e-30))
    t_iter = max(delta, n_iter / t_max) if t_max > 0 else float("inf")
    b_kv = m * kvb / t_iter
    s = cfg.group_size
    kv_item = kvb / (2 * cfg.num_layers * cfg.kv_size)
    return Stage1Result(
        kv_tokens=m, pme=p_eff, delta_s=delta,
        tokens_to_saturate=tokens_to_saturate(cfg, hw, weight_dtype),
        tokens_to_saturate_approx=tokens_to_saturate_approx(cfg, hw),
        tokens_per_iteration=n_iter,
        bound_kv_tokens_per_s=t_kv, bound_gpu_tokens_per_s=t_gpu,
        bound_cpu_attn_tokens_per_s=t_attn,
        processed_tokens_per_s=t_max, generated_tokens_per_s=t_max * gen_frac,
        binding=binding,
        # Where t_kv meets the compute bound the binding uses (the shared-core combination
        # on a CPU-only machine).
        turning_point_kv_bytes=min(v for k, v in bounds.items() if k != "kv_capacity")
        * delta / p_eff * kvb,
        host_bandwidth_need=b_kv + streamed / t_iter,
        host_bandwidth_available=hw.host_memory_bandwidth,
        cpu_attn_flops_need=2.0 * s * b_kv / kv_item,
        overlap_factor=overlap_factor(workload))
