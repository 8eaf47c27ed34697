"""The performance model: the paper's published numbers, limits, and Stage 2 vs Stage 1."""

from __future__ import annotations

import dataclasses

import pytest

from moelens_jax import perf
from moelens_jax.config import get_preset
from moelens_jax.perf import EngineCosts, Workload
from moelens_jax.perf.costs import activation_bytes, active_experts
from moelens_jax.runtime import EngineConfig, GroupShape, IterationRecord, IterationShape
from moelens_jax.runtime.scheduler import make_scheduler

MIXTRAL = get_preset("mixtral-8x7b")
A40 = perf.get_hardware("a40")


def test_paper_saturation_tokens_and_table2():
    """Paper: ~19.2k tokens saturate an A40 (150 TFLOP/s over a 32 GB/s link) with Mixtral;
    Table 2 KV sizes (GB) at sequence 256 / 512 for A40, L40, A100 within 2%."""
    tokens, _ = perf.paper_table2(MIXTRAL, 150, 32, 256)
    assert tokens == pytest.approx(19200, rel=1e-9)
    want = {150: (614, 1228), 181: (741, 1482), 312: (1277, 2554)}
    for tflops, (kv256, kv512) in want.items():
        assert perf.paper_table2(MIXTRAL, tflops, 32, 256)[1] == pytest.approx(kv256, rel=0.02)
        assert perf.paper_table2(MIXTRAL, tflops, 32, 512)[1] == pytest.approx(kv512, rel=0.02)
    hw32 = dataclasses.replace(A40, h2d_bytes_per_s=32e9)
    approx = perf.tokens_to_saturate_approx(MIXTRAL, hw32)
    assert approx == pytest.approx(150e12 / 32e9 * 4)  # decimal units: 18750
    # The exact form counts attention projections too, so it saturates a bit earlier (bf16).
    assert 0.8 * approx < perf.tokens_to_saturate(MIXTRAL, hw32) < approx


def test_pme_and_overlap_factor():
    assert perf.pme(98, 32) == pytest.approx(0.0356, abs=5e-5)
    assert perf.overlap_factor(Workload.fixed(98, 256)) == pytest.approx(1.57, abs=5e-3)
    mixed = Workload((98, 926), (32, 128))  # ratio of sums, not mean of ratios
    want = (98 + 32 + 926 + 128) / (32 * (2 * 98 + 32) / 2 + 128 * (2 * 926 + 128) / 2)
    assert perf.workload_pme(mixed) == pytest.approx(want)
    assert perf.workload_pme(Workload.fixed(98, 32, 5)) == pytest.approx(perf.pme(98, 32))


def test_stage1_monotone_and_turning_point():
    w = Workload.fixed(98, 32)
    caps = [10e9, 30e9, 70e9, 150e9, 400e9, 1000e9]
    t = [perf.stage1(MIXTRAL, A40, w, kv).processed_tokens_per_s for kv in caps]
    assert all(b >= a for a, b in zip(t, t[1:], strict=False))
    r_small, r_big = perf.stage1(MIXTRAL, A40, w, 10e9), perf.stage1(MIXTRAL, A40, w, 1000e9)
    assert r_small.binding == "kv_capacity" and r_big.binding != "kv_capacity"
    assert r_big.processed_tokens_per_s == pytest.approx(
        min(r_big.bound_gpu_tokens_per_s, r_big.bound_cpu_attn_tokens_per_s))
    for hw in (A40, dataclasses.replace(A40, shared_cores=True, cpu_attn_bytes_per_s=2e9)):
        tp = perf.stage1(MIXTRAL, hw, w, 10e9).turning_point_kv_bytes
        assert perf.stage1(MIXTRAL, hw, w, 0.9 * tp).binding == "kv_capacity"
        assert perf.stage1(MIXTRAL, hw, w, 1.1 * tp).binding != "kv_capacity"
    # Longer generation at a fixed prompt lowers the (generated and processed) bound.
    g = [perf.stage1(MIXTRAL, A40, Workload.fixed(98, gl), 70e9).processed_tokens_per_s
         for gl in (32, 64, 128, 256)]
    assert all(b < a for a, b in zip(g, g[1:], strict=False))


def test_stage2_below_stage1_and_converges():
    w1 = perf.stage1(MIXTRAL, A40, Workload.fixed(98, 32), 20e9)
    ratios = []
    for k in (2000, 8000, 32000):
        s2 = perf.predict(MIXTRAL, A40, Workload.fixed(98, 32, k),
                          EngineConfig(kv_cache_bytes=20e9, token_budget=32768))
        ratios.append(s2.generated_tokens_per_s / w1.generated_tokens_per_s)
        assert s2.rejected == 0 and s2.kv_peak_fraction > 0.9
    assert all(r <= 1.02 for r in ratios)
    assert ratios[0] < ratios[1] < ratios[2] and ratios[2] > 0.85


def test_stage2_hand_computed_case():
    """Two requests (p=4, g=2) on a synthetic machine where each iteration costs 1 s of
    weight streaming and the link's time for the activations it carries (everything else
    free): iteration 1 prefills both (8 tokens, 2 generated), iteration 2 decodes both and
    copies their attention outputs to the device (float32; VSLPipe's two groups of one decode
    row each, 8 rows after bucketing in each)."""
    cfg = get_preset("tiny-mixtral")
    io = 1.0 / (cfg.num_layers * cfg.weight_bytes_per_layer)
    costs = EngineCosts(io_s_per_byte=io, link_s_per_byte=io)
    config = EngineConfig(kv_cache_bytes=64 * cfg.kv_bytes_per_token(), page_size=4,
                          device_weight_layers=1)  # streamed: tiny-mixtral has only 2 layers
    a = perf.predict(cfg, costs, Workload.fixed(4, 2, 2), config)
    outputs = io * cfg.num_layers * 2 * 8 * 4 * cfg.num_heads * cfg.head_dim
    want = 2.0 + outputs
    assert (a.iterations, a.total_s, a.generated_tokens_per_s) == (2, pytest.approx(want),
                                                                    pytest.approx(4 / want))
    assert a.processed_tokens_per_s == pytest.approx(2 * (4 + 2) / want)  # paper: p + g each
    assert a.computed_tokens == 8 + 2  # two prefills of 4, then two decode tokens
    assert a == perf.predict(cfg, costs, Workload.fixed(4, 2, 2), config)  # deterministic
    # A weight window holding every layer streams nothing: only the activations cost.
    resident = perf.predict(cfg, costs, Workload.fixed(4, 2, 2),
                            dataclasses.replace(config, device_weight_layers=cfg.num_layers))
    assert resident.total_s == pytest.approx(outputs)
    # So do layers used in place on a CPU-only machine (shared cores, no cap)...
    cpu = dataclasses.replace(costs, shared_cores=True)
    assert perf.predict(cfg, cpu, Workload.fixed(4, 2, 2), config).total_s == pytest.approx(0.0)
    # ... unless a link cap asks for an accelerator to be emulated.
    capped = dataclasses.replace(config, h2d_limit_gb_per_s=1.0)
    assert perf.predict(cfg, cpu, Workload.fixed(4, 2, 2), capped).total_s == pytest.approx(2.0)


def test_stage2_charges_every_term_by_hand():
    """Every EngineCosts term set to its own value; the two iterations of two requests
    (p=4, g=2; tiny-mixtral, 2 layers; a CPU-only machine: serial, no tile pairs) computed by
    hand from the engine's layout rules: rows bucket to 64, decode rows to 8, logits rows 2."""
    cfg = get_preset("tiny-mixtral")
    L, kvb = cfg.num_layers, cfg.kv_bytes_per_token()
    c = EngineCosts(layer_fixed_s=1e-3, layer_token_s=2e-4, padded_row_s=3e-5,
                    attn_pair_s=7.0, attn_key_s=5e-6, expert_s=9e-5, attn_fixed_s=4e-4,
                    attn_s_per_token=6e-5,
                    attn_s_per_kv_byte=1e-9, head_s_per_seq=8e-3, iteration_fixed_s=2e-2,
                    request_s=0.5, io_s_per_byte=1.0, shared_cores=True)
    config = EngineConfig(kv_cache_bytes=64 * kvb, page_size=4)
    got = perf.predict(cfg, c, Workload.fixed(4, 2, 2), config)
    # iteration 1: prefill 4 + 4 tokens: 64 rows, 2 * (4 * 5 / 2) attended keys, 2 logits rows;
    # 8 tokens routed top-2 of 4 experts: 4 (1 - (1/2)^8) experts expected active
    dev1 = L * (1e-3 + 2e-4 * 8 + 3e-5 * 64 + 5e-6 * 20 + 9e-5 * 4 * 255 / 256) + 8e-3 * 2
    host1 = L * (4e-4 + 6e-5 * 8)
    # iteration 2: decode 2 rows (8 after bucketing, 64 computed), each attending to 5 tokens;
    # 2 tokens: 4 (1 - (1/2)^2) = 3 experts expected active
    dev2 = L * (1e-3 + 2e-4 * 2 + 3e-5 * 64 + 9e-5 * 3) + 8e-3 * 2
    host2 = L * (4e-4 + 6e-5 * 2 + 1e-9 * 10 * kvb / L)
    want = 2 * 0.5 + (2e-2 + dev1 + host1) + (2e-2 + dev2 + host2)
    assert got.total_s == pytest.approx(want, rel=1e-12)
    assert got.seconds_by_term["dev"] == pytest.approx(dev1 + dev2, rel=1e-12)
    assert got.seconds_by_term["host"] == pytest.approx(host1 + host2, rel=1e-12)
    # Streamed layers: the weight mover copies each, then unpacks it (a quantised one
    # dequantised, at its format's rate) before its next copy; on shared cores the unpacking
    # also takes the compute's cores (its time counts twice on the mover's chain, once on the
    # compute's). Layers stored as int8 stream (even here) as their int8 bytes.
    cq = dataclasses.replace(c, io_s_per_byte=1e-9, unpack_s_per_byte=1e-3,
                             dequant_int8_s_per_byte=1e-8, dequant_int4_s_per_byte=1.0)
    typed = L * cfg.weight_bytes_per_layer  # each streamed layer unpacked in the model dtype
    for weight_dtype, rate in ((None, 1e-3), ("int8", 1e-8)):
        qconfig = dataclasses.replace(config, weight_dtype=weight_dtype, device_weight_layers=1,
                                      h2d_limit_gb_per_s=1.0)
        io = 1e-9 * L * perf.layer_bytes(cfg, weight_dtype)
        got = perf.predict(cfg, cq, Workload.fixed(4, 2, 2), qconfig)
        deq = rate * typed
        want = 2 * 0.5 + sum(2e-2 + max(io + 2 * deq, d + h + deq)
                             for d, h in ((dev1, host1), (dev2, host2)))
        assert got.total_s == pytest.approx(want, rel=1e-12), weight_dtype
        assert got.seconds_by_term["deq"] == pytest.approx(2 * rate * typed, rel=1e-12)


def test_activation_copies_and_host_memory_by_hand():
    """Where device and host are apart, the link carries the decode rows' float32 attention
    outputs beside the weights, the other direction carries float32 K/V of every computed row
    and the decode rows' queries (on the host stage's chain: it waits for them), and host
    memory serves KV reads, the weight stream and both copies: each can bind, computed here by
    hand for one designed group. On shared cores no activation crosses anything."""
    cfg = get_preset("tiny-mixtral")
    L, q4, kv4 = cfg.num_layers, 4 * cfg.q_size, 4 * cfg.kv_size
    g = GroupShape(prefill_tokens=30, decode_tokens=5, prefill_seqs=2, padded_rows=64,
                   tile_pairs=3, attended_keys=0, logit_rows=8, kv_tokens_read=500,
                   decode_rows=8)
    shape, streamed = IterationShape((g,)), 1e6
    h2d, d2h = L * 8 * q4, L * (64 * 2 * kv4 + 8 * q4)
    kv = 500 * cfg.kv_bytes_per_token()
    base = EngineCosts(io_s_per_byte=1e-9, link_s_per_byte=2e-9, d2h_s_per_byte=1e-9,
                       host_mem_s_per_byte=1e-12, attn_s_per_kv_byte=1e-12)
    assert activation_bytes(cfg, shape) == (h2d, d2h)
    t = base.iteration(cfg, shape, streamed)
    assert t["io"] == pytest.approx(1e-9 * streamed + 2e-9 * h2d, rel=1e-12)
    assert t["d2h"] == pytest.approx(1e-9 * d2h, rel=1e-12)
    assert t["mem"] == pytest.approx(1e-12 * (kv + streamed + h2d + d2h), rel=1e-12)
    assert t["total"] == pytest.approx(max(t["io"], t["host"] + t["d2h"]), rel=1e-12)
    slow_mem = dataclasses.replace(base, host_mem_s_per_byte=1e-6)
    assert slow_mem.iteration(cfg, shape, streamed)["total"] == pytest.approx(
        1e-6 * (kv + streamed + h2d + d2h), rel=1e-12)
    # The host stage waits for its device->host copies: they add to its chain.
    slow_d2h = dataclasses.replace(base, d2h_s_per_byte=1e-6, attn_s_per_kv_byte=1e-6)
    assert slow_d2h.iteration(cfg, shape, streamed)["total"] == pytest.approx(
        1e-6 * d2h + 1e-6 * kv, rel=1e-12)
    # A cap on the weight mover (`with_link`) leaves the outputs at the link's own rate.
    capped = base.with_link(1e3)
    assert capped.iteration(cfg, shape, streamed)["io"] == pytest.approx(
        1e-3 * streamed + 2e-9 * h2d, rel=1e-12)
    shared = dataclasses.replace(base, shared_cores=True)
    ts = shared.iteration(cfg, shape, streamed)
    assert ts["d2h"] == ts["mem"] == 0 and ts["io"] == pytest.approx(1e-9 * streamed, rel=1e-12)
    # The datasheet derivation takes each rate from the spec.
    hw = perf.get_hardware("a40")
    sheet = EngineCosts.from_hardware(cfg, hw)
    assert sheet.link_s_per_byte == sheet.io_s_per_byte == pytest.approx(1 / hw.h2d_bytes_per_s)
    assert sheet.d2h_s_per_byte == pytest.approx(1 / hw.d2h_bytes_per_s)
    assert sheet.host_mem_s_per_byte == pytest.approx(1 / hw.host_memory_bandwidth)


@pytest.mark.parametrize("pipeline", ["serial", "vslpipe"])
def test_activation_bytes_are_what_the_engine_moves(pipeline):
    """The copies Stage 2 charges (`activation_bytes` of each iteration's `IterationShape`)
    equal the bytes the engine's host stages moved between device and host arrays in that
    iteration, for every iteration of a run with prefill-only, mixed and decode-only
    iterations (and two groups under VSLPipe)."""
    import moelens_jax as mj
    from moelens_jax import workloads

    model = mj.load_model("tiny-mixtral", dtype="float32", seed=0)
    cfg = model.config
    reqs = workloads.synthetic(12, 20, 6, cfg.vocab_size, seed=3)
    with mj.Engine(model, kv_cache_bytes=2 << 20, pipeline=pipeline, token_budget=64) as eng:
        eng.generate(reqs)
        recs = eng.stats.per_iteration
    kinds = {(r.shape.prefill_tokens > 0, r.shape.decode_tokens > 0) for r in recs}
    assert {(True, False), (True, True), (False, True)} <= kinds
    if pipeline == "vslpipe":
        assert any(len(r.shape.groups) == 2 for r in recs)
    for r in recs:
        assert (r.act_h2d_bytes, r.act_d2h_bytes) == activation_bytes(cfg, r.shape), r.shape
        assert r.act_d2h_bytes > 0


def test_data_parallel_blocks_list_scheduling_and_driver_cap():
    """Blocks of `chunk` requests in input order go to the host free first; the makespan is the
    busiest host's Stage-2 time; the driver's line rate caps the whole job."""
    cfg = get_preset("tiny-mixtral")
    costs = EngineCosts(io_s_per_byte=1.0 / (cfg.num_layers * cfg.weight_bytes_per_layer))
    config = EngineConfig(kv_cache_bytes=64 * cfg.kv_bytes_per_token(), page_size=4,
                          device_weight_layers=1)
    w = Workload((4, 4, 4, 4, 4, 4, 4, 4, 4, 4), (2, 2, 2, 6, 6, 6, 2, 2, 2, 2))
    block = lambda i, j: perf.predict(cfg, costs, Workload(w.prompt_lens[i:j],  # noqa: E731
                                                           w.gen_lens[i:j]), config).total_s
    t = [block(0, 3), block(3, 6), block(6, 9), block(9, 10)]
    assert t[1] > t[0] >= t[3]  # the long block costs more
    one = perf.predict_data_parallel(cfg, costs, w, config, hosts=1, chunk=3)
    assert one.makespan_s == pytest.approx(sum(t)) and one.scaling == pytest.approx(1.0)
    two = perf.predict_data_parallel(cfg, costs, w, config, hosts=2, chunk=3)
    # host A: t0, then t2 (free at t0 < t1); then t3 goes to whichever is free first
    a, b = t[0] + t[2], t[1]
    want = max(a + t[3], b) if a <= b else max(a, b + t[3])
    assert two.makespan_s == pytest.approx(want) and two.bound == "hosts"
    assert two.generated_tokens_per_s == pytest.approx(sum(w.gen_lens) / want)
    assert 1.0 < two.scaling <= 2.0
    many = perf.predict_data_parallel(cfg, costs, w, config, hosts=8, chunk=3)
    assert many.makespan_s == pytest.approx(max(t))  # one block per host at most
    capped = perf.predict_data_parallel(cfg, costs, w, config, hosts=8, chunk=3,
                                        driver_lines_per_s=10 / (2 * max(t)))
    assert capped.bound == "driver" and capped.makespan_s == pytest.approx(2 * max(t))
    with pytest.raises(ValueError, match="hosts and chunk"):
        perf.predict_data_parallel(cfg, costs, w, config, hosts=0, chunk=3)


def test_engine_config_validates_and_is_one_place_for_defaults():
    with pytest.raises(ValueError, match="kv_cache_bytes must be positive"):
        EngineConfig(kv_cache_bytes=0)
    with pytest.raises(ValueError, match="unknown policy"):
        EngineConfig(kv_cache_bytes=1, policy="fastest")
    with pytest.raises(ValueError, match="vslpipe' needs device_weight_layers >= 2"):
        EngineConfig(kv_cache_bytes=1, pipeline="vslpipe", device_weight_layers=1)
    c = EngineConfig(kv_cache_bytes=1)
    assert c.resolved_pipeline(on_cpu=True) == "serial"
    assert c.resolved_pipeline(on_cpu=False) == "vslpipe"
    assert not c.streams_weights(on_cpu=True) and c.streams_weights(on_cpu=False)
    with pytest.raises(ValueError, match="finite and >= 0"):
        EngineCosts(layer_token_s=-1.0)


def test_hardware_presets_and_errors():
    assert set(perf.PRESETS) >= {"a40", "l4", "t4", "a100", "h100", "h200"}
    assert all(hw.source for hw in perf.PRESETS.values())
    assert A40.gemm_flops == 150e12 and A40.h2d_bytes_per_s == 19.5e9
    with pytest.raises(ValueError, match="unknown hardware"):
        perf.get_hardware("tpu-v9")
    with pytest.raises(ValueError, match="gemm_flops must be positive"):
        dataclasses.replace(A40, gemm_flops=0)
    assert perf.HardwareSpec.from_json(A40.to_json()) == A40
    costs = EngineCosts.from_hardware(MIXTRAL, A40)
    assert 64 <= perf.default_token_budget(MIXTRAL, A40, costs) <= 32768
    assert perf.engine_config(MIXTRAL, A40, kv_cache_bytes=10**9).token_budget == \
        perf.default_token_budget(MIXTRAL, A40, costs)
    # On shared cores (nothing streams, so saturation needs few tokens) the budget amortises a
    # group's fixed cost with every expert active: 9 * (1 ms + 8 * 0.5 ms) / 10 us = 4500
    # tokens -> 8192; charging the fixed term alone would give 900 -> 1024.
    cpu = dataclasses.replace(A40, shared_cores=True, h2d_bytes_per_s=1e15)
    fixed = EngineCosts(layer_fixed_s=1e-3, expert_s=5e-4, layer_token_s=1e-5, shared_cores=True)
    assert fixed.group_fixed_s(MIXTRAL) == pytest.approx(5e-3)
    assert perf.default_token_budget(MIXTRAL, cpu, fixed) == 8192


def test_corrupt_calibration_cache_is_ignored_with_a_warning(tmp_path, monkeypatch):
    from moelens_jax.perf.calibrate import _cache_path

    monkeypatch.setenv("MOELENS_CACHE", str(tmp_path))
    cfg = get_preset("tiny-mixtral")
    assert perf.cached(cfg) is None
    path = _cache_path(cfg)
    cal = perf.Calibration(A40, EngineCosts.from_hardware(cfg, A40), probe_s=0.123)
    with open(path, "w") as f:
        f.write(cal.to_json())
    assert perf.cached(cfg) == cal
    for bad in ('{"name": "x"', A40.to_json(), cal.to_json().replace('"version": ', '"v": ')):
        with open(path, "w") as f:
            f.write(bad)
        with pytest.warns(UserWarning, match="unreadable calibration cache"):
            assert perf.cached(cfg) is None


def test_calibration_fit_recovers_known_costs():
    """fit_engine_costs on synthetic per-iteration records built from known coefficients
    (charged by Stage 2's own `EngineCosts.iteration`) recovers every coefficient; on an
    accelerator, with the host stage's measured time holding its device->host copies, too."""
    from moelens_jax.perf.calibrate import fit_engine_costs

    cfg = get_preset("tiny-mixtral")
    truth = EngineCosts(layer_fixed_s=2e-3, layer_token_s=1e-5, padded_row_s=2e-6,
                        attn_pair_s=3e-5, attn_key_s=4e-8, expert_s=6e-4, attn_fixed_s=5e-4,
                        attn_s_per_token=7e-6, attn_s_per_kv_byte=1e-9,
                        iteration_fixed_s=1e-2, head_s_per_seq=3e-4, shared_cores=True)
    recs = []
    for i in range(120):
        groups = []
        for g in range(1 + i % 2):
            n_pre, n_dec = (i * 37 + g * 13) % 300, (i * 11 + g) % 64
            groups.append(GroupShape(
                prefill_tokens=n_pre, decode_tokens=n_dec, prefill_seqs=1 + i % 3,
                padded_rows=64 * (1 + (n_pre + n_dec) // 64), tile_pairs=1 + (i * 7) % 40,
                attended_keys=(i * 101 + g * 7) % 5000, logit_rows=n_dec + 1 + i % 5,
                kv_tokens_read=(i * 997 + g * 5) % 20000, decode_rows=-(-n_dec // 8) * 8))
        shape = IterationShape(tuple(groups))
        cost = truth.iteration(cfg, shape)  # the lm_head rows are outside GA/GB/C
        # GA holds the prefill attention, GB the experts, the rest of the device line splits
        # 1 : 2.
        attn = cfg.num_layers * (truth.attn_pair_s * shape.tile_pairs
                                 + truth.attn_key_s * shape.attended_keys)
        experts = cfg.num_layers * truth.expert_s * active_experts(cfg, shape)
        base = cost["dev"] - truth.head_s_per_seq * shape.logit_rows - attn - experts
        recs.append(IterationRecord(
            start_s=0.0, wall_s=cost["total"], shape=shape, ga_s=attn + base / 3,
            gb_s=2 * base / 3 + experts, c_s=cost["host"], io_s=0.0, pages_used=0,
            pages_free=0))
    fit = fit_engine_costs(cfg, recs, [(10.0, 9.5, 40), (4.0, 3.9, 10)])
    assert fit.request_s == pytest.approx(0.6 / 50)
    for f in dataclasses.fields(truth):
        if f.type == "float" and f.name not in ("request_s", "io_s_per_byte"):
            assert getattr(fit, f.name) == pytest.approx(getattr(truth, f.name), rel=1e-6), f.name
    d2h = 1e-7
    with_copies = [dataclasses.replace(r, c_s=r.c_s + d2h * activation_bytes(cfg, r.shape)[1])
                   for r in recs]
    host_terms = ("attn_fixed_s", "attn_s_per_token", "attn_s_per_kv_byte")
    naive = fit_engine_costs(cfg, with_copies)  # the copies land in the host terms
    assert any(abs(getattr(naive, n) / getattr(truth, n) - 1) > 0.05 for n in host_terms)
    fit = fit_engine_costs(cfg, with_copies, d2h_s_per_byte=d2h)
    for name in host_terms:
        assert getattr(fit, name) == pytest.approx(getattr(truth, name), rel=1e-6), name


def test_moe_lightning_kv_bound_batch_and_prediction():
    """Without a planned N, the static policy takes the largest batch whose p+g reservation
    fits the KV cache; Stage 2 of it on the same machine is slower than MoE-Lens when KV
    capacity binds (the paper's regime), and it never preempts."""
    kv = 10e9
    per_seq = (98 + 128) * MIXTRAL.kv_bytes_per_token()
    n_kv = int(kv // per_seq)
    config = EngineConfig(kv_cache_bytes=kv, token_budget=32768)
    w = Workload.fixed(98, 128, 3 * n_kv)
    lens = perf.predict(MIXTRAL, A40, w, config)
    light = perf.predict(MIXTRAL, A40, w, dataclasses.replace(config, policy="moe-lightning"))
    assert light.preemptions == 0
    sched = make_scheduler("moe-lightning", perf.engine_pages(MIXTRAL, kv, 16), 16, 32768)
    for rid in range(3 * n_kv):
        sched.add(rid, 98, 128)
    sched.complete(sched.schedule(), set())
    # pages round each reservation up to whole pages: a batch holds a little less than n_kv
    assert 0.9 * n_kv <= len(sched.batches[0]) <= n_kv
    assert lens.generated_tokens_per_s > 1.2 * light.generated_tokens_per_s


def test_datasheet_costs_and_zero_terms():
    """The datasheet derivation charges GEMM work at the GEMM rate (tile pairs included); an
    explicit 0 (a fitted term) costs nothing."""
    cfg = get_preset("tiny-mixtral")
    sheet = EngineCosts.from_hardware(cfg, A40)
    assert sheet.layer_token_s == pytest.approx(2 * cfg.active_params_per_layer / 150e12)
    assert sheet.attn_s_per_kv_byte == pytest.approx(1 / A40.cpu_attn_bytes_per_s)

    def dev(costs, pairs):
        g = GroupShape(100, 0, 1, 128, pairs, 0, 4, 0)
        return costs.iteration(cfg, IterationShape((g,)))["dev"]

    assert dev(sheet, 1000) > dev(sheet, 1)
    fitted = dataclasses.replace(sheet, attn_pair_s=0.0)
    assert dev(fitted, 1000) == dev(fitted, 1)
