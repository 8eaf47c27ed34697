"""Full-size presets shape-checked under jax.eval_shape (zero allocation), and the host layout."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moelens_jax as mj
from moelens_jax.config import get_preset
from moelens_jax.model import transformer
from moelens_jax.model.weights import (
    ALIGN,
    LayerLayout,
    abstract_weights,
    layer_shapes,
    weights_nbytes,
)

FULL_SIZE = ["mixtral-8x7b", "mixtral-8x22b", "qwen2-57b-a14b", "qwen3-30b-a3b"]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_forward_shapes_without_allocation(name):
    cfg = get_preset(name)
    weights = abstract_weights(cfg)
    assert weights_nbytes(weights) == cfg.total_weight_bytes  # ~0.1-0.3 TB, never allocated
    before = _rss_bytes()
    out = jax.eval_shape(functools.partial(transformer.forward, cfg), weights,
                         jax.ShapeDtypeStruct((2, 7), jnp.int32))
    assert out.shape == (2, 7, cfg.vocab_size) and out.dtype == jnp.float32
    assert _rss_bytes() - before < 512 * 2**20


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_layer_stages(name):
    cfg = get_preset(name)
    lw = abstract_weights(cfg).layers[0]
    x = jax.ShapeDtypeStruct((5, cfg.hidden_size), jnp.float32)
    pos = jax.ShapeDtypeStruct((5,), jnp.int32)
    q, k, v = jax.eval_shape(functools.partial(transformer.pre_attention, cfg), lw, x, pos)
    assert q.shape == (5, cfg.num_heads, cfg.head_dim)
    assert k.shape == v.shape == (5, cfg.num_kv_heads, cfg.head_dim)
    y = jax.eval_shape(functools.partial(transformer.post_attention, cfg), lw, x, q)
    assert y.shape == (5, cfg.hidden_size)


@pytest.mark.parametrize("name", [*FULL_SIZE, "dbrx", "tiny-qwen2-moe"])
def test_layer_layout_is_aligned_and_complete(name):
    cfg = get_preset(name)
    layout = LayerLayout.for_config(cfg)
    assert [s.name for s in layout.slots] == list(layer_shapes(cfg))
    assert all(s.offset % ALIGN == 0 for s in layout.slots)
    ends = [s.offset + s.nbytes for s in layout.slots]
    assert all(e <= s.offset for e, s in zip(ends, layout.slots[1:], strict=False))  # no overlap
    assert sum(s.nbytes for s in layout.slots) == cfg.weight_bytes_per_layer
    assert cfg.weight_bytes_per_layer <= layout.nbytes < cfg.weight_bytes_per_layer + \
        ALIGN * len(layout.slots)


@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_layer_weights_are_views_of_one_contiguous_buffer(preset):
    model = mj.load_model(preset)
    for layer in model.host_layers:
        assert layer.buffer.flags.c_contiguous and layer.buffer.ctypes.data % ALIGN == 0
        leaves = jax.tree.leaves(layer.weights)
        assert len(leaves) == len(layer.layout.slots)
        for leaf in leaves:
            assert np.shares_memory(leaf, layer.buffer)
        # Writing through the buffer is visible in the typed views (same memory).
        before = np.array(layer.weights.wq)
        layer.buffer[:] = 0
        assert not np.any(np.asarray(layer.weights.wq, np.float32)) and np.any(before)


def test_random_init_is_deterministic():
    a = mj.load_model("tiny-qwen2-moe", seed=3)
    b = mj.load_model("tiny-qwen2-moe", seed=3)
    c = mj.load_model("tiny-qwen2-moe", seed=4)
    assert all(np.array_equal(x.buffer, y.buffer) for x, y in zip(a.host_layers, b.host_layers,
                                                                    strict=True))
    assert not np.array_equal(a.host_layers[0].buffer, c.host_layers[0].buffer)
