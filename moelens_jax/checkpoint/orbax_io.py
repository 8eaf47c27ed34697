"""Orbax checkpoints of a `Model`: ``moelens_config.json`` + an orbax ``weights/`` item.

The tree saved is ``{"embed", "final_norm", ["lm_head"], "layers": {"<i>": {field: array}}}``
with tensors named as in `LayerWeights` and stored in the model's dtype. Restore reads against an
abstract tree built from the config (so a checkpoint that does not match its config fails with a
clear error) and repacks each layer into its contiguous host buffer.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp

from moelens_jax.checkpoint.safetensors_io import CheckpointError
from moelens_jax.config import ModelConfig
from moelens_jax.model.model import Model
from moelens_jax.model.weights import (
    NP_DTYPES,
    HostLayer,
    LayerLayout,
    abstract_weights,
    layer_shapes,
)

CONFIG_FILE = "moelens_config.json"
WEIGHTS_DIR = "weights"


def _tree(cfg: ModelConfig, weights) -> dict:
    fields = layer_shapes(cfg)
    tree = {"embed": weights.embed, "final_norm": weights.final_norm,
            "layers": {str(i): {f: getattr(lw, f) for f in fields}
                       for i, lw in enumerate(weights.layers)}}
    if not cfg.tie_word_embeddings:
        tree["lm_head"] = weights.lm_head
    return tree


def save_model(model: Model, path) -> None:
    """Writes `model` to a new folder `path` (which must not exist)."""
    model.require_pageable("saving")
    model.require_float("saving")
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path):
        raise FileExistsError(f"{path} already exists; choose a new folder")
    os.makedirs(path)
    cfg = model.config.replace(dtype=model.dtype)
    with open(os.path.join(path, CONFIG_FILE), "w") as f:
        json.dump({"format": "moelens-jax/orbax", "version": 1, "config": cfg.to_dict()}, f,
                  indent=2)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(path, WEIGHTS_DIR), _tree(cfg, model.weights))


def _check_against(path: str, abstract: dict, restored: dict) -> None:
    """Orbax returns whatever shapes were saved; insist they are what the config implies."""
    want = jax.tree_util.tree_flatten_with_path(abstract)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(restored)[0])
    for key, spec in want:
        name = jax.tree_util.keystr(key)
        arr = got.get(key)
        if arr is None:
            raise CheckpointError(f"{path}: missing tensor {name}")
        if tuple(arr.shape) != tuple(spec.shape) or np.dtype(arr.dtype) != np.dtype(spec.dtype):
            raise CheckpointError(
                f"{path}: tensor {name} is {np.dtype(arr.dtype)}{list(arr.shape)}, the config "
                f"implies {np.dtype(spec.dtype)}{list(spec.shape)}")


def load_orbax(path, dtype: str | None = None) -> Model:
    """Restores a folder written by `save_model`; `dtype` converts after restoring."""
    path = os.path.abspath(os.fspath(path))
    try:
        with open(os.path.join(path, CONFIG_FILE)) as f:
            meta = json.load(f)
        cfg = ModelConfig.from_dict(meta["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {CONFIG_FILE}: {e!r}") from e
    abstract = _tree(cfg, abstract_weights(cfg))
    try:
        with ocp.StandardCheckpointer() as ckptr:
            restored = ckptr.restore(os.path.join(path, WEIGHTS_DIR), abstract)
    except Exception as e:  # orbax raises many types; name the checkpoint
        raise CheckpointError(f"{path}: cannot restore orbax weights: {e}") from e
    _check_against(path, abstract, restored)

    out_cfg = cfg.replace(dtype=dtype or cfg.dtype)
    np_dtype = NP_DTYPES[out_cfg.dtype]
    layout = LayerLayout.for_config(out_cfg)
    layers = []
    for i in range(cfg.num_layers):
        layer = HostLayer.allocate(layout)
        src = restored["layers"].pop(str(i))  # drop restored arrays as we go: peak ~1x + 1 layer
        for field, arr in src.items():
            getattr(layer.weights, field)[...] = np.asarray(arr)
        layers.append(layer)
    rest = {k: np.asarray(jax.device_get(restored[k])).astype(np_dtype)
            for k in ("embed", "final_norm", "lm_head") if k in restored}
    return Model(out_cfg, layers, rest, source=path)
