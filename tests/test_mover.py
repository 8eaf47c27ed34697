"""The weight mover: bit-exact device weights from the contiguous host buffers, the window,
the link-bandwidth cap, and the engine's outputs unchanged by streaming."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import moelens_jax as mj
from moelens_jax import reference
from moelens_jax.model.model import Model
from moelens_jax.model.weights import random_init
from moelens_jax.runtime import Engine, Request
from moelens_jax.runtime.mover import WeightMover, unpack_layer


def _model(layers=4, dtype="float32"):
    cfg = mj.get_preset("tiny-qwen2-moe").replace(dtype=dtype, num_layers=layers)
    return Model(cfg, *random_init(cfg, seed=3, init_std=0.1))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_unpacked_layer_is_bit_identical_to_host_views(dtype):
    model = _model(dtype=dtype)
    layer = model.host_layers[2]
    dev = unpack_layer(layer.layout, jax.device_put(layer.buffer))
    for slot in layer.layout.slots:
        host = np.asarray(getattr(layer.weights, slot.name))
        got = np.asarray(getattr(dev, slot.name))
        assert got.dtype == host.dtype and got.shape == host.shape
        np.testing.assert_array_equal(got.view(np.uint8), host.view(np.uint8))


def test_window_streams_every_layer_each_pass():
    model = _model(layers=5)
    mover = WeightMover(model, depth=2, resident=False)
    for _ in range(3):  # three passes over the model, as three iterations would make
        for layer in range(5):
            lw = mover.get(layer)
            np.testing.assert_array_equal(np.asarray(lw.router),
                                          np.asarray(model.host_layers[layer].weights.router))
            assert len(mover._window) <= 2
    # first pass 5 layers + wrap-around prefetches; every later layer fetched once per pass
    assert mover.bytes_moved >= 15 * mover.layer_bytes
    mover.close()


def test_whole_model_window_loads_each_layer_once():
    model = _model(layers=3)
    mover = WeightMover(model, depth=8, resident=False)
    for _ in range(4):
        for layer in range(3):
            mover.get(layer)
    assert mover.depth == 3 and mover.bytes_moved == 3 * mover.layer_bytes
    mover.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_device_uses_layers_in_place(dtype):
    model = _model(layers=3, dtype=dtype)
    mover = WeightMover(model, depth=2)  # CPU device, no cap: resident by default
    assert mover.resident and mover.depth == 3
    for _ in range(2):
        for layer in range(3):
            lw, host = mover.get(layer), model.host_layers[layer].weights
            for name in ("w_gate", "router", "attn_norm"):  # zero-copy views of the host buffer
                assert getattr(lw, name).unsafe_buffer_pointer() == getattr(host, name).ctypes.data
    assert mover.bytes_moved == 0 and mover.h2d_gb_per_s is None
    assert not WeightMover(model, depth=2, h2d_limit_gb_per_s=1.0).resident  # a cap streams
    mover.close()


def test_link_bandwidth_cap_is_respected():
    model = _model(layers=3)
    limit = 0.02  # GB/s
    mover = WeightMover(model, depth=2, h2d_limit_gb_per_s=limit)
    for _ in range(2):
        for layer in range(3):
            mover.get(layer)
    assert 0.5 * limit < mover.h2d_gb_per_s <= limit * 1.02
    mover.close()


@pytest.mark.parametrize("depth,limit,dev_mem", [(1, None, 10**12), (2, None, 10**12),
                                                 (3, 0.5, None), (2, None, None)])
def test_engine_outputs_do_not_depend_on_streaming(depth, limit, dev_mem):
    model = _model()
    rng = np.random.default_rng(5)
    reqs = [Request(tuple(rng.integers(0, 256, n).tolist()), g)
            for n, g in zip([1, 9, 30, 17, 4], [5, 3, 8, 6, 2], strict=True)]
    want = reference.greedy_generate(model, [r.prompt for r in reqs],
                                     [r.max_new_tokens for r in reqs])
    eng = Engine(model, kv_cache_bytes=2048 * model.config.kv_bytes_per_token("float32"),
                 device_weight_layers=depth, h2d_limit_gb_per_s=limit,
                 device_memory_bytes=dev_mem)
    # A device-memory cap or a link cap emulates an accelerator: the layers stream.
    assert eng.mover.resident == (limit is None and dev_mem is None)
    assert [r.tokens for r in eng.generate(reqs)] == want
    streamed = 0 if eng.mover.resident else eng.stats.iterations * (4 - depth)
    assert eng.stats.h2d_bytes >= streamed * eng.mover.layer_bytes
    assert eng.mover.resident == (eng.stats.h2d_bytes == 0)
    if limit:
        assert eng.stats.h2d_gb_per_s <= limit * 1.02


def test_bad_mover_settings():
    model = _model()
    with pytest.raises(ValueError, match="device_weight_layers must be >= 1"):
        WeightMover(model, depth=0)
    with pytest.raises(ValueError, match="h2d_limit_gb_per_s must be positive"):
        WeightMover(model, h2d_limit_gb_per_s=0)
    with pytest.raises(ValueError, match="device_memory_bytes=1000 is too small"):
        Engine(model, kv_cache_bytes=1 << 20, device_memory_bytes=1000)
