"""MoE-Lightning's policy search (HRM), for its static-batch policy on our engine.

MoE-Lightning picks its batch N and micro-batch mu with a hierarchical roofline model: the
per-layer decode time is T = max(comm_cpu->gpu, T_cpu, T_gpu) (its Eq. 12-14; attention on
the CPU, FFN on the GPU, as its solver chooses in every main setting), throughput =
N n / (T (n - 1) L) for generation length n, and the largest feasible N wins, subject to
host memory holding KV reserved for s + n tokens per sequence (its solver's constraint) and
GPU memory holding a double buffer of one layer plus the micro-batch's activations.

Simplifications, stated: one average prompt s and generation n (its solver's inputs); no
partial weight or KV residency on the GPU (r_w = r_c = 0: our engine streams every layer);
N taken as the largest feasible value (throughput N / T(N) never decreases in N here), not
found by MILP. Its throughput formula ignores
prefill, as the paper's solver does; Stage 2 with `policy="moe-lightning"` charges prefill too.
"""

from __future__ import annotations

import dataclasses
import math

from moelens_jax.config import ModelConfig
from moelens_jax.perf.hardware import HardwareSpec
from moelens_jax.perf.stage1 import Workload


@dataclasses.dataclass(frozen=True)
class LightningPolicy:
    batch_size: int  # N: sequences per static batch
    micro_batch: int  # mu
    num_micro_batches: int
    layer_decode_s: float  # T per layer and decode step
    hrm_generated_tokens_per_s: float  # the solver's own prediction (decode only)
    binding: str  # "comm", "cpu_attention" or "gpu"
    kv_reserved_bytes: float


def activation_bytes_per_token(cfg: ModelConfig) -> float:
    """Device activations per token in flight (float32 hidden, q/k/v, expert intermediates)."""
    return 4.0 * (3 * cfg.hidden_size + cfg.q_size + 2 * cfg.kv_size
                  + 2 * cfg.num_experts_per_tok * cfg.intermediate_size)


def lightning_policy(cfg: ModelConfig, hw: HardwareSpec, workload: Workload,
                     kv_cache_bytes: float,
                     device_memory_bytes: float | None = None) -> LightningPolicy:
    """MoE-Lightning's (N, mu) for `workload` on `hw` with `kv_cache_bytes` of host KV."""
    s, n = workload.mean_prompt, workload.mean_gen
    kvb = cfg.kv_bytes_per_token()
    n_kv = int(kv_cache_bytes // ((s + n) * kvb))
    if n_kv < 1:
        raise ValueError("the KV cache cannot hold one reserved sequence")
    L = cfg.num_layers
    comm = cfg.weight_bytes_per_layer / hw.h2d_bytes_per_s
    dev = device_memory_bytes if device_memory_bytes is not None else hw.device_memory_bytes
    resident = 2 * cfg.vocab_size * cfg.hidden_size * cfg.itemsize
    spare = dev - 2 * cfg.weight_bytes_per_layer - resident
    if spare <= 0:
        raise ValueError(f"device memory {dev:.3g} B cannot hold two layers of weights")
    mu_max = max(1, int(spare // activation_bytes_per_token(cfg)))

    def layer_time(batch):
        t_cpu = batch * (s + n / 2) * kvb / L / hw.cpu_attn_bytes_per_s
        t_gpu = cfg.flops_per_token_per_layer * batch / hw.gemm_flops
        terms = {"comm": comm, "cpu_attention": t_cpu, "gpu": t_gpu}
        return max(terms.values()), max(terms, key=terms.get)

    # Every term of T is constant or affine in N, so N / T(N) never decreases: HRM's "largest
    # balance point that fits in memory" is the largest N the KV reservation allows.
    best = n_kv
    t, binding = layer_time(best)
    mu = min(best, mu_max)
    return LightningPolicy(batch_size=best, micro_batch=mu,
                           num_micro_batches=math.ceil(best / mu), layer_decode_s=t,
                           hrm_generated_tokens_per_s=best * n / (t * max(n - 1, 1) * L),
                           binding=binding,
                           kv_reserved_bytes=best * (s + n) * kvb)
