"""Hardware descriptions for the performance model: datasheet presets and calibrated specs.

A `HardwareSpec` holds rates only (GEMM, links, memory, the CPU attention kernel's read rate):
Stage 1 bounds throughput from them. The per-iteration cost terms Stage 2 charges are an
`EngineCosts` (perf/costs.py), derived from a spec's rates (`EngineCosts.from_hardware`) or
fitted on the local machine by `calibrate()`, which measures a spec too.

Units: bytes, seconds, FLOP/s, bytes/s (decimal: 1 GB = 1e9 B, 1 TFLOP/s = 1e12 FLOP/s).
"""

from __future__ import annotations

import dataclasses
import json


@dataclasses.dataclass(frozen=True)
class HardwareSpec:
    """Rates of one accelerator + host system.

    Attributes:
      name: preset name or "local:<fingerprint>".
      gemm_flops: accelerator dense GEMM rate (FLOP/s; bf16 tensor cores for GPUs). For a
        calibrated spec, the rate this engine's device stages tend to per token as the
        iteration grows (ModelConfig.flops_per_token_per_layer / EngineCosts.token_s).
      device_memory_bytes: accelerator memory.
      h2d_bytes_per_s, d2h_bytes_per_s: host <-> device copy rates (measured, not nominal).
      host_memory_bandwidth: host memory read bandwidth (bytes/s).
      cpu_attn_bytes_per_s: KV bytes per second the CPU decode-attention kernel reads.
      host_memory_bytes: host RAM (informational; the KV size is an input of the model).
      shared_cores: the accelerator and the host attention share the same cores (a CPU-only
        machine): stage times add up instead of overlapping.
      source: where the numbers come from.
    """

    name: str
    gemm_flops: float
    device_memory_bytes: float
    h2d_bytes_per_s: float
    d2h_bytes_per_s: float
    host_memory_bandwidth: float
    cpu_attn_bytes_per_s: float
    host_memory_bytes: float = 0.0
    shared_cores: bool = False
    source: str = ""

    def __post_init__(self):
        for f in ("gemm_flops", "h2d_bytes_per_s", "d2h_bytes_per_s", "host_memory_bandwidth",
                  "cpu_attn_bytes_per_s"):
            if not getattr(self, f) > 0:
                raise ValueError(f"HardwareSpec.{f} must be positive, got {getattr(self, f)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HardwareSpec:
        return cls(**json.loads(text))


# Host side of the paper's testbed: one socket of a Xeon Platinum 8380 (8 x DDR4-3200
# channels = 204.8 GB/s theoretical; the paper and DESIGN.md quote ~150 GB/s achievable).
# The CPU attention kernel is assumed to read KV at 80% of that (our kernel measures 0.80-0.83
# of stream bandwidth on the dev machine). The GPU presets share this host.
_XEON_8380_BW = 150e9
_ATTN_EFF = 0.8
_GB = 1e9


def _gpu(name, tflops, mem_gb, h2d_gb, source) -> HardwareSpec:
    return HardwareSpec(name=name, gemm_flops=tflops * 1e12, device_memory_bytes=mem_gb * _GB,
                        h2d_bytes_per_s=h2d_gb * _GB, d2h_bytes_per_s=h2d_gb * _GB,
                        host_memory_bandwidth=_XEON_8380_BW,
                        cpu_attn_bytes_per_s=_ATTN_EFF * _XEON_8380_BW,
                        host_memory_bytes=512 * _GB, source=source)


PRESETS: dict[str, HardwareSpec] = {
    # MoE-Lens paper setup: A40 with 150 TFLOP/s bf16 (as the paper uses; NVIDIA A40 datasheet:
    # 149.7 dense), PCIe 4.0 measured at 19.5 GB/s by the paper, 48 GB (the paper capped it to
    # 16-24 GB with dummy allocations; pass a smaller device memory via dataclasses.replace).
    "a40": _gpu("a40", 150, 48, 19.5, "MoE-Lens paper (A40 150 TFLOP/s, PCIe 19.5 GB/s "
                "measured); NVIDIA A40 datasheet 48 GB"),
    # NVIDIA L40 datasheet: 181 TFLOP/s bf16 dense (362 with sparsity), 48 GB, PCIe 4.0 x16;
    # the paper's Table 2 uses it with the A40's link.
    "l40": _gpu("l40", 181, 48, 19.5, "NVIDIA L40 datasheet (181 TFLOP/s bf16 dense); PCIe "
                "4.0 link as the A40"),
    # NVIDIA L4 datasheet: 121 TFLOP/s bf16 dense (242 sparse), 24 GB, PCIe 4.0 x16
    # (~25 GB/s achievable of 32 nominal).
    "l4": _gpu("l4", 121, 24, 25, "NVIDIA L4 datasheet (121 TFLOP/s bf16 dense, 24 GB), "
               "PCIe 4.0 x16 ~25 GB/s achievable"),
    # NVIDIA T4 datasheet: 65 TFLOP/s fp16 mixed precision (no bf16), 16 GB, PCIe 3.0 x16
    # (~12 GB/s achievable).
    "t4": _gpu("t4", 65, 16, 12, "NVIDIA T4 datasheet (65 TFLOP/s fp16, 16 GB), PCIe 3.0 x16 "
               "~12 GB/s achievable"),
    # NVIDIA A100 datasheet: 312 TFLOP/s bf16 dense, 80 GB; PCIe 4.0 x16 ~25 GB/s achievable.
    "a100": _gpu("a100", 312, 80, 25, "NVIDIA A100 datasheet (312 TFLOP/s bf16 dense, 80 GB), "
                 "PCIe 4.0 x16 ~25 GB/s achievable"),
    # NVIDIA H100 SXM datasheet: 989 TFLOP/s bf16 dense, 80 GB; PCIe 5.0 x16 ~50 GB/s.
    "h100": _gpu("h100", 989, 80, 50, "NVIDIA H100 SXM datasheet (989 TFLOP/s bf16 dense, "
                 "80 GB), PCIe 5.0 x16 ~50 GB/s achievable"),
    # NVIDIA H200 datasheet: 989 TFLOP/s bf16 dense, 141 GB; PCIe 5.0 x16 ~50 GB/s.
    "h200": _gpu("h200", 989, 141, 50, "NVIDIA H200 datasheet (989 TFLOP/s bf16 dense, "
                 "141 GB), PCIe 5.0 x16 ~50 GB/s achievable"),
}


def get_hardware(name: str) -> HardwareSpec:
    """A preset by name (see `PRESETS`)."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; presets: {', '.join(PRESETS)}") from None
