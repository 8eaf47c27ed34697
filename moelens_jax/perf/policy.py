"""Schedule choices the performance model makes for the engine, as an `EngineConfig`."""

from __future__ import annotations

import dataclasses

from moelens_jax.config import ModelConfig
from moelens_jax.perf.calibrate import cached
from moelens_jax.perf.costs import EngineCosts
from moelens_jax.perf.hardware import HardwareSpec, get_hardware
from moelens_jax.perf.stage1 import tokens_to_saturate
from moelens_jax.runtime.config import EngineConfig
from moelens_jax.runtime.layout import SplitCosts

MIN_BUDGET, MAX_BUDGET = 64, 32768


def default_token_budget(cfg: ModelConfig, hw: HardwareSpec, costs: EngineCosts,
                         weight_dtype: str | None = None) -> int:
    """Tokens per iteration (n_real) the scheduler fills up to.

    The larger of (a) the tokens that saturate the accelerator against the weight stream
    (GEMM time = transfer time; beyond it more tokens per pass only add compute time) and
    (b) the tokens at which a layer's fixed cost (`EngineCosts.group_fixed_s`: every expert
    active) is 10% of its time, rounded up to a power of
    two and clipped to [64, 32768]. KV capacity, not this budget, bounds most runs (Stage 1);
    the budget only has to be large enough not to bind first.
    """
    amortise = 9.0 * costs.group_fixed_s(cfg) / max(costs.token_s, 1e-15)
    n = max(tokens_to_saturate(cfg, hw, weight_dtype), amortise, MIN_BUDGET)
    return int(min(MAX_BUDGET, 1 << (int(n) - 1).bit_length()))


def split_costs(cfg: ModelConfig, costs: EngineCosts, kv_dtype: str | None = None) -> SplitCosts:
    """What VSLPipe's group split balances (layout.split_plan): per layer, a token's device
    cost plus its host K/V append, and a decode row's host attention per KV token read."""
    return SplitCosts(
        token_s=costs.token_s + costs.attn_s_per_token,
        kv_token_s=cfg.kv_bytes_per_token(kv_dtype) / cfg.num_layers * costs.attn_s_per_kv_byte)


def engine_config(cfg: ModelConfig, hw: HardwareSpec, costs: EngineCosts | None = None,
                  **overrides) -> EngineConfig:
    """An `EngineConfig` with the performance model's choices for this machine: the token
    budget (`default_token_budget`, unless given) and VSLPipe's split costs. `costs` default
    to the datasheet derivation of `hw`; `overrides` are `EngineConfig` fields
    (kv_cache_bytes is required)."""
    costs = costs or EngineCosts.from_hardware(cfg, hw)
    overrides.setdefault("token_budget", default_token_budget(cfg, hw, costs,
                                                              overrides.get("weight_dtype")))
    config = EngineConfig(**overrides)
    return dataclasses.replace(config, split=split_costs(cfg, costs, config.kv_dtype))


def machine_engine_config(cfg: ModelConfig, *, token_budget: int | None = None,
                          hardware: str | None = None, **settings) -> tuple[EngineConfig, str]:
    """The `EngineConfig` for a run on this machine, and where its token budget comes from:
    `token_budget` when given; else the performance model's choice from this machine's cached
    calibration (`experiments.calibrate`); else from the datasheet costs of the `hardware`
    preset; else `EngineConfig`'s default. A cached calibration also gives VSLPipe its split
    when the budget is given. `settings` are the other `EngineConfig` fields."""
    if token_budget is not None:
        settings = {**settings, "token_budget": token_budget}
    given = "token_budget" if token_budget is not None else None
    cal = cached(cfg)
    if cal is not None:
        return (engine_config(cfg, cal.hardware, cal.costs, **settings),
                given or f"perf model ({cal.hardware.name}, calibrated)")
    if hardware is not None:
        hw = get_hardware(hardware)
        return engine_config(cfg, hw, **settings), given or f"perf model ({hw.name} datasheet)"
    config = EngineConfig(**settings)
    return config, given or (f"default {config.token_budget} (no calibration cached; "
                             "python -m experiments.calibrate)")


def choose_precision(rates: dict[tuple[str, str], float], errors: dict[tuple[str, str], float],
                     max_logit_rel_err: float) -> tuple[str, str]:
    """The fastest (weight format, KV dtype) whose measured logits error (relative L2 against
    the model in its own dtype, `experiments.quant_accuracy`) is at most `max_logit_rel_err`.

    Args:
      rates: predicted generated tok/s per combination.
      errors: measured logits rel-L2 per combination (combinations without a measurement are
        not eligible).

    Raises:
      ValueError: no measured combination is within the threshold.
    """
    ok = [c for c in rates if c in errors and errors[c] <= max_logit_rel_err]
    if not ok:
        have = ", ".join(f"{w}/{kv} {e:.4f}" for (w, kv), e in sorted(errors.items()))
        raise ValueError(f"no measured (weight, KV) format is within logits rel-L2 "
                         f"{max_logit_rel_err}; measured: {have or 'none'}")
    return max(ok, key=lambda c: (rates[c], -errors[c]))
