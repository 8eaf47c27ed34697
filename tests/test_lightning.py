"""MoE-Lightning's planner (`perf.lightning_planner`) against its own published outputs: the
worked L4 example and the recommended-policy table of its artifact's README, and MoE-Lens'
Table 1 (the CPU memory its plans use)."""

from __future__ import annotations

import pytest

import moelens_jax as mj
from moelens_jax import perf
from moelens_jax.perf import lightning_planner as lp

GIB = 2**30
MIXTRAL = mj.get_preset("mixtral-8x7b")
# The host memory in the README's worked example (its printed cmem, bytes).
README_CMEM = 197880360960.0


def test_worked_l4_example():
    """README (asplos25): L4, Mixtral 8x7B, s = 77, n = 32, --cpu-mem-bdw 76: ubs 324 x 14
    micro-batches, wg = 0.0559, per-layer T 0.1549 s (l T = 4.957 s), 944.66 tok/s, GPU peak
    20.640 GB (its GiB) of 21.6, CPU peak 147.282 GB of 147.432."""
    p = lp.plan(MIXTRAL, lp.LightningHardware.artifact("l4", README_CMEM), 77, 32)
    assert (p.micro_batch, p.num_micro_batches) == (324, 14)
    assert p.generated_tokens_per_s == pytest.approx(944.66, rel=1e-4)
    assert p.weights_on_gpu == pytest.approx(0.055884688, rel=1e-5)
    assert MIXTRAL.num_layers * p.layer_s == pytest.approx(4.957, abs=1e-3)
    assert max(p.terms, key=p.terms.get) == "ctog"
    assert p.gpu_memory_bytes / GIB == pytest.approx(20.640, abs=1e-3)
    assert p.cpu_memory_bytes / GIB == pytest.approx(147.282, abs=1e-3)
    assert p.batch_size == 4536


# (gpu, gen_len) -> the README's recommended (ubs, n_ub).
README_TABLE = {("l4", 32): (324, 14), ("l4", 64): (228, 16), ("l4", 128): (164, 16),
                ("l4", 256): (132, 12), ("t4", 32): (164, 19), ("t4", 64): (164, 19),
                ("t4", 128): (164, 14), ("t4", 256): (100, 15)}
# The table came from machines whose available memory the README does not give (the
# artifact reads it at run time). Its gen-256 rows are what the artifact itself plans with
# 180 GiB (L4) and 188 GiB (T4) available (found by running the artifact's optimizer); the
# other rows with the worked example's memory.
TABLE_CMEM = {("l4", 256): 180 * GIB, ("t4", 256): 188 * GIB}


@pytest.mark.parametrize("key", list(README_TABLE))
def test_readme_recommended_policies(key):
    """Our plan is the README's policy, or as fast as it (throughput is flat in the number of
    micro-batches once the GPU's expert work binds, and the artifact's LP solver picks any
    point of that plateau: `You may observe some variances on the generated policies`)."""
    gpu, gen = key
    hw = lp.LightningHardware.artifact(gpu, TABLE_CMEM.get(key, README_CMEM))
    p = lp.plan(MIXTRAL, hw, 77, gen)
    mu, n_ub = README_TABLE[key]
    theirs = lp._evaluate(lp._Sizes.of(MIXTRAL), hw, 77, gen, mu, n_ub)
    assert theirs is not None, "the README's policy must fit"
    assert p.micro_batch == mu
    assert theirs.generated_tokens_per_s == pytest.approx(p.generated_tokens_per_s, rel=1e-9)
    if (p.micro_batch, p.num_micro_batches) != (mu, n_ub):
        assert p.terms["gpu"] >= p.terms["ctog"]  # only on the GPU-bound plateau


def test_moe_lens_table1_cpu_memory_utilisation():
    """MoE-Lens Table 1: MoE-Lightning's plans use 52.0 % / 56.2 % / 35.0 % of the 265 GB host
    at (prompt, generation) = (98, 32) / (98, 64) / (926, 128) on its A40. The artifact has no
    A40 entry, so its fallback constants apply whole (192 GiB of host memory among them), and
    MoE-Lens capped the A40 to 16-24 GB: within +-5 points here with a 16 GiB cap (at 24 GiB
    the plans use 61 %). The cap was chosen by comparing with this table, so this pins the
    planner's behaviour rather than validating it independently."""
    hw = lp.LightningHardware.artifact("a40", gpu_memory_bytes=16 * GIB)
    assert hw.cpu_memory == 192 * GIB
    for (s, n), want in {(98, 32): 52.0, (98, 64): 56.2, (926, 128): 35.0}.items():
        p = lp.plan(MIXTRAL, hw, s, n)
        assert 100 * p.cpu_memory_utilisation(265e9) == pytest.approx(want, abs=5), (s, n)
        assert p.cpu_memory_bytes <= p.cpu_limit_bytes and p.gpu_memory_bytes <= p.gpu_limit_bytes


def test_plan_respects_limits_and_search_order():
    hw = lp.LightningHardware.artifact("l4", README_CMEM)
    p = lp.plan(MIXTRAL, hw, 77, 32)
    m = lp._Sizes.of(MIXTRAL)
    # One more micro-batch of the chosen size does not fit (CPU memory caps n_ub here).
    assert lp._evaluate(m, hw, 77, 32, p.micro_batch, p.num_micro_batches + 1) is None
    assert lp._max_micro_batches(m, hw, 77, 32, p.micro_batch) == p.num_micro_batches
    sizes = lp.micro_batch_sizes()
    assert [next(sizes) for _ in range(7)] == [1, 2, 3, 4, 36, 68, 100]
    # More host memory never lowers the planner's throughput.
    more = lp.plan(MIXTRAL, lp.LightningHardware.artifact("l4", 2 * README_CMEM), 77, 32)
    assert more.generated_tokens_per_s >= p.generated_tokens_per_s


def test_plan_errors():
    tiny_host = lp.LightningHardware.artifact("l4", 10 * GIB)
    with pytest.raises(ValueError, match="no MoE-Lightning policy fits"):
        lp.plan(MIXTRAL, tiny_host, 77, 32)
    with pytest.raises(ValueError, match="pass cpu_memory_bytes"):
        lp.LightningHardware.artifact("t4")
    with pytest.raises(ValueError, match=">= 1"):
        lp.plan(MIXTRAL, lp.LightningHardware.artifact("l4", README_CMEM), 77, 0)
    with pytest.raises(ValueError, match="no GPU memory bandwidth"):
        lp.LightningHardware.from_spec(perf.get_hardware("a40").__class__(
            name="mystery", gemm_flops=1e12, device_memory_bytes=1e9, h2d_bytes_per_s=1e9,
            d2h_bytes_per_s=1e9, host_memory_bandwidth=1e9, cpu_attn_bytes_per_s=1e9), 1e11)
