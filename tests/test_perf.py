"""The performance model: the paper's published numbers, limits, and Stage 2 vs Stage 1."""

from __future__ import annotations

import dataclasses

import pytest

from moelens_jax import perf
from moelens_jax.config import get_preset
from moelens_jax.perf import Workload

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
    tp = r_small.turning_point_kv_bytes
    assert perf.stage1(MIXTRAL, A40, w, 0.9 * tp).binding == "kv_capacity"
    assert perf.stage1(MIXTRAL, A40, w, 1.1 * tp).binding != "kv_capacity"
    # Longer generation at a fixed prompt lowers the (generated and processed) bound.
    g = [perf.stage1(MIXTRAL, A40, Workload.fixed(98, gl), 70e9).processed_tokens_per_s
         for gl in (32, 64, 128, 256)]
    assert all(b < a for a, b in zip(g, g[1:], strict=False))


def test_stage2_below_stage1_and_converges():
    w1 = perf.stage1(MIXTRAL, A40, Workload.fixed(98, 32), 20e9)
    ratios = []
    for k in (2000, 8000, 32000):
        s2 = perf.predict(MIXTRAL, A40, Workload.fixed(98, 32, k), 20e9, token_budget=32768)
        ratios.append(s2.generated_tokens_per_s / w1.generated_tokens_per_s)
        assert s2.rejected == 0 and s2.kv_peak_fraction > 0.9
    assert all(r <= 1.02 for r in ratios)
    assert ratios[0] < ratios[1] < ratios[2] and ratios[2] > 0.85


def test_stage2_hand_computed_case():
    """Two requests (p=4, g=2) on a synthetic machine where each iteration costs 1 s of
    weight streaming (everything else free): iteration 1 prefills both (8 tokens, 2
    generated), iteration 2 decodes both -> 4 tokens in 2 s."""
    cfg = get_preset("tiny-mixtral")
    hw = perf.HardwareSpec(
        name="synthetic", gemm_flops=1e30, device_memory_bytes=1e9,
        h2d_bytes_per_s=cfg.num_layers * cfg.weight_bytes_per_layer, d2h_bytes_per_s=1e9,
        host_memory_bandwidth=1e30, cpu_attn_bytes_per_s=1e30)
    kv = 64 * cfg.kv_bytes_per_token()
    a = perf.predict(cfg, hw, Workload.fixed(4, 2, 2), kv, page_size=4,
                     device_weight_layers=1)  # streamed: tiny-mixtral has only 2 layers
    assert (a.iterations, a.total_s, a.generated_tokens_per_s) == (2, pytest.approx(2.0),
                                                                    pytest.approx(2.0))
    assert a.processed_tokens_per_s == pytest.approx(2 * (4 + 2) / 2.0)  # paper: p + g each
    assert a.computed_tokens == 8 + 2  # two prefills of 4, then two decode tokens
    b = perf.predict(cfg, hw, Workload.fixed(4, 2, 2), kv, page_size=4,
                     device_weight_layers=1)
    assert a == b  # deterministic
    # A weight window holding every layer streams nothing: the iterations cost nothing here.
    resident = perf.predict(cfg, hw, Workload.fixed(4, 2, 2), kv, page_size=4,
                            device_weight_layers=cfg.num_layers)
    assert resident.total_s == pytest.approx(0.0, abs=1e-9)


def test_hardware_presets_and_errors():
    assert set(perf.PRESETS) >= {"a40", "l4", "t4", "a100", "h100", "h200"}
    assert all(hw.source for hw in perf.PRESETS.values())
    assert A40.gemm_flops == 150e12 and A40.h2d_bytes_per_s == 19.5e9
    with pytest.raises(ValueError, match="unknown hardware"):
        perf.get_hardware("tpu-v9")
    with pytest.raises(ValueError, match="gemm_flops must be positive"):
        dataclasses.replace(A40, gemm_flops=0)
    assert perf.HardwareSpec.from_json(A40.to_json()) == A40
    assert 64 <= perf.default_token_budget(MIXTRAL, A40) <= 32768


def test_corrupt_calibration_cache_is_ignored_with_a_warning(tmp_path, monkeypatch):
    from moelens_jax.perf.calibrate import _cache_path

    monkeypatch.setenv("MOELENS_CACHE", str(tmp_path))
    cfg = get_preset("tiny-mixtral")
    assert perf.cached(cfg) is None
    path = _cache_path(cfg)
    with open(path, "w") as f:
        f.write(A40.to_json())
    assert perf.cached(cfg) == A40
    for bad in ('{"name": "x"', '{"name": "x", "no_such_field": 1}'):
        with open(path, "w") as f:
            f.write(bad)
        with pytest.warns(UserWarning, match="unreadable calibration cache"):
            assert perf.cached(cfg) is None


def test_calibration_fit_recovers_known_costs():
    """fit_engine_costs on synthetic per-iteration records built from known coefficients,
    and Stage 2 charging exactly those costs."""
    from moelens_jax.perf.calibrate import fit_engine_costs
    from moelens_jax.perf.stage2 import iteration_seconds

    cfg = get_preset("tiny-mixtral")
    L = cfg.num_layers
    a, b, c, pr, h0, r0, rs = 2e-3, 1e-5, 2e-6, 3e-5, 5e-4, 1e-2, 3e-4
    truth = dataclasses.replace(A40, layer_token_s=b, padded_row_s=c, attn_pair_s=pr,
                                layer_fixed_s=a, attn_fixed_s=h0, cpu_attn_bytes_per_s=1e9,
                                iteration_fixed_s=r0, head_s_per_seq=rs, shared_cores=True)
    recs = []
    for i in range(80):
        n_pre, n_dec, kv = (i * 37) % 300, (i * 11) % 64, (i * 997) % 20000
        n, rows, pairs = n_pre + n_dec, 64 * (1 + (n_pre + n_dec) // 64), 1 + (i * 7) % 40
        dev = L * (a + b * n + c * rows + pr * pairs)
        host = L * (h0 + kv * cfg.kv_bytes_per_token() / L / 1e9)
        seqs = n_dec + i % 5
        recs.append({"prefill_tokens": n_pre, "decode_tokens": n_dec, "logit_rows": seqs,
                     "kv_tokens_read": kv, "padded_rows": rows, "tile_pairs": pairs,
                     "ga_s": dev / 2, "gb_s": dev / 2, "c_s": host,
                     "wall_s": dev + host + r0 + rs * seqs})
        cost = iteration_seconds(cfg, truth, n, seqs, kv, rows=rows, tile_pairs=pairs,
                                 device_weight_layers=L)
        assert cost["total"] == pytest.approx(recs[-1]["wall_s"], rel=1e-9)
    fit = fit_engine_costs(cfg, recs, [(10.0, 9.5, 40), (4.0, 3.9, 10)])
    assert fit["request_s"] == pytest.approx(0.6 / 50)
    for key, want in (("layer_fixed_s", a), ("layer_token_s", b), ("padded_row_s", c),
                      ("attn_pair_s", pr), ("cpu_attn_bytes_per_s", 1e9),
                      ("iteration_fixed_s", r0), ("head_s_per_seq", rs)):
        assert fit[key] == pytest.approx(want, rel=1e-6), key
    # gemm_flops: the asymptotic rate of the fitted line (per token + per padded row)
    assert fit["gemm_flops"] == pytest.approx(2 * cfg.active_params_per_layer / (b + c),
                                              rel=1e-6)


def test_moe_lightning_policy_and_prediction():
    """HRM picks the largest batch whose reservation fits; Stage 2 of the static policy on the
    same machine is slower than MoE-Lens when KV capacity binds (the paper's regime)."""
    w, kv = Workload.fixed(98, 128), 10e9
    lp = perf.lightning_policy(MIXTRAL, A40, w, kv, device_memory_bytes=24e9)
    per_seq = (98 + 128) * MIXTRAL.kv_bytes_per_token()
    assert lp.batch_size == int(kv // per_seq) and lp.kv_reserved_bytes <= kv
    assert lp.binding == "comm" and lp.hrm_generated_tokens_per_s > 0
    k = 3 * lp.batch_size
    lens = perf.predict(MIXTRAL, A40, Workload.fixed(98, 128, k), kv, token_budget=32768)
    light = perf.predict(MIXTRAL, A40, Workload.fixed(98, 128, k), kv, token_budget=32768,
                         policy="moe-lightning", max_batch=lp.batch_size)
    assert light.preemptions == 0
    assert lens.generated_tokens_per_s > 1.2 * light.generated_tokens_per_s
    with pytest.raises(ValueError, match="cannot hold one reserved sequence"):
        perf.lightning_policy(MIXTRAL, A40, w, 1e6)


def test_fitted_zero_terms_cost_nothing():
    """A term the calibration fitted to 0 (e.g. prefill tile pairs once a kernel made them
    cheap) costs nothing; on a datasheet spec a 0 still means 'derive it from gemm_flops'."""
    from moelens_jax.perf.stage2 import iteration_seconds

    cfg = get_preset("tiny-mixtral")
    fitted = dataclasses.replace(A40, layer_token_s=1e-6, head_s_per_seq=1e-6, attn_pair_s=0.0,
                                 fitted=True)
    few, many = (iteration_seconds(cfg, fitted, 100, 4, 0, tile_pairs=p)["dev"]
                 for p in (1, 1000))
    assert few == many
    sheet = dataclasses.replace(fitted, fitted=False)
    assert (iteration_seconds(cfg, sheet, 100, 4, 0, tile_pairs=1000)["dev"]
            > iteration_seconds(cfg, sheet, 100, 4, 0, tile_pairs=1)["dev"])
