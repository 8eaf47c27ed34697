"""moelens-jax: high-throughput offline MoE inference with host-resident weights (MoE-Lens).

The research API:

* `ModelConfig`, `get_preset`, `preset_names` — model shapes (real checkpoints and small demos);
* `load_model` / `save_model` — HF safetensors folders, orbax folders, presets -> `Model`;
* `Model.forward` — the full-sequence reference path; `reference` — slow oracles;
* `Engine`, `Request`, `SamplingParams` — offline batch generation (MoE-Lens scheduling, paged
  host KV cache, CPU decode attention, streamed weights).
"""

from moelens_jax.checkpoint import CheckpointError, load_model, save_model
from moelens_jax.config import ConfigError, ModelConfig, get_preset, preset_names
from moelens_jax.model import Model, TokenError
from moelens_jax.runtime import Engine, EngineConfig, GenerationResult, Request, SamplingParams

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "Engine", "EngineConfig", "GenerationResult", "Model",
           "ModelConfig",
           "Request", "SamplingParams", "TokenError", "get_preset", "load_model", "preset_names",
           "save_model"]
