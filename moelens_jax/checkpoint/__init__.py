"""Checkpoints: HF safetensors folders (`hf`), orbax folders (`orbax_io`), and `load_model`."""

from __future__ import annotations

import os

from moelens_jax.checkpoint.hf import load_hf, save_hf
from moelens_jax.checkpoint.orbax_io import CONFIG_FILE, load_orbax, save_model
from moelens_jax.checkpoint.safetensors_io import CheckpointError
from moelens_jax.config import ConfigError, get_preset, preset_names
from moelens_jax.model.model import Model
from moelens_jax.model.weights import random_init


def load_model(path_or_preset, *, dtype: str | None = None, seed: int = 0,
               progress: bool = False) -> Model:
    """Loads a HF checkpoint folder, an orbax folder (`Model.save`), or a preset (random init).

    Args:
      path_or_preset: a folder, or one of `moelens_jax.config.preset_names()`.
      dtype: storage dtype ("bfloat16", "float16", "float32"); default: the checkpoint's dtype
        (bf16 checkpoints load as bf16), or the preset's.
      seed: random-init seed for presets (ignored for checkpoints).
      progress: progress bar while loading a HF checkpoint.
    """
    p = os.fspath(path_or_preset)
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, CONFIG_FILE)):
            return load_orbax(p, dtype=dtype)
        if os.path.isfile(os.path.join(p, "config.json")):
            return load_hf(p, dtype=dtype, progress=progress)
        raise FileNotFoundError(f"{p}: missing config.json (HF checkpoint) and {CONFIG_FILE} "
                                "(orbax checkpoint)")
    if p in preset_names():
        cfg = get_preset(p)
        if not cfg.runnable:
            raise ConfigError(f"preset {p!r} is shape-only (family {cfg.family}); use its "
                              "config with the performance model instead")
        cfg = cfg.replace(dtype=dtype or cfg.dtype)
        layers, rest = random_init(cfg, seed=seed)
        return Model(cfg, layers, rest, source=f"preset:{p}:seed={seed}")
    if os.path.exists(p):
        raise FileNotFoundError(f"{p} is not a checkpoint folder")
    raise FileNotFoundError(f"{p!r} is neither an existing checkpoint folder nor a preset "
                            f"(presets: {', '.join(preset_names())})")


__all__ = ["CheckpointError", "load_hf", "load_model", "load_orbax", "save_hf", "save_model"]
