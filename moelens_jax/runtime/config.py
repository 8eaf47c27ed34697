"""`EngineConfig`: what the engine is asked to be, in one frozen value.

The `Engine` and the performance model's Stage 2 (`perf.predict`) take the same `EngineConfig`,
so every default lives here once. `perf.engine_config(...)` fills the token budget and VSLPipe's
split costs from a calibration; the engine itself reads nothing from disk.
"""

from __future__ import annotations

import dataclasses

from moelens_jax.model.weights import WEIGHT_DTYPES
from moelens_jax.runtime.layout import TOKEN_COUNT_SPLIT, SplitCosts
from moelens_jax.runtime.scheduler import DEFAULT_TOKEN_BUDGET, POLICIES

PIPELINES = ("auto", "serial", "vslpipe")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine settings (validated on construction; variants via `dataclasses.replace`).

    Attributes:
      kv_cache_bytes: host memory for the paged KV cache.
      kv_dtype: KV storage dtype (None: the model's dtype): "bfloat16", "float16", "float32",
        or 8-bit "int8" / "float8_e4m3fn" (a float32 scale per token and kv head).
      weight_dtype: how the model's layers store their matrices: None (the model dtype),
        "int8" or "int4" (`Model.quantised`; streamed as stored, dequantised on the device).
        Must match the model the engine runs; Stage 2 charges the stream by it.
      page_size: tokens per KV page.
      device_weight_layers: decoder layers resident on the device at once (2 = double buffer).
      resident_weight_fraction: where the layers stream, the fraction of each decoder layer's
        bytes kept on the device for the whole run (a prefix of its buffer: attention, router,
        then the experts); only the rest streams each pass. MoE-Lightning's partial weight
        residency r_w (`perf.lightning_planner.LightningPlan.resident_weight_fraction`).
      token_budget: tokens per iteration that prefill admission fills up to (n_real);
        `perf.engine_config` chooses it from a calibration.
      policy: "moe-lens" (continuous admission, KV paged as tokens arrive) or
        "moe-lightning" (its static batches with KV reserved for prompt + generation).
      max_batch: "moe-lightning" batch size N (None: what the KV reservation allows).
      micro_batch: "moe-lightning" micro-batch size mu: each iteration's sequences run as
        groups of mu through the layers (pipelined as VSLPipe pipelines its two groups: one
        group's CPU attention overlaps the device work of the others); None: one group.
      pipeline: "serial" (stages one after another, each timed), "vslpipe" (two token groups
        interleaved so one group's host attention overlaps the other's device stages), or
        "auto": serial on a CPU-only backend, vslpipe elsewhere (`resolved_pipeline`).
      h2d_limit_gb_per_s: optional cap on the host-to-device weight stream (research knob:
        puts a CPU box in the regime of a GPU behind PCIe).
      device_memory_bytes: optional device-memory cap (on an accelerator the default is what
        its allocator has left). The weight window plus resident embedding/lm_head must fit
        under it, and the activations of the token budget beside them: the engine lowers
        the budget (with a logged reason) until they do (`runtime.memory`).
      split: what VSLPipe's group split balances (`layout.split_plan`); token counts by default.
      record_stages: keep every per-layer stage interval for `RunStats.chrome_trace`.
      keep_pageable_weights: where the layers stream from pinned host memory (an
        accelerator), keep the model's pageable copy too; by default the engine frees it
        (`Model.release_pageable`) so the weights are in host memory once.
    """

    kv_cache_bytes: int
    kv_dtype: str | None = None
    weight_dtype: str | None = None
    page_size: int = 16
    device_weight_layers: int = 2
    resident_weight_fraction: float = 0.0
    token_budget: int = DEFAULT_TOKEN_BUDGET
    policy: str = "moe-lens"
    max_batch: int | None = None
    micro_batch: int | None = None
    pipeline: str = "auto"
    h2d_limit_gb_per_s: float | None = None
    device_memory_bytes: int | None = None
    split: SplitCosts = TOKEN_COUNT_SPLIT
    record_stages: bool = False
    keep_pageable_weights: bool = False

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"EngineConfig: {msg}")
        if not self.kv_cache_bytes > 0:
            bad(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.weight_dtype is not None and self.weight_dtype not in WEIGHT_DTYPES:
            bad(f"weight_dtype must be one of {WEIGHT_DTYPES} or None, got "
                f"{self.weight_dtype!r}")
        if self.page_size < 1:
            bad(f"page_size must be >= 1, got {self.page_size}")
        if self.device_weight_layers < 1:
            bad(f"device_weight_layers must be >= 1, got {self.device_weight_layers}")
        if not 0.0 <= self.resident_weight_fraction < 1.0:
            bad(f"resident_weight_fraction must lie in [0, 1), got "
                f"{self.resident_weight_fraction}")
        if self.token_budget < 1:
            bad(f"token_budget must be >= 1, got {self.token_budget}")
        if self.policy not in POLICIES:
            bad(f"unknown policy {self.policy!r}; choose from {POLICIES}")
        if self.max_batch is not None and self.max_batch < 1:
            bad(f"max_batch must be >= 1, got {self.max_batch}")
        if self.micro_batch is not None and self.micro_batch < 1:
            bad(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.micro_batch is not None and self.policy != "moe-lightning":
            bad("micro_batch is MoE-Lightning's (policy='moe-lightning'); MoE-Lens splits "
                "iterations with its pipeline")
        if self.pipeline not in PIPELINES:
            bad(f"pipeline must be one of {PIPELINES}, got {self.pipeline!r}")
        if self.pipeline == "vslpipe" and self.device_weight_layers < 2:
            bad("pipeline='vslpipe' needs device_weight_layers >= 2")
        if self.h2d_limit_gb_per_s is not None and not self.h2d_limit_gb_per_s > 0:
            bad(f"h2d_limit_gb_per_s must be positive, got {self.h2d_limit_gb_per_s}")
        if self.device_memory_bytes is not None and not self.device_memory_bytes > 0:
            bad(f"device_memory_bytes must be positive, got {self.device_memory_bytes}")

    def kept_layer_bytes(self, layer_bytes: int) -> int:
        """Bytes of a `layer_bytes` layer kept on the device (`resident_weight_fraction`,
        rounded down to 256 bytes)."""
        return int(self.resident_weight_fraction * layer_bytes) // 256 * 256

    def resolved_pipeline(self, on_cpu: bool) -> str:
        """The pipeline that runs: "auto" is serial on a CPU-only backend (host and "device"
        share the cores, so overlap only adds contention), vslpipe elsewhere."""
        if self.pipeline != "auto":
            return self.pipeline
        return "serial" if on_cpu else "vslpipe"

    def streams_weights(self, on_cpu: bool) -> bool:
        """Whether the layers stream to the device each pass. On a CPU-only backend the
        "device" is host memory and the layers are used in place, unless a link or device
        memory cap asks for an accelerator to be emulated, or the layers are quantised
        (dequantised as they stream)."""
        return (not on_cpu or self.h2d_limit_gb_per_s is not None
                or self.device_memory_bytes is not None or self.weight_dtype is not None)
