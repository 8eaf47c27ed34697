"""MoE-Lightning's published policy planner: its cost model, its memory limits, its search.

Written from its paper (HRM, Eq. 12-14; App. B.2) and the behaviour of its public artifact's
solver (caoshiyi/artifacts, branch asplos25, `fastmoe/backend/optimizer.py`), whose printed
outputs the tests reproduce. For a decode-stage policy with attention on the CPU (the artifact
fixes it there) and KV wholly on the CPU:

* per layer and decode step, T = max(ctog, T_gpu, T_cpu) with
  ctog = W_e (1 - r_w) / b_cg (the experts of one layer not resident on the GPU),
  T_gpu = n_ub max(MLP FLOPs(mu) / p_g, MLP bytes(mu) / b_g) (every expert's weights read once
  per micro-batch), T_cpu = n_ub max(attention FLOPs(mu) / p_c, attention bytes(mu) / b_c)
  over s + n cached tokens;
* decode throughput = N n / (T (n - 1) L), N = mu n_ub (prefill is not counted);
* GPU memory <= 0.86 of the device: non-expert weights, resident experts, the larger of the
  decode and prefill working sets (the prefill one uses the prompt length s), a double buffer
  of the non-resident experts and the micro-batch's expert intermediates (also sized with s);
* CPU memory <= 0.8 of the host: non-resident experts of every layer, KV reserved for s + n
  tokens of every sequence, prompt activations and a pinned double buffer.

For fixed (mu, n_ub) every constraint is affine in r_w and T falls as r_w grows, so the
solver's LP reduces to taking the largest r_w the GPU allows (it must also be at least what
CPU memory requires). The search: mu = 1, 2, 3, 4, 36, 68, ... (steps of 32 after 4) until
one micro-batch no longer fits; for each mu the largest feasible n_ub is found by doubling
then binary search, then n_ub = 1, 2, ... is scanned until throughput drops; ties go to the
later candidate.

Units follow the artifact: its "GB" is 2^30 bytes (memory sizes and bandwidths), FLOP/s are
decimal, weights and KV are 2-byte (fp16/bf16). The artifact's GPU table has L4 and T4 only;
any other GPU name falls back to its class defaults, host memory included
(`LightningHardware.artifact`), which is what a user of the artifact on another GPU (MoE-Lens
on its A40) gets;
`LightningHardware.from_spec` maps our datasheet presets instead.
"""

from __future__ import annotations

import dataclasses

from moelens_jax.config import ModelConfig
from moelens_jax.perf.hardware import HardwareSpec

GIB = float(1 << 30)
GPU_MEMORY_FRACTION = 0.86  # of the device (the artifact's limit; it prints 0.9 beside it)
CPU_MEMORY_FRACTION = 0.8
BYTES = 2  # fp16/bf16 weights, activations and KV
# The artifact's GPU table: (GPU GiB, link GiB/s, GPU memory GiB/s, GPU FLOP/s, CPU FLOP/s,
# host memory GiB/s as its README runs it), and its fallback for any other name.
ARTIFACT_GPUS = {"l4": (24, 16, 285, 104e12, 1.6e12, 76), "t4": (15, 16, 300, 65e12, 0.8e12, 76)}
ARTIFACT_DEFAULT = (24, 16, 300, 104e12, 13e12, 100)
ARTIFACT_DEFAULT_CPU_GIB = 192
# Datasheet GPU memory bandwidths for `LightningHardware.from_spec` (bytes/s).
GPU_MEMORY_BANDWIDTH = {"a40": 696e9, "l40": 864e9, "l4": 300e9, "t4": 320e9, "a100": 2039e9,
                        "h100": 3350e9, "h200": 4800e9}
# The paper host's CPU (one Xeon Platinum 8380 socket: 40 cores x 2.3 GHz x 2 AVX-512 FMA
# units x 16 fp32 lanes x 2 FLOP), for `from_spec`.
XEON_8380_FLOPS = 40 * 2.3e9 * 2 * 16 * 2


@dataclasses.dataclass(frozen=True)
class LightningHardware:
    """The planner's hardware inputs (bytes, bytes/s, FLOP/s).

    Attributes:
      gpu_memory, cpu_memory: device and host memory the plan may use (before the fractions).
      ctog_bandwidth: host-to-device link; gpu_bandwidth, cpu_bandwidth: memory bandwidths.
      gpu_flops, cpu_flops: peak compute rates.
    """

    name: str
    gpu_memory: float
    cpu_memory: float
    ctog_bandwidth: float
    gpu_bandwidth: float
    cpu_bandwidth: float
    gpu_flops: float
    cpu_flops: float

    @classmethod
    def artifact(cls, name: str, cpu_memory_bytes: float | None = None, *,
                 cpu_bandwidth: float | None = None, gpu_memory_bytes: float | None = None)\
            -> LightningHardware:
        """The artifact's own constants (`fastmoe/backend/utils.py`). "l4" and "t4" have
        entries and take the host memory as an input (the artifact reads what is available;
        required here) and its bandwidth (default 76 GiB/s, its README's flag). Any other
        name gets the artifact's fallback, whole, as the artifact gives it: its class
        defaults, which ignore the host (a 24 GiB, 104 TFLOP/s GPU behind a 16 GiB/s link,
        300 GiB/s of GPU memory, 13 TFLOP/s and 100 GiB/s of CPU, 192 GiB of CPU memory);
        `cpu_memory_bytes` then overrides the 192 GiB only if given. `gpu_memory_bytes` caps
        the GPU (MoE-Lens capped its A40 to 16-24 GB).
        """
        if name in ARTIFACT_GPUS:
            if cpu_memory_bytes is None:
                raise ValueError(f"the artifact plans {name} with the host memory available: "
                                 "pass cpu_memory_bytes")
            gmem, ctog, gbw, gflops, cflops, cbw = ARTIFACT_GPUS[name]
        else:
            gmem, ctog, gbw, gflops, cflops, cbw = ARTIFACT_DEFAULT
            cpu_memory_bytes = cpu_memory_bytes or ARTIFACT_DEFAULT_CPU_GIB * GIB
        return cls(name, gpu_memory_bytes or gmem * GIB, cpu_memory_bytes, ctog * GIB,
                   gbw * GIB, cpu_bandwidth or cbw * GIB, gflops, cflops)

    @classmethod
    def from_spec(cls, hw: HardwareSpec, cpu_memory_bytes: float, *,
                  gpu_bandwidth: float | None = None, cpu_flops: float = XEON_8380_FLOPS,
                  gpu_memory_bytes: float | None = None) -> LightningHardware:
        """From one of our `HardwareSpec`s (GEMM rate, device memory, link, host bandwidth)
        plus what it does not hold: the GPU's memory bandwidth (datasheet, by preset name)
        and the CPU's FLOP/s (the paper host's by default)."""
        gbw = gpu_bandwidth or GPU_MEMORY_BANDWIDTH.get(hw.name)
        if gbw is None:
            raise ValueError(f"no GPU memory bandwidth known for {hw.name!r}: pass one")
        return cls(hw.name, gpu_memory_bytes or hw.device_memory_bytes, cpu_memory_bytes,
                   hw.h2d_bytes_per_s, gbw, hw.host_memory_bandwidth, hw.gemm_flops, cpu_flops)


@dataclasses.dataclass(frozen=True)
class LightningPlan:
    """A policy (N, mu, A_g = 0, F_g = 1, r_w, r_c = 0) and what the planner predicts for it.

    Attributes:
      micro_batch: mu, sequences per micro-batch; num_micro_batches: n_ub; batch_size: N.
      weights_on_gpu: r_w, the fraction of expert weights resident on the GPU.
      layer_s: T per layer and decode step; terms: ctog / gpu / cpu seconds (T is their max).
      generated_tokens_per_s: the planner's decode throughput, N n / (T (n - 1) L).
      gpu_memory_bytes, cpu_memory_bytes: the plan's peak use; *_limit_bytes: what it may use.
    """

    micro_batch: int
    num_micro_batches: int
    weights_on_gpu: float
    layer_s: float
    terms: dict
    generated_tokens_per_s: float
    gpu_memory_bytes: float
    cpu_memory_bytes: float
    gpu_limit_bytes: float
    cpu_limit_bytes: float

    @property
    def batch_size(self) -> int:
        return self.micro_batch * self.num_micro_batches

    @property
    def kv_reserved_fraction(self) -> float:
        return self.cpu_memory_bytes / self.cpu_limit_bytes

    def resident_weight_fraction(self, cfg: ModelConfig) -> float:
        """The fraction of each decoder layer's bytes this plan keeps on the GPU, as our
        engine takes it (`EngineConfig.resident_weight_fraction`): everything but the routed
        experts (the planner holds every layer's attention on the GPU) and r_w of them."""
        experts = cfg.num_experts * cfg.expert_params * cfg.itemsize
        return 1.0 - experts * (1.0 - self.weights_on_gpu) / cfg.weight_bytes_per_layer

    def cpu_memory_utilisation(self, cpu_memory_bytes: float) -> float:
        """Peak host memory the plan uses, as a fraction of `cpu_memory_bytes`."""
        return self.cpu_memory_bytes / cpu_memory_bytes


@dataclasses.dataclass(frozen=True)
class _Sizes:
    """The model terms the planner uses (bytes and FLOPs, 2-byte weights)."""

    layers: int
    h1: int
    h2: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int

    @classmethod
    def of(cls, cfg: ModelConfig) -> _Sizes:
        return cls(cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                   cfg.num_kv_heads, cfg.num_experts, cfg.num_experts_per_tok)

    @property
    def kv_width(self) -> int:  # h1 / (heads per kv head)
        return self.h1 // (self.heads // self.kv_heads)

    @property
    def expert_bytes(self) -> float:  # W_e: every expert of one layer
        return BYTES * 3 * self.h1 * self.h2 * self.experts

    @property
    def other_bytes(self) -> float:  # q/k/v/o projections of every layer
        g = self.heads // self.kv_heads
        return (4 * self.h1 ** 2 + 4 * self.h1 ** 2 // g) * self.layers


def _layer_terms(m: _Sizes, hw: LightningHardware, s: float, n: int, mu: int, n_ub: int)\
        -> dict:
    """Seconds per layer and decode step of the GPU (experts) and CPU (attention) work."""
    d = m.h1 / m.heads
    mlp_flops = 2 * mu * m.h1 * m.h2 * 3 * m.top_k
    mlp_bytes = BYTES * (mu * m.h1 + mu * m.h2 + m.h1 * m.h2 * 3 * m.experts)
    ctx = s + n
    attn_flops = mu * ctx * m.heads * d * 2 + mu * ctx * m.heads * 2
    attn_bytes = BYTES * (2 * mu * m.heads * d + 2 * ctx * mu * m.kv_heads * d)
    return {"gpu": n_ub * max(mlp_flops / hw.gpu_flops, mlp_bytes / hw.gpu_bandwidth),
            "cpu": n_ub * max(attn_flops / hw.cpu_flops, attn_bytes / hw.cpu_bandwidth)}


def _rw_range(m: _Sizes, hw: LightningHardware, s: float, n: int, mu: int, n_ub: int)\
        -> tuple[float, float, float, float]:
    """The feasible r_w interval [lo, hi] (empty if lo > hi) and the memory constants:
    (lo, hi, gpu bytes at r_w = 0, cpu bytes at r_w = 0)."""
    N, we, L, hkv = mu * n_ub, m.expert_bytes, m.layers, m.kv_width
    home_decode = 2 * 2 * m.h1 * N
    home_prefill = 2 * m.h1 * mu * 2 * s + m.h1 * N * 2 * s + 4 * s * hkv * mu * 2
    inter = 2 * (mu * m.top_k * m.h1 * s + mu * m.top_k * 3 * m.h2 * s) * 1.2
    # GPU: other + we L r_w + max(homes) + 2 we (1 - r_w) + inter  (affine in r_w)
    gpu0 = m.other_bytes + max(home_decode, home_prefill) + 2 * we + inter
    gpu_slope = we * (L - 2)
    # CPU: we L (1 - r_w) + KV(s + n) + prompt activations + 2 we (1 - r_w)
    kv = 4 * (s + n) * hkv * N * L
    cpu0 = we * (L + 2) + kv + 2 * m.h1 * N * s
    gpu_cap = GPU_MEMORY_FRACTION * hw.gpu_memory
    cpu_cap = CPU_MEMORY_FRACTION * hw.cpu_memory
    hi = (gpu_cap - gpu0) / gpu_slope if gpu_slope > 0 else (1.0 if gpu0 <= gpu_cap else -1.0)
    lo = (cpu0 - cpu_cap) / (we * (L + 2))  # r_w needed so the CPU holds the rest
    return max(0.0, lo), min(1.0, hi), gpu0, cpu0


def _evaluate(m, hw, s, n, mu, n_ub, max_rw=1.0) -> LightningPlan | None:
    lo, hi, gpu0, cpu0 = _rw_range(m, hw, s, n, mu, n_ub)
    hi = min(hi, max_rw)
    if lo > hi:
        return None
    rw = hi  # T only falls as more experts stay on the GPU
    terms = _layer_terms(m, hw, s, n, mu, n_ub)
    terms["ctog"] = m.expert_bytes * (1 - rw) / hw.ctog_bandwidth
    t = max(terms.values())
    N = mu * n_ub
    return LightningPlan(
        micro_batch=mu, num_micro_batches=n_ub, weights_on_gpu=rw, layer_s=t, terms=terms,
        generated_tokens_per_s=N * n / (t * max(n - 1, 1) * m.layers),
        gpu_memory_bytes=gpu0 + m.expert_bytes * (m.layers - 2) * rw,
        cpu_memory_bytes=cpu0 - m.expert_bytes * (m.layers + 2) * rw,
        gpu_limit_bytes=GPU_MEMORY_FRACTION * hw.gpu_memory,
        cpu_limit_bytes=CPU_MEMORY_FRACTION * hw.cpu_memory)


def _max_micro_batches(m, hw, s, n, mu, max_rw=1.0) -> int:
    """The largest feasible n_ub for micro-batch `mu` (0 if none): doubling, then binary
    search, as the artifact searches."""
    nb = 1
    while _evaluate(m, hw, s, n, mu, nb, max_rw) is not None:
        nb *= 2
    left, right = max(nb // 2, 1), nb
    while left < right:
        mid = (left + right) // 2
        if _evaluate(m, hw, s, n, mu, mid, max_rw) is not None:
            left = mid + 1
        else:
            right = mid
    return left - 1


def micro_batch_sizes():
    """mu = 1, 2, 3, 4, then steps of 32 (36, 68, ...), as the artifact enumerates them."""
    mu = 1
    while True:
        yield mu
        mu += 1 if mu < 4 else 32


def plan(cfg: ModelConfig, hw: LightningHardware, prompt_len: float, gen_len: int, *,
         max_weights_on_gpu: float = 1.0) -> LightningPlan:
    """MoE-Lightning's decode policy for average prompt `prompt_len` and generation `gen_len`.

    `max_weights_on_gpu` caps r_w (the artifact: 1). An emulation whose model is too shallow
    to scale the paper's residency down (with 4 layers the double buffer is half the model)
    caps it at 0 and says so.

    Raises:
      ValueError: not even one sequence fits.
    """
    if gen_len < 1 or prompt_len < 1:
        raise ValueError(f"prompt_len and gen_len must be >= 1, got {prompt_len}, {gen_len}")
    m = _Sizes.of(cfg)
    best = None
    for mu in micro_batch_sizes():
        n_max = _max_micro_batches(m, hw, prompt_len, gen_len, mu, max_weights_on_gpu)
        if n_max == 0:
            break
        prev = 0.0
        for n_ub in range(1, n_max + 1):
            p = _evaluate(m, hw, prompt_len, gen_len, mu, n_ub, max_weights_on_gpu)
            if p.generated_tokens_per_s < prev:
                break
            prev = p.generated_tokens_per_s
            if best is None or p.generated_tokens_per_s >= best.generated_tokens_per_s:
                best = p
    if best is None:
        raise ValueError(f"no MoE-Lightning policy fits {hw.name}: one sequence of "
                         f"{prompt_len}+{gen_len} tokens exceeds its GPU or CPU memory")
    return best


def host_memory_for(cfg: ModelConfig, prompt_len: float, gen_len: int, kv_bytes: float)\
        -> float:
    """The host memory on which the planner's CPU limit (80 %) holds, at r_w = 0, every
    layer's experts, its pinned double buffer, and sequences whose KV reserved for prompt +
    generation fills `kv_bytes` (with their prompt activations): the inverse of its CPU
    constraint, for emulating its host at a given KV budget."""
    m = _Sizes.of(cfg)
    n_seq = kv_bytes / (4 * (prompt_len + gen_len) * m.kv_width * m.layers)
    return (m.expert_bytes * (m.layers + 2) + kv_bytes
            + 2 * m.h1 * n_seq * prompt_len) / CPU_MEMORY_FRACTION


def device_memory_for(cfg: ModelConfig, activation_bytes: float) -> float:
    """The GPU memory on which the planner's GPU limit (86 %) holds every layer's attention
    weights, a double buffer of one layer's experts and `activation_bytes` besides: the
    inverse of its GPU constraint at r_w = 0, for emulating a device with a given
    activation allowance."""
    m = _Sizes.of(cfg)
    return (m.other_bytes + 2 * m.expert_bytes + activation_bytes) / GPU_MEMORY_FRACTION
