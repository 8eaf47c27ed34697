"""Quantised weight streams: int8 per output channel and int4 per group of input rows in the
layer buffers, dequantised on the device as layers stream (bit-equal to the numpy reference),
the engine equal to the oracle of the quantised model, streamed bytes counted by the engine and
Stage 2 alike, and the error each format allows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moelens_jax as mj
from moelens_jax import perf, reference
from moelens_jax.model.model import Model
from moelens_jax.model.weights import (
    ALIGN,
    EXPERT_FIELDS,
    QUANTISED_FIELDS,
    LayerLayout,
    QuantisedMatrix,
    dequantise,
    int4_group,
    packet_bounds,
    packets,
    quantise,
    random_init,
    unpack_packets,
)
from moelens_jax.runtime import Engine, EngineConfig, Request
from moelens_jax.runtime.mover import WeightMover


def _model(preset, dtype="float32", seed=1, **changes):
    cfg = mj.get_preset(preset).replace(dtype=dtype, **changes)
    return Model(cfg, *random_init(cfg, seed=seed, init_std=0.1))


def test_int8_per_channel_bounds():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 40, 24)).astype(np.float32) * rng.uniform(0.01, 5, (3, 1, 24))
    w[1, :, 5] = 0.0  # an all-zero channel
    q, scale = quantise(w, "int8")
    assert q.dtype == np.int8 and q.shape == w.shape and scale.shape == (3, 24)
    assert np.abs(q).max() == 127 and scale[1, 5] == 1.0 and not q[1, :, 5].any()
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127 + (w == 0).all(1), rtol=1e-6)
    err = np.abs(dequantise(np, q, scale, np.float32) - w)
    assert (err <= scale[:, None, :] / 2 * (1 + 1e-6)).all()
    _same_bits_in_numpy_and_jax(q, scale, "int8")


def test_int4_grouped_bounds_and_packing():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 256, 8)).astype(np.float32)
    w[0, 128:, 3] *= 100  # one group of one channel far larger: only its own scale grows
    packed, scale = quantise(w, "int4")
    assert int4_group(256) == 128 and int4_group(224) == 32 and int4_group(64) == 64
    assert packed.dtype == np.int8 and packed.shape == (2, 128, 8) and scale.shape == (2, 2, 8)
    assert scale[0, 1, 3] > 50 * scale[0, 0, 3]
    lo = (packed.astype(np.int16) << 12) >> 12  # the low nibble, sign-extended: row 2j
    hi = packed.astype(np.int16) >> 4  # row 2j + 1
    codes = np.stack([lo, hi], axis=-2).reshape(2, 256, 8)
    assert codes.min() >= -7 and codes.max() <= 7 and np.abs(codes).max() == 7
    per_row = np.repeat(scale, 128, axis=1)
    np.testing.assert_array_equal(codes, np.rint(w / per_row))
    err = np.abs(dequantise(np, packed, scale, np.float32, "int4") - w)
    assert (err <= per_row / 2 * (1 + 1e-6)).all()
    _same_bits_in_numpy_and_jax(packed, scale, "int4")
    with pytest.raises(ValueError, match="no such group"):  # 2 x odd rows: use int8
        quantise(np.ones((3, 6 * 32 + 2, 4)), "int4")
    assert int4_group(96) == 32


def _same_bits_in_numpy_and_jax(stored, scale, weight_dtype):
    """numpy and jax.numpy dequantise to the same bits (the engine's oracle relies on it)."""
    for dt in (np.float32, jnp.bfloat16):
        a = np.asarray(dequantise(np, stored, scale, dt, weight_dtype))
        b = np.asarray(dequantise(jnp, jnp.asarray(stored), jnp.asarray(scale), dt,
                                  weight_dtype))
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@pytest.mark.parametrize("weight_dtype", ["int8", "int4"])
@pytest.mark.parametrize("preset,dtype", [("tiny-qwen2-moe", "bfloat16"),
                                          ("tiny-qwen3-moe", "float32")])
def test_quantised_layer_unpacks_bit_exact_from_any_packets(preset, dtype, weight_dtype):
    """Shared experts, qkv bias and q/k norms included: every field unpacks to the numpy
    dequantisation (matrices) or the stored value (the rest), whatever the packet cut."""
    model = _model(preset, dtype)
    layer = model.host_layers[1].quantise(weight_dtype)
    assert layer.layout.weight_dtype == weight_dtype
    want = layer.dequantised_numpy()
    for pk in (4096, 10_000, 1 << 30):
        bounds = packet_bounds(layer.layout.nbytes, pk)
        got = unpack_packets(layer.layout, bounds,
                             tuple(jnp.asarray(p) for p in packets(layer.buffer, pk)))
        for name in (s.name for s in model.host_layers[1].layout.slots):
            g, w = np.asarray(getattr(got, name)), np.asarray(getattr(want, name))
            assert g.dtype == w.dtype and g.shape == w.shape
            if name in QUANTISED_FIELDS:  # dequantised to the model dtype
                assert str(g.dtype) == dtype
            np.testing.assert_array_equal(g.view(np.uint8), w.view(np.uint8))
    stored = {s.name for s in layer.layout.slots}
    assert {n for n in QUANTISED_FIELDS if n in stored} == {
        n for n in stored if n + ".scale" in stored}


def test_quantised_layouts_stream_a_half_and_a_quarter_of_bf16():
    for preset in ("small-mixtral", "mixtral-8x7b", "qwen3-30b-a3b"):
        cfg = mj.get_preset(preset)
        bf16 = LayerLayout.for_config(cfg, "bfloat16").nbytes
        int8 = LayerLayout.for_config(cfg, "bfloat16", "int8").nbytes
        int4 = LayerLayout.for_config(cfg, "bfloat16", "int4").nbytes
        assert 0.5 < int8 / bf16 < 0.52, (preset, int8 / bf16)
        assert 0.25 < int4 / bf16 < 0.27, (preset, int4 / bf16)  # + a scale per 128 codes
        assert perf.layer_bytes(cfg, "int8") == int8 and perf.layer_bytes(cfg, "int4") == int4
    with pytest.raises(ValueError, match="weight_dtype must be one of"):
        LayerLayout.for_config(cfg, "bfloat16", "int3")


@pytest.mark.parametrize("pipeline,weight_dtype", [("serial", "int8"), ("vslpipe", "int8"),
                                                   ("serial", "int4")])
def test_engine_on_quantised_weights_equals_its_oracle(pipeline, weight_dtype):
    """The oracle is the quantised model's own forward (its weights dequantised): the engine
    streams the int8 layers, dequantises on the device (the routed experts inside the expert
    kernel's GEMMs on the CPU backend) and must produce the same tokens; it moves the int8
    bytes, which Stage 2 charges."""
    model = _model("tiny-mixtral", num_layers=3).quantised(weight_dtype)  # > the window
    cfg = model.config
    rng = np.random.default_rng(4)
    reqs = [Request(tuple(rng.integers(0, cfg.vocab_size, n).tolist()), g)
            for n, g in ((1, 6), (17, 4), (40, 9), (5, 3))]
    want = reference.greedy_generate(model, [r.prompt for r in reqs],
                                     [r.max_new_tokens for r in reqs])
    config = EngineConfig(kv_cache_bytes=2048 * cfg.kv_bytes_per_token("float32"),
                          weight_dtype=weight_dtype, pipeline=pipeline, device_weight_layers=2)
    with Engine(model, config) as eng:
        assert not eng.mover.resident  # a quantised model streams, even on a CPU
        assert [r.tokens for r in eng.generate(reqs)] == want
        layer = model.host_layers[0].layout.nbytes
        passes = eng.stats.iterations * cfg.num_layers  # (a prefetch may run one ahead)
        assert passes <= eng.stats.h2d_bytes // layer <= passes + 2
        assert eng.stats.h2d_bytes % layer == 0
        # on the CPU backend the routed experts reach the expert kernel as codes + scales
        # (dequantised inside its GEMMs); everything else is unpacked to the model dtype
        lw = eng.mover.get(0)
        assert all(isinstance(getattr(lw, n), QuantisedMatrix) for n in EXPERT_FIELDS)
        assert lw.wq.dtype == jnp.float32 and lw.w_gate.codes.dtype == jnp.int8
        # device memory: the window holds unpacked layers (experts at their stored size), the
        # one in flight its packets too
        typed, stored = LayerLayout.for_config(cfg, "float32"), model.host_layers[0].layout
        experts = lambda lay: sum(s.nbytes for s in lay.slots  # noqa: E731
                                  if s.name.split(".")[0] in EXPERT_FIELDS)
        held = typed.nbytes - experts(typed) + experts(stored)
        leaves = sum(a.nbytes for a in jax.tree.leaves(lw))  # what the mover hands over
        assert leaves <= held < leaves + ALIGN * (len(typed.slots) + len(EXPERT_FIELDS))
        assert held < typed.nbytes
        assert eng.mover.device_bytes() == 3 * held + layer  # window 2 + 1 in flight
    assert perf.streamed_bytes(cfg, config, on_cpu=True) == cfg.num_layers * layer
    with pytest.raises(ValueError, match=f"stores its layers as {weight_dtype}"):
        Engine(model, kv_cache_bytes=config.kv_cache_bytes)
    with pytest.raises(ValueError, match="cannot be used in place"):
        WeightMover(model, depth=1, resident=True)
    with pytest.raises(ValueError, match="already quantised"):
        model.quantised("int8")
    with pytest.raises(ValueError, match="needs the float model"):
        mj.save_model(model, "/nonexistent")


def test_quantised_weights_change_the_model_by_what_the_format_allows():
    """What each format costs on a tiny model (init std 0.02): logits next to the float32
    model's, and next to what rounding the same weights to bf16 costs. Measured: int8 rel-L2
    0.0065 (bf16 0.0037), top-1 agreement 0.98; int4 (groups of 32-64 rows here) 0.115 and
    0.88. A wrong scale axis, a truncating round or swapped nibbles fail these bounds by far."""
    cfg = mj.get_preset("tiny-mixtral").replace(dtype="float32")
    model = Model(cfg, *random_init(cfg, seed=2, init_std=0.02))
    bf16 = Model(cfg.replace(dtype="bfloat16"),
                 *random_init(cfg.replace(dtype="bfloat16"), seed=2, init_std=0.02))
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 32))
    a = np.asarray(model.forward(tokens))
    err = {}
    for name, m in (("bf16", bf16), ("int8", model.quantised("int8")),
                    ("int4", model.quantised("int4"))):
        b = np.asarray(m.forward(tokens))
        err[name] = (np.linalg.norm(a - b) / np.linalg.norm(a), (a.argmax(-1) ==
                                                                 b.argmax(-1)).mean())
    assert err["int8"][0] < 0.015 and err["int8"][0] < 3 * err["bf16"][0], err
    assert err["int8"][1] >= 0.95 and err["int4"][1] >= 0.8, err
    assert err["int8"][0] < err["int4"][0] < 0.2, err
    assert model.quantised("int4").weight_bytes < model.quantised("int8").weight_bytes < (
        0.6 * model.weight_bytes)
