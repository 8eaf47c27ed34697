"""The MoE-Lens performance model: hardware rates, engine cost terms, Stage 1 (bound), Stage 2
(simulation of the engine's own scheduler), and the schedule choices it makes."""

from moelens_jax.perf.calibrate import Calibration, cached, calibrate, fingerprint, speed_probe
from moelens_jax.perf.costs import EngineCosts
from moelens_jax.perf.hardware import PRESETS, HardwareSpec, get_hardware
from moelens_jax.perf.lightning_planner import LightningHardware, LightningPlan
from moelens_jax.perf.policy import (
    choose_precision,
    default_token_budget,
    engine_config,
    machine_engine_config,
    split_costs,
)
from moelens_jax.perf.stage1 import (
    Stage1Result,
    Workload,
    layer_bytes,
    overlap_factor,
    paper_table2,
    pme,
    stage1,
    tokens_to_saturate,
    tokens_to_saturate_approx,
    workload_pme,
)
from moelens_jax.perf.stage2 import (
    DataParallelResult,
    Stage2Result,
    engine_pages,
    predict,
    predict_data_parallel,
    streamed_bytes,
)

__all__ = ["HardwareSpec", "EngineCosts", "Calibration", "PRESETS", "get_hardware", "calibrate",
           "fingerprint", "Workload", "Stage1Result", "Stage2Result", "stage1", "predict", "pme",
           "workload_pme", "overlap_factor", "paper_table2", "tokens_to_saturate",
           "tokens_to_saturate_approx", "engine_pages", "streamed_bytes",
           "default_token_budget", "split_costs", "engine_config", "machine_engine_config",
           "cached", "LightningHardware", "DataParallelResult", "predict_data_parallel",
           "layer_bytes", "choose_precision", "speed_probe",
           "LightningPlan"]
