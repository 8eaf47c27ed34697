"""GPU readiness, checked on a CPU: the accelerator's code paths compiled here at real model
shapes (XLA's memory analysis), the weight mover's packets and pinned staging, the device
memory plan, and the clear error when JAX has no CPU backend for stage C."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moelens_jax as mj
from moelens_jax import perf, reference
from moelens_jax.model import moe
from moelens_jax.model.stages import tiled_prefill_attention
from moelens_jax.model.weights import unpack_packets
from moelens_jax.runtime import EngineConfig, memory
from moelens_jax.runtime import engine as engine_mod
from moelens_jax.runtime.engine import Engine
from moelens_jax.runtime.layout import tile_pair_count
from moelens_jax.runtime.mover import WeightMover, resident_bytes
from moelens_jax.runtime.requests import Request

GiB = 2**30


@pytest.mark.parametrize("prompt_len", [926, 32768])
def test_accelerator_ga_temporaries_at_mixtral_scale(prompt_len):
    """One GA call on the accelerator path (tiled prefill attention) at Mixtral-8x7B shapes
    with a 32,768-token iteration of RAG-like 926-token prompts (~5k tile pairs), or one
    32,768-token prompt (~131k pairs): <= 4 GiB of temporaries, independent of the pair count.
    All pairs in one chunk (the layout before chunking) needs ~17 GiB."""
    cfg = mj.config.get_preset("mixtral-8x7b")
    n = 32768
    mem = memory.compiled_ga_memory(cfg, n, "bfloat16", prompt_len,
                                    attention=tiled_prefill_attention)
    assert mem.temp_size_in_bytes <= 4 * GiB, mem.temp_size_in_bytes / GiB
    if prompt_len == 926:
        pairs = tile_pair_count([prompt_len] * (n // prompt_len), 0)
        all_at_once = functools.partial(tiled_prefill_attention, chunk=pairs)
        unchunked = memory.compiled_ga_memory(cfg, n, "bfloat16", prompt_len,
                                              attention=all_at_once)
        assert unchunked.temp_size_in_bytes > 4 * GiB


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b", "qwen2-57b-a14b",
                                    "tiny-qwen3-moe"])
@pytest.mark.parametrize("n", [1024, 32768])
def test_activation_bound_covers_xla_memory_analysis(preset, n):
    """The device plan's activation bound against XLA's memory analysis of the same GA and GB
    code compiled here (float32 weights: the widest activations): never below it, and at most
    2x above it, so the plan neither overcommits nor wastes half the device. Covers GQA with 8
    experts (Mixtral), 128 experts top-8 (Qwen3), a shared expert (Qwen2) and a tiny model."""
    cfg = mj.config.get_preset(preset)
    ga = memory.compiled_ga_memory(cfg, n, "float32", attention=tiled_prefill_attention)
    blocked = functools.partial(moe.expert_ffn, impl="blocked")  # the accelerators' path
    gb = memory.compiled_gb_memory(cfg, n, "float32", expert_ffn=blocked)
    for name, got, bound in [
            ("GA", ga.temp_size_in_bytes + ga.output_size_in_bytes,
             memory.ga_activation_bytes(cfg, n)),
            ("GB", gb.temp_size_in_bytes + gb.output_size_in_bytes,
             memory.gb_activation_bytes(cfg, n, "float32"))]:
        assert got <= bound <= 2 * got, (name, got / GiB, bound / GiB)


def test_max_iteration_rows_is_the_worst_split():
    from moelens_jax.runtime.layout import padded_rows

    def one(b):
        return max(padded_rows(b - d, d) for d in range(b + 1))

    for budget in [1, 7, 64, 100, 333, 2048, 3000]:
        assert memory.max_iteration_rows(budget) == one(budget)
        # Two groups padded apart (VSLPipe): never below any split, and not far above.
        two = max(one(a) + one(budget - a) for a in range(budget + 1))
        assert two <= memory.max_iteration_rows(budget, groups=2) <= 1.1 * two + 64


def test_plan_lowers_the_budget_to_the_largest_that_fits(caplog):
    cfg = mj.config.get_preset("mixtral-8x7b")
    weights = 10 * GiB

    def act(b):
        return memory.stage_activation_bytes(cfg, memory.max_iteration_rows(b), "bfloat16")

    cap = weights + act(4096) + 1
    with caplog.at_level(logging.WARNING):
        plan = memory.plan_device_memory(cfg, "bfloat16", 32768, weights, cap)
    assert 4096 <= plan.token_budget < 32768
    assert act(plan.token_budget) <= cap - weights < act(plan.token_budget + 1)
    assert plan.reason and "32768 ->" in plan.reason and "32768 ->" in caplog.text
    roomy = memory.plan_device_memory(cfg, "bfloat16", 2048, weights, 100 * GiB)
    assert roomy.token_budget == 2048 and roomy.reason is None
    # The longest prompt that fits alone: its rows' activations fit, one row bucket more not.
    from moelens_jax.runtime.layout import row_bucket
    n = roomy.max_prompt_tokens
    act_alone = lambda k: memory.stage_activation_bytes(cfg, row_bucket(k), "bfloat16")  # noqa
    assert act_alone(n) <= 90 * GiB < act_alone(n + 1)
    with pytest.raises(ValueError, match="too small: the weights"):
        memory.plan_device_memory(cfg, "bfloat16", 2048, weights, weights - 1)
    with pytest.raises(ValueError, match="1-token iteration"):
        memory.plan_device_memory(cfg, "bfloat16", 2048, weights, weights + 1000)


def _tiny():
    return mj.load_model("tiny-mixtral", dtype="float32", seed=3)


def test_engine_checks_device_memory_before_allocating(monkeypatch):
    """Weights that cannot fit fail before the KV pool (host memory) is allocated."""
    model = _tiny()

    def no_store(*a, **k):
        raise AssertionError("the KV pool was allocated before the device-memory check")

    monkeypatch.setattr(engine_mod.PagedKVStore, "for_model", no_store)
    with pytest.raises(ValueError, match="device_memory_bytes=1000 is too small"):
        Engine(model, kv_cache_bytes=1 << 20, device_memory_bytes=1000)


def test_engine_lowers_token_budget_to_fit_device_memory(caplog):
    """A cap that holds the weights but not the activations of the requested budget: the
    engine runs with the planned budget (logged) and gives the oracle's tokens."""
    model = _tiny()
    cfg = model.config
    depth = 2  # the window, plus one layer in flight
    weights = resident_bytes(model) + (depth + 1) * model.host_layers[0].layout.nbytes
    act = memory.stage_activation_bytes(cfg, memory.max_iteration_rows(64), model.dtype)
    with caplog.at_level(logging.WARNING):
        eng = Engine(model, kv_cache_bytes=4096 * cfg.kv_bytes_per_token("float32"),
                     token_budget=4096, device_weight_layers=depth,
                     device_memory_bytes=weights + act)
    assert 64 <= eng.config.token_budget < 4096
    assert eng.device_plan.reason and "token_budget 4096 ->" in caplog.text
    rng = np.random.default_rng(0)
    reqs = [Request(tuple(rng.integers(0, cfg.vocab_size, n).tolist()), 4) for n in (40, 90, 7)]
    want = reference.greedy_generate(model, [r.prompt for r in reqs], [4] * 3)
    assert [r.tokens for r in eng.generate(reqs)] == want
    assert max(it.shape.tokens for it in eng.stats.per_iteration) <= max(
        eng.config.token_budget, 90)  # a prompt longer than the budget runs alone
    # A prompt whose lone iteration cannot fit is rejected; the rest of the batch completes.
    too_long = eng.device_plan.max_prompt_tokens + 1
    res = eng.generate([Request((1,) * too_long, 2), reqs[0]])
    assert res[0].finish_reason == "rejected" and "do not fit the device" in res[0].error
    assert res[1].tokens == want[0]
    eng.close()


def test_engine_without_cpu_backend_says_what_to_set(monkeypatch):
    real = jax.devices

    def devices(backend=None):
        if backend == "cpu":
            raise RuntimeError("Unknown backend cpu")
        return real(backend)

    monkeypatch.setattr(jax, "devices", devices)
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    with pytest.raises(RuntimeError, match="JAX_PLATFORMS=cuda,cpu"):
        Engine(_tiny(), kv_cache_bytes=1 << 20)


@pytest.mark.parametrize("packet_bytes", [4096, 10_000, 1 << 30])
def test_mover_packets_from_pinned_staging(packet_bytes):
    """Layers copied in packets from pinned host memory (staged once per model, shared by
    movers) arrive bit-exact; one transfer per packet; the model reports the staged bytes."""
    model = _tiny()
    layer_bytes = model.host_layers[0].layout.nbytes
    movers = [WeightMover(model, depth=2, resident=False, pinned=True, packet_bytes=packet_bytes)
              for _ in range(2)]
    assert movers[0]._src is movers[1]._src  # staged once, shared
    assert all(p.sharding.memory_kind == "pinned_host" for p in movers[0]._src[0])
    assert model.host_bytes == 2 * model.weight_bytes - resident_bytes(model)
    m = movers[0]
    for layer in range(model.config.num_layers):
        got = m.get(layer)
        for name in got.__dataclass_fields__:
            a, b = getattr(got, name), getattr(model.host_layers[layer].weights, name)
            if a is None:
                assert b is None
                continue
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    per_layer = -(-layer_bytes // packet_bytes)
    assert m.transfers == per_layer * m.bytes_moved // layer_bytes
    assert m.bytes_moved >= model.config.num_layers * layer_bytes
    for mv in movers:
        mv.close()


@pytest.mark.parametrize("pinned", [False, True])
@pytest.mark.parametrize("kept_fraction", [0.01, 0.37, 0.99])
def test_mover_keeps_a_prefix_of_every_layer(pinned, kept_fraction):
    """MoE-Lightning's partial residency: a mover keeping the first bytes of every layer on
    the device streams only the rest each pass (counted and throttled), holds the prefix of
    every layer plus the window, and unpacks bit-exact weights (slots across the cut)."""
    model = _tiny()
    layer_bytes = model.host_layers[0].layout.nbytes
    kept = int(kept_fraction * layer_bytes) // 256 * 256
    L = model.config.num_layers
    mover = WeightMover(model, depth=2, resident=False, pinned=pinned, packet_bytes=4096,
                        kept_bytes=kept)
    for layer in range(L):
        got = mover.get(layer)
        for name in got.__dataclass_fields__:
            a, b = getattr(got, name), getattr(model.host_layers[layer].weights, name)
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    mover.close()
    assert mover.bytes_moved == L * (layer_bytes - kept)
    assert mover.transfers == L * -(-(layer_bytes - kept) // 4096)
    assert mover.device_bytes() == L * kept + min(3, L) * (layer_bytes - kept)
    with pytest.raises(ValueError, match="kept_bytes must lie in"):
        WeightMover(model, resident=False, kept_bytes=layer_bytes)


def test_engine_keeping_weights_on_device_streams_less():
    """`resident_weight_fraction` keeps part of every layer on the (emulated) device: same
    tokens as the oracle, fewer streamed bytes, and Stage 2 charges exactly those bytes."""
    model = _tiny()
    cfg = model.config
    rng = np.random.default_rng(3)
    reqs = [Request(tuple(rng.integers(0, cfg.vocab_size, n).tolist()), 3) for n in (5, 11)]
    want = reference.greedy_generate(model, [r.prompt for r in reqs], [3] * 2)
    kv = 1024 * cfg.kv_bytes_per_token("float32")
    moved = {}
    for f in (0.0, 0.5):
        config = EngineConfig(kv_cache_bytes=kv, h2d_limit_gb_per_s=100.0,
                              device_weight_layers=1, resident_weight_fraction=f)
        with Engine(model, config) as eng:
            assert [r.tokens for r in eng.generate(reqs)] == want
            layer = model.host_layers[0].layout.nbytes
            kept = config.kept_layer_bytes(layer)
            assert eng.mover.kept_bytes == kept
            moved[f] = eng.stats.h2d_bytes
            # every pass streams each layer's rest (a prefetch may run one layer ahead)
            passes = eng.stats.iterations * cfg.num_layers
            assert moved[f] % (layer - kept) == 0
            assert passes <= moved[f] // (layer - kept) <= passes + 1
        assert perf.streamed_bytes(cfg, config, on_cpu=True) == cfg.num_layers * (
            cfg.weight_bytes_per_layer - config.kept_layer_bytes(cfg.weight_bytes_per_layer))
    assert moved[0.5] < 0.6 * moved[0.0]
    with pytest.raises(ValueError, match="resident_weight_fraction must lie in"):
        EngineConfig(kv_cache_bytes=kv, resident_weight_fraction=1.0)


def test_release_pageable_keeps_one_host_copy(tmp_path):
    """After the pinned staging exists, the pageable layers can go: movers stream from the
    staging bit-exactly, `forward` unpacks from it (same logits), and everything that needs
    the pageable copy says so instead of producing garbage."""
    model = _tiny()
    tokens = np.arange(12, dtype=np.int32).reshape(2, 6) % model.config.vocab_size
    want = np.asarray(model.forward(tokens))
    host = [np.asarray(l.buffer).copy() for l in model.host_layers]
    with pytest.raises(ValueError, match="needs a pinned staging first"):
        model.release_pageable()
    mover = WeightMover(model, depth=2, resident=False, pinned=True, packet_bytes=10_000)
    before = model.host_bytes
    freed = model.release_pageable()
    assert freed == sum(h.nbytes for h in host) and not model.pageable
    assert model.host_bytes == before - freed
    for layer in range(model.config.num_layers):
        got = mover.get(layer)
        layout = model.host_layers[layer].layout
        again = unpack_packets(layout, (0,), (jnp.asarray(host[layer]),))
        for name in got.__dataclass_fields__:
            a, b = getattr(got, name), getattr(again, name)
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    mover.close()
    np.testing.assert_array_equal(np.asarray(model.forward(tokens)), want)
    with pytest.raises(ValueError, match="saving needs the model's pageable host weights"):
        mj.save_model(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="without pinned staging needs"):
        WeightMover(model, resident=False, pinned=False)
    with pytest.raises(ValueError, match="staging another copy needs"):
        WeightMover(model, resident=False, pinned=True, packet_bytes=4096)


def test_engine_frees_the_pageable_copy_when_streaming_from_pinned(monkeypatch):
    """An engine whose mover streams from pinned memory (an accelerator's; forced here) frees
    the pageable layers unless asked to keep them, and still gives the oracle's tokens."""
    import functools as ft
    model = _tiny()
    rng = np.random.default_rng(1)
    reqs = [Request(tuple(rng.integers(0, model.config.vocab_size, n).tolist()), 3)
            for n in (5, 17, 33)]
    want = reference.greedy_generate(model, [r.prompt for r in reqs], [3] * 3)
    monkeypatch.setattr(engine_mod, "WeightMover", ft.partial(WeightMover, pinned=True))
    kv = 2048 * model.config.kv_bytes_per_token("float32")
    with Engine(model, kv_cache_bytes=kv, device_memory_bytes=1 << 30,
                keep_pageable_weights=True) as eng:
        assert model.pageable
        assert [r.tokens for r in eng.generate(reqs)] == want
    with Engine(model, kv_cache_bytes=kv, device_memory_bytes=1 << 30) as eng:
        assert not model.pageable
        assert [r.tokens for r in eng.generate(reqs)] == want
        assert eng.stats.host_weight_bytes == model.host_bytes
    # The reference path now reads the layers from the pinned staging.
    assert reference.greedy_generate(model, [r.prompt for r in reqs], [3] * 3) == want
