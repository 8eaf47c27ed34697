"""`EngineCosts`: the per-iteration cost terms Stage 2 charges, for one model on one machine.

Two derivations, one type: `EngineCosts.from_hardware(cfg, hw)` from a datasheet
`HardwareSpec` (rates only: GEMM work at the GEMM rate, KV reads at the attention read rate,
no fixed costs), and `calibrate()` fitting every term to this engine's own stage timings on the
local machine. Every field is an explicit cost (0 means "costs nothing"); nothing is derived at
charge time. Units: seconds, bytes.

Stage 2 charges one planned iteration (`runtime.layout.IterationShape`, the engine's own
layout) with L layers and G groups (VSLPipe runs two, each dispatched and padded on its own):

  t_dev  = L * (layer_fixed_s * G + layer_token_s * tokens + padded_row_s * rows
                + attn_pair_s * tile_pairs + attn_key_s * attended_keys
                + expert_s * active experts)
           + head_s_per_seq * logit_rows
  (active experts: summed over groups, the expected number of experts that receive at least
  one of a group's n routed tokens, E (1 - (1 - k / E)^n) under uniform routing: each active
  expert's weights are read once per layer, so small batches pay for the experts they touch,
  not for all E)
  t_host = L * (attn_fixed_s * G + attn_s_per_token * tokens
                + attn_s_per_kv_byte * KV bytes the decode rows read per layer)
  t_io   = io_s_per_byte * weight bytes streamed (0 when the layers are resident)
           + link_s_per_byte * activation bytes host -> device
  t_d2h  = d2h_s_per_byte * activation bytes device -> host
  t_mem  = host_mem_s_per_byte * (KV bytes the decode rows read + weight bytes streamed
                                   + activation bytes both ways): host memory serves the CPU
           attention, the weight stream's DMA and the activation copies at once (contention)
  Activations cross the link only where device and host are apart (not shared_cores): per
  layer and group the engine copies float32 K and V of every computed row and the decode
  rows' queries to the host (`np.asarray(k)`, `q[:dec_b]`: the host stage waits for them, so
  they are on its chain), and the float32 attention output of the decode rows back
  (dispatched without waiting: it only occupies the link, at the link's own rate even where a
  cap slows the weight mover).
  t_deq  = unpack_s_per_byte (or dequant_<format>_s_per_byte for a quantised layout) * bytes
           of the streamed layers once unpacked: the device work that turns each copied layer
           into typed weights, which the weight mover waits for before its next copy
  t_iter = iteration_fixed_s + max(t_io + 2 t_deq, t_dev + t_host + t_deq)  if shared_cores
           iteration_fixed_s + max(t_io + t_deq, t_dev + t_deq, t_host + t_d2h, t_mem)
                                                                                otherwise
  On shared cores (a CPU-only machine) the unpacking runs on the cores the compute uses: its
  CPU time adds to the compute, and while both run each gets half the cores, so the weight
  mover's chain waits twice its isolated time. Elsewhere it is device work beside the GEMMs
  (VSLPipe overlaps device, host and link).

plus `request_s` per request outside the iterations.
"""

from __future__ import annotations

import dataclasses

from moelens_jax.config import ModelConfig
from moelens_jax.model.stages import TILE
from moelens_jax.perf.hardware import HardwareSpec
from moelens_jax.runtime.layout import IterationShape


@dataclasses.dataclass(frozen=True)
class EngineCosts:
    """Cost terms of Stage 2 (see the module docstring for how each is charged).

    Attributes:
      layer_fixed_s: per layer and group: dispatch and fixed work of the device stages.
      layer_token_s: per layer and token: the GEMM work of a real token (the experts compute
        exactly the routed rows, so theirs is here).
      padded_row_s: per layer and computed row, bucket padding included (dense projections).
      attn_pair_s: per layer and prefill-attention tile pair (the tiled XLA path).
      attn_key_s: per layer and attended (row, key) pair of the prefill attention (the CPU
        kernel's work: sum over prompts of n (n + 1) / 2).
      expert_s: per layer and expected active expert (`active_experts`): reading its
        weights and dispatching its GEMMs, whatever its rows.
      attn_fixed_s: per layer and group: the host stage's fixed cost (K/V append, launch).
      attn_s_per_token: per layer and token: K/V conversion and append.
      attn_s_per_kv_byte: per KV byte the decode attention reads.
      head_s_per_seq: per logits row (bucketed): lm_head and sampling.
      iteration_fixed_s: per iteration: scheduling, embedding, dispatch.
      request_s: per request, outside the iterations.
      io_s_per_byte: per weight byte the weight mover streams host -> device (an emulated
        link cap, `with_link`, slows it).
      link_s_per_byte: per byte the host -> device link carries otherwise (attention outputs).
      d2h_s_per_byte: per byte device -> host (queries, new K/V).
      host_mem_s_per_byte: per byte host memory serves (1 / its bandwidth): KV reads, the
        weight stream and activation copies share it.
      unpack_s_per_byte: per byte of a streamed layer stored in the model dtype, unpacking it
        into typed weights on the device after its copy.
      dequant_int8_s_per_byte, dequant_int4_s_per_byte: the same for a quantised layer (its
        unpacking dequantises; on the CPU backend all but the routed experts, which the expert
        kernel dequantises inside its GEMMs, in the device time), per byte of the layer once
        dequantised. All three are 0 from a datasheet (a GPU unpacks at memory speed, far under
        the link's time).
      shared_cores: device and host stages share the same cores (their times add).
      source: where the numbers come from.
    """

    layer_fixed_s: float = 0.0
    layer_token_s: float = 0.0
    padded_row_s: float = 0.0
    attn_pair_s: float = 0.0
    attn_key_s: float = 0.0
    expert_s: float = 0.0
    attn_fixed_s: float = 0.0
    attn_s_per_token: float = 0.0
    attn_s_per_kv_byte: float = 0.0
    head_s_per_seq: float = 0.0
    iteration_fixed_s: float = 0.0
    request_s: float = 0.0
    io_s_per_byte: float = 0.0
    link_s_per_byte: float = 0.0
    d2h_s_per_byte: float = 0.0
    host_mem_s_per_byte: float = 0.0
    unpack_s_per_byte: float = 0.0
    dequant_int8_s_per_byte: float = 0.0
    dequant_int4_s_per_byte: float = 0.0
    shared_cores: bool = False
    source: str = ""

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type == "float" and not (v >= 0 and v < float("inf")):
                raise ValueError(f"EngineCosts.{f.name} must be finite and >= 0, got {v}")

    @classmethod
    def from_hardware(cls, cfg: ModelConfig, hw: HardwareSpec) -> EngineCosts:
        """The datasheet derivation: GEMM work at `hw.gemm_flops`, KV reads at
        `hw.cpu_attn_bytes_per_s`, copies at `hw.h2d_bytes_per_s` / `hw.d2h_bytes_per_s`, host
        memory at `hw.host_memory_bandwidth`; no fixed costs."""
        return cls(
            layer_token_s=cfg.flops_per_token_per_layer / hw.gemm_flops,
            attn_pair_s=4.0 * TILE * TILE * cfg.num_heads * cfg.head_dim / hw.gemm_flops,
            attn_s_per_kv_byte=1.0 / hw.cpu_attn_bytes_per_s,
            head_s_per_seq=cfg.lm_head_flops_per_row / hw.gemm_flops,
            io_s_per_byte=1.0 / hw.h2d_bytes_per_s, link_s_per_byte=1.0 / hw.h2d_bytes_per_s,
            d2h_s_per_byte=1.0 / hw.d2h_bytes_per_s,
            host_mem_s_per_byte=1.0 / hw.host_memory_bandwidth, shared_cores=hw.shared_cores,
            source=f"datasheet rates of {hw.name}")

    def with_link(self, h2d_bytes_per_s: float) -> EngineCosts:
        """These costs with the weight stream capped at this rate (the engine's
        `h2d_limit_gb_per_s`, which throttles only the weight mover)."""
        return dataclasses.replace(self, io_s_per_byte=1.0 / h2d_bytes_per_s)

    def group_fixed_s(self, cfg: ModelConfig) -> float:
        """A group's per-layer device cost that does not grow with its tokens once they touch
        every expert (the fixed term plus every expert active)."""
        return self.layer_fixed_s + cfg.num_experts * self.expert_s

    @property
    def token_s(self) -> float:
        """Device seconds per token per layer as n grows (token + its row)."""
        return self.layer_token_s + self.padded_row_s

    def iteration(self, cfg: ModelConfig, shape: IterationShape, streamed_bytes: float = 0.0,
                  kv_dtype: str | None = None, weight_dtype: str | None = None,
                  dequantised_bytes: float = 0.0) -> dict[str, float]:
        """Seconds of one iteration by term ("dev", "host", "io", "d2h", "mem", "deq",
        "fixed") and "total"; `dequantised_bytes`: what the streamed layers come to once
        unpacked (in the model dtype; a `weight_dtype` layout dequantised)."""
        L, G = cfg.num_layers, len(shape.groups)
        kv_bytes = shape.kv_tokens_read * cfg.kv_bytes_per_token(kv_dtype) / L
        act_h2d, act_d2h = (0, 0) if self.shared_cores else activation_bytes(cfg, shape)
        t_dev = (L * (self.layer_fixed_s * G + self.layer_token_s * shape.tokens
                      + self.padded_row_s * shape.padded_rows
                      + self.attn_pair_s * shape.tile_pairs
                      + self.attn_key_s * shape.attended_keys
                      + self.expert_s * active_experts(cfg, shape))
                 + self.head_s_per_seq * shape.logit_rows)
        t_host = L * (self.attn_fixed_s * G + self.attn_s_per_token * shape.tokens
                      + self.attn_s_per_kv_byte * kv_bytes)
        t_io = self.io_s_per_byte * streamed_bytes + self.link_s_per_byte * act_h2d
        t_d2h = self.d2h_s_per_byte * act_d2h
        t_mem = (0.0 if self.shared_cores else  # on shared cores t_host is the memory's time
                 self.host_mem_s_per_byte * (L * kv_bytes + streamed_bytes + act_h2d + act_d2h))
        rate = (getattr(self, f"dequant_{weight_dtype}_s_per_byte") if weight_dtype
                else self.unpack_s_per_byte)
        t_deq = rate * dequantised_bytes
        busy = (max(t_io + 2 * t_deq, t_dev + t_host + t_deq) if self.shared_cores
                else max(t_io + t_deq, t_dev + t_deq, t_host + t_d2h, t_mem))
        return {"dev": t_dev, "host": t_host, "io": t_io, "d2h": t_d2h, "mem": t_mem,
                "deq": t_deq, "fixed": self.iteration_fixed_s,
                "total": self.iteration_fixed_s + busy}


def activation_bytes(cfg: ModelConfig, shape: IterationShape) -> tuple[int, int]:
    """(host -> device, device -> host) bytes the engine copies in one iteration over all
    layers where device and host are apart: float32 attention outputs of the decode rows in;
    float32 K and V of every computed row and the decode rows' queries out."""
    q_row = 4 * cfg.q_size
    h2d = cfg.num_layers * shape.decode_rows * q_row
    d2h = cfg.num_layers * (shape.padded_rows * 2 * 4 * cfg.kv_size + shape.decode_rows * q_row)
    return h2d, d2h


def expected_active_experts(cfg: ModelConfig, tokens: int) -> float:
    """Experts expected to receive at least one of `tokens` routed tokens (top-k of E each,
    uniform routing): E (1 - (1 - k / E)^tokens); 0 for no tokens, -> E as tokens grow."""
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    return E * (1.0 - (1.0 - k / E) ** max(int(tokens), 0))


def active_experts(cfg: ModelConfig, shape: IterationShape) -> float:
    """`expected_active_experts` summed over the iteration's groups (each group runs its own
    expert GEMMs)."""
    return sum(expected_active_experts(cfg, g.tokens) for g in shape.groups)
