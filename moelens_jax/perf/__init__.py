"""The MoE-Lens performance model: hardware specs, Stage 1 (bound), Stage 2 (simulation)."""

from moelens_jax.perf.calibrate import cached, calibrate, fingerprint
from moelens_jax.perf.hardware import PRESETS, HardwareSpec, get_hardware
from moelens_jax.perf.lightning import LightningPolicy, lightning_policy
from moelens_jax.perf.policy import default_token_budget, split_costs
from moelens_jax.perf.stage1 import (
    Stage1Result,
    Workload,
    overlap_factor,
    paper_table2,
    pme,
    stage1,
    tokens_to_saturate,
    tokens_to_saturate_approx,
    workload_pme,
)
from moelens_jax.perf.stage2 import Stage2Result, engine_pages, iteration_seconds, predict

__all__ = ["HardwareSpec", "PRESETS", "get_hardware", "calibrate", "fingerprint", "Workload",
           "Stage1Result", "Stage2Result", "stage1", "predict", "pme", "workload_pme",
           "overlap_factor", "paper_table2", "tokens_to_saturate", "tokens_to_saturate_approx",
           "iteration_seconds", "engine_pages", "default_token_budget", "split_costs", "cached",
           "LightningPolicy", "lightning_policy"]
