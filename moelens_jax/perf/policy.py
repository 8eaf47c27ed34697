"""Schedule choices the performance model makes for the engine."""

from __future__ import annotations

from moelens_jax.config import ModelConfig
from moelens_jax.perf.hardware import HardwareSpec
from moelens_jax.perf.stage1 import tokens_to_saturate
from moelens_jax.runtime.engine import SplitCosts

MIN_BUDGET, MAX_BUDGET = 64, 32768


def default_token_budget(cfg: ModelConfig, hw: HardwareSpec) -> int:
    """Tokens per iteration (n_real) the scheduler fills up to.

    The larger of (a) the tokens that saturate the accelerator against the weight stream
    (GEMM time = transfer time; beyond it more tokens per pass only add compute time) and
    (b) the tokens at which a layer's fixed cost (the profiler line's a) is 10% of its time,
    rounded up to a power of two and clipped to [64, 32768]. KV capacity, not this budget,
    bounds most runs (Stage 1); the budget only has to be large enough not to bind first.
    """
    per_token = 2.0 * cfg.active_params_per_layer / hw.gemm_flops
    amortise = 9.0 * hw.layer_fixed_s / per_token
    n = max(tokens_to_saturate(cfg, hw), amortise, MIN_BUDGET)
    return int(min(MAX_BUDGET, 1 << (int(n) - 1).bit_length()))


def split_costs(cfg: ModelConfig, hw: HardwareSpec, kv_dtype: str | None = None) -> SplitCosts:
    """What VSLPipe's group split balances (engine.split_plan): per layer, a token's device
    cost at the rate `hw` gives plus its host K/V append, and a decode row's host attention
    per KV token read."""
    return SplitCosts(
        token_s=2.0 * cfg.active_params_per_layer / hw.gemm_flops + hw.attn_s_per_token,
        kv_token_s=cfg.kv_bytes_per_token(kv_dtype) / cfg.num_layers / hw.cpu_attn_bytes_per_s)
