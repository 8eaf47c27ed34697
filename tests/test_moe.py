"""The expert paths (grouped C++ kernel, blocked, capacity, ragged_dot) against per-expert
references, fp32 and bf16; the accelerator lowering (no ragged_dot) and its memory bound."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moelens_jax as mj
from moelens_jax import reference
from moelens_jax.model import moe
from moelens_jax.model.weights import QuantisedMatrix, quantise
from moelens_jax.ops import experts

# Tolerances (relative L2 over the whole output). float32: the grouped GEMM and the dense loop
# differ only in summation order. bfloat16: both round inputs to bf16 identically and accumulate
# in f32, so they differ by f32 summation order plus at most one bf16 rounding of the SwiGLU
# activation that lands differently.
REL_L2 = {"float32": 1e-6, "bfloat16": 1e-2}
IMPLS = ["grouped", "blocked", "capacity", "ragged"]


def _layer_and_tokens(preset, dtype, n=37, seed=0):
    model = mj.load_model(preset, dtype=dtype, seed=seed)
    lw = jax.device_put(model.weights.layers[0])
    x = jax.random.normal(jax.random.key(seed), (n, model.config.hidden_size), jnp.float32)
    return model.config, lw, x


def _fast(lw, disp, impl):
    cap = moe.capacity_bucket(int(disp.group_sizes_e.max())) if impl == "capacity" else None
    return moe.expert_ffn(lw.w_gate, lw.w_up, lw.w_down, disp.x_mh, disp.group_sizes_e, impl,
                          capacity=cap)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_expert_paths_match_expert_loop(preset, dtype, impl):
    cfg, lw, x = _layer_and_tokens(preset, dtype, n=301)  # > 2 row blocks for some experts
    routing = moe.route(cfg, lw.router, x)
    disp = moe.dispatch(routing, x, cfg.num_experts)
    fast = _fast(lw, disp, impl)
    slow = reference.expert_ffn_loop(lw.w_gate, lw.w_up, lw.w_down, disp.x_mh,
                                     disp.group_sizes_e)
    reference.assert_close(fast, slow, rel_l2=REL_L2[dtype], name="expert rows")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe"])
def test_masked_tokens_are_dropped_from_the_experts(preset, impl):
    """Padding rows (token mask False) get no routed-expert output; real rows are unchanged."""
    cfg, lw, x = _layer_and_tokens(preset, "float32", n=64, seed=5)
    mask = np.random.default_rng(0).random(64) < 0.6
    routing = moe.route(cfg, lw.router, x)
    disp = moe.dispatch(routing, x, cfg.num_experts, jnp.asarray(mask))
    assert int(disp.group_sizes_e.sum()) == mask.sum() * cfg.num_experts_per_tok
    ffn = lambda *a: _fast(lw, disp, impl)  # noqa: E731  (same rows as `a`)
    got = np.asarray(moe.moe_block(cfg, lw, x, ffn, token_mask_n=jnp.asarray(mask)))
    want = np.asarray(reference.moe_block_dense(cfg, lw, x))
    reference.assert_close(got[mask], want[mask], rel_l2=REL_L2["float32"], name="real rows")
    routed_only = got[~mask] - (np.asarray(moe.shared_expert(lw, x))[~mask]
                                if cfg.shared_expert_intermediate_size else 0.0)
    np.testing.assert_allclose(routed_only, 0.0, atol=1e-6)


def test_capacity_bucket_is_small_and_sufficient():
    sizes = [moe.capacity_bucket(c) for c in range(0, 5000)]
    assert all(s >= max(c, 8) and s % 8 == 0 and s <= max(8, 1.25 * c + 8)
               for c, s in enumerate(sizes))
    assert len(set(sizes[64:4096])) <= 4 * 6 + 1  # ~4 sizes per octave


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["tiny-mixtral", "tiny-qwen2-moe", "tiny-qwen3-moe"])
def test_moe_block_matches_dense_reference(preset, dtype):
    cfg, lw, x = _layer_and_tokens(preset, dtype, seed=3)
    fast = jax.jit(moe.moe_block, static_argnums=(0,))(cfg, lw, x)
    slow = reference.moe_block_dense(cfg, lw, x)
    reference.assert_close(fast, slow, rel_l2=REL_L2[dtype], name="moe block")


def test_dispatch_groups_rows_by_expert():
    cfg, lw, x = _layer_and_tokens("tiny-qwen3-moe", "float32", n=50)
    routing = moe.route(cfg, lw.router, x)
    disp = moe.dispatch(routing, x, cfg.num_experts)
    experts_sorted = np.asarray(routing.experts_nk).reshape(-1)[np.asarray(disp.order_m)]
    assert np.all(np.diff(experts_sorted) >= 0)
    np.testing.assert_array_equal(np.bincount(experts_sorted, minlength=cfg.num_experts),
                                  np.asarray(disp.group_sizes_e))
    assert int(disp.group_sizes_e.sum()) == 50 * cfg.num_experts_per_tok
    tok = np.asarray(disp.order_m) // cfg.num_experts_per_tok
    np.testing.assert_array_equal(np.asarray(disp.x_mh), np.asarray(x)[tok])


@pytest.mark.parametrize("preset,normalised", [("tiny-mixtral", True), ("tiny-qwen2-moe", False)])
def test_route_probabilities(preset, normalised):
    cfg, lw, x = _layer_and_tokens(preset, "float32")
    r = moe.route(cfg, lw.router, x)
    sums = np.asarray(r.weights_nk.sum(-1))
    if normalised:
        np.testing.assert_allclose(sums, 1.0, rtol=1e-6)
    else:
        assert np.all(sums < 1.0) and np.all(sums > 0)
    assert np.all(np.diff(np.asarray(r.weights_nk), axis=-1) <= 0)  # top-k sorted descending
    e = np.asarray(r.experts_nk)
    assert all(len(set(row)) == cfg.num_experts_per_tok for row in e)


@pytest.mark.parametrize("impl", IMPLS)
def test_expert_path_with_an_empty_expert(impl):
    """Experts that receive no tokens (group size 0) must not disturb the others."""
    cfg, lw, x = _layer_and_tokens("tiny-qwen3-moe", "float32", n=3)
    routing = moe.route(cfg, lw.router, x)
    disp = moe.dispatch(routing, x, cfg.num_experts)
    assert int((disp.group_sizes_e == 0).sum()) > 0
    fast = _fast(lw, disp, impl)
    slow = reference.expert_ffn_loop(lw.w_gate, lw.w_up, lw.w_down, disp.x_mh,
                                     disp.group_sizes_e)
    reference.assert_close(fast, slow, rel_l2=REL_L2["float32"])


@pytest.mark.parametrize("block", [1, 8, 128])
def test_blocked_path_block_sizes(block):
    cfg, lw, x = _layer_and_tokens("tiny-mixtral", "float32", n=77)
    routing = moe.route(cfg, lw.router, x)
    disp = moe.dispatch(routing, x, cfg.num_experts)
    fast = moe.expert_ffn_blocked(lw.w_gate, lw.w_up, lw.w_down, disp.x_mh,
                                  disp.group_sizes_e, block=block)
    slow = reference.expert_ffn_loop(lw.w_gate, lw.w_up, lw.w_down, disp.x_mh,
                                     disp.group_sizes_e)
    reference.assert_close(fast, slow, rel_l2=REL_L2["float32"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", ["grouped", "blocked"])
def test_one_expert_takes_every_row_and_padding_rows(impl, dtype):
    """Every row routed to one expert (others empty), plus trailing padding rows past the
    groups' sum, which must come back as zeros."""
    cfg, lw, x = _layer_and_tokens("tiny-mixtral", dtype, n=150)
    gs = np.zeros(cfg.num_experts, np.int32)
    gs[cfg.num_experts - 1] = 131  # rows 131..149 are padding
    fast = np.asarray(moe.expert_ffn(lw.w_gate, lw.w_up, lw.w_down, x, jnp.asarray(gs), impl))
    slow = np.asarray(reference.expert_ffn_loop(lw.w_gate, lw.w_up, lw.w_down, x,
                                                jnp.asarray(gs)))
    reference.assert_close(fast[:131], slow[:131], rel_l2=REL_L2[dtype])
    np.testing.assert_array_equal(fast[131:], 0.0)


@pytest.mark.parametrize("first,match", [((5, -1), "negative"), ((5, 3, 9), "sum to 17 rows"),
                                         ((1,) * 9, r"group_sizes must be \[E\]")])
def test_grouped_kernel_rejects_bad_group_sizes(first, match):
    cfg, lw, x = _layer_and_tokens("tiny-mixtral", "float32", n=12)
    gs = list(first) + [0] * max(0, cfg.num_experts - len(first))
    with pytest.raises(Exception, match=match):
        jax.block_until_ready(moe.expert_ffn(lw.w_gate, lw.w_up, lw.w_down, x,
                                             jnp.asarray(gs, jnp.int32), "grouped"))


def test_blocked_rows_stay_within_a_block_per_expert():
    for m in (64, 256, 1000, 8192, 65536):
        for E in (8, 128):
            b = moe.block_rows(m, E)
            assert moe.MIN_BLOCK_ROWS <= b <= moe.MAX_BLOCK_ROWS
            if b > moe.MIN_BLOCK_ROWS:  # the floor wins for tiny batches
                assert E * b <= 0.25 * m
    rng = np.random.default_rng(0)
    for _ in range(50):
        gs = rng.integers(0, 300, 8)
        got = moe.blocked_rows_computed(gs, 16)
        assert gs.sum() <= got <= gs.sum() + 8 * 15


def test_unknown_expert_impl():
    cfg, lw, x = _layer_and_tokens("tiny-mixtral", "float32", n=4)
    with pytest.raises(ValueError, match="unknown expert implementation"):
        moe.expert_ffn(lw.w_gate, lw.w_up, lw.w_down, x, jnp.array([4, 0, 0, 0]), "magic")
    with pytest.raises(ValueError, match="needs a static capacity"):
        moe.expert_ffn(lw.w_gate, lw.w_up, lw.w_down, x, jnp.array([4, 0, 0, 0]), "capacity")


def _abstract_gb_args(preset: str, n: int):
    from moelens_jax.model.weights import abstract_weights

    cfg = mj.config.get_preset(preset)
    lw = abstract_weights(cfg, "bfloat16").layers[0]
    return cfg, (lw, jax.ShapeDtypeStruct((n, cfg.hidden_size), jnp.float32),
                 jax.ShapeDtypeStruct((n, cfg.num_heads, cfg.head_dim), jnp.float32),
                 jax.ShapeDtypeStruct((n,), jnp.bool_))


@pytest.mark.parametrize("preset", ["mixtral-8x7b", "qwen3-30b-a3b"])
def test_gb_stage_lowers_for_cuda_without_ragged_dot(preset):
    """The engine's GB computation, lowered for CUDA here (no GPU needed): the expert GEMMs are
    plain dots in loops, never ragged_dot (which jaxlib 0.10 rewrites into a dense E x GEMM on
    GPUs) and never the CPU-only FFI kernel."""
    from moelens_jax.model.stages import gb_stage

    cfg, args = _abstract_gb_args(preset, 4096)
    hlo = (jax.jit(functools.partial(gb_stage, cfg)).trace(*args)
           .lower(lowering_platforms=("cuda",)).as_text())
    assert "dot_general" in hlo
    assert "ragged" not in hlo and "custom_call" not in hlo


def test_accelerator_gb_temporaries_at_mixtral_scale():
    """Peak temporaries of one GB call on the accelerator path ("blocked" experts, what
    `expert_ffn` lowers to off-CPU) at Mixtral-8x7B shapes with 32,768 tokens, from XLA's
    memory analysis of the same code compiled here: <= 12 GiB (a dense ragged_dot lowering
    needs an [E, m, f] intermediate: 8 x 65,536 x 14,336 x 4 B = 28 GiB for one projection)."""
    from moelens_jax.model import transformer

    cfg, args = _abstract_gb_args("mixtral-8x7b", 32768)

    def gb_blocked(lw, x_nh, attn_nqd, mask_n):
        x, xn, routing = transformer.attention_out_and_route(cfg, lw, x_nh, attn_nqd)
        ffn = functools.partial(moe.expert_ffn, impl="blocked")
        return transformer.experts_residual(cfg, lw, x, xn, routing, ffn, mask_n)

    mem = jax.jit(gb_blocked).trace(*args).lower().compile().memory_analysis()
    assert mem.temp_size_in_bytes <= 12 * 2**30, mem.temp_size_in_bytes / 2**30


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("h,f", [(19, 37), (64, 96), (48, 200), (300, 530)])
def test_grouped_kernel_odd_shapes_and_group_sizes(h, f, dtype):
    """Every GEMM the C++ kernel picks by group size (expert_ffn.cc; on AVX2 / AVX-512):
    SmallGemm (bf16, <= 16 rows), PackedGemm (<= 48 rows: float32 from 1 row, bf16 from 17;
    18, 41, 47 and 48 rows hit its 6-row blocks, their remainders and none) and OpenBLAS (49
    and 60 rows), each side of both thresholds; widths that are no multiple of the SIMD width
    (tail columns); and with h = 300 and f = 530, inner dimensions past one packed block of 256
    rows (the second block accumulates) and more than one column panel per expert."""
    rng = np.random.default_rng(h * f)
    gs = np.array([1, 2, 3, 0, 16, 17, 18, 41, 47, 48, 49, 60], np.int32)
    E = len(gs)
    w = [jnp.asarray(rng.standard_normal(s) * 0.2, dtype)
         for s in ((E, h, f), (E, h, f), (E, f, h))]
    x = jnp.asarray(rng.standard_normal((int(gs.sum()) + 2, h)), jnp.float32)
    got = moe.expert_ffn(*w, x, jnp.asarray(gs), "grouped")
    want = reference.expert_ffn_loop(*w, x, jnp.asarray(gs))
    reference.assert_close(got, want, rel_l2=REL_L2[dtype])
    np.testing.assert_array_equal(np.asarray(got)[int(gs.sum()):], 0.0)


def _quantised_experts(rng, E, h, f, weight_dtype, dtype):
    """(QuantisedMatrix gate, up, down) of random experts, and their dequantised arrays."""
    qs = []
    for shape in ((E, h, f), (E, h, f), (E, f, h)):
        codes, scale = quantise(rng.standard_normal(shape).astype(np.float32) * 0.2,
                                weight_dtype)
        qs.append(QuantisedMatrix(jnp.asarray(codes), jnp.asarray(scale), weight_dtype, dtype))
    return qs, [q.dequantise() for q in qs]


def _fused_reference(q, x, gs, dtype):
    """float64 loop of what the kernel computes on quantised experts: weights code x scale
    (not rounded to the model dtype), x and the SwiGLU activations rounded to a bf16 model's
    dtype as the float path rounds them."""
    w = [np.asarray(QuantisedMatrix(a.codes, a.scale, a.weight_dtype, "float32").dequantise(),
                    np.float64) for a in q]
    rnd = lambda a: np.asarray(jnp.asarray(a, jnp.float32).astype(dtype), np.float64)  # noqa: E731
    xr, out, start = rnd(x), np.zeros((x.shape[0], w[2].shape[-1])), 0
    for e, g in enumerate(gs):
        rows = xr[start:start + g]
        gate, up = rows @ w[0][e], rows @ w[1][e]
        out[start:start + g] = rnd(gate / (1 + np.exp(-gate)) * up) @ w[2][e]
        start += g
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("weight_dtype,h,f", [("int8", 40, 100), ("int8", 288, 530),
                                              ("int4", 64, 96), ("int4", 256, 384),
                                              ("int4", 288, 544)])
def test_grouped_kernel_dequantises_inside_its_gemms(weight_dtype, h, f, dtype):
    """int8 / int4 experts (codes + scales, `QuantisedMatrix`) through the C++ kernel, which
    dequantises in registers (SmallGemm, <= 16 rows: int8 applies its column scales once at
    the end), while it packs panels (<= 48 rows) or while it widens them for OpenBLAS (> 48),
    against a float64 loop on code x scale, with the float test's group sizes (empty experts,
    both sides of both thresholds) and padding rows. Shapes: int8 widths that are no multiple
    of the SIMD width (tail columns); h = 288 / 530 past one 256-row packed block; int4 with
    128-row scale groups (256 x 384) and 32-row ones (288, 544). The kernel does not round
    the dequantised weights to a bf16 model's dtype (unpacking does): against the loop on the
    unpacked (rounded) weights it differs by that rounding only. "blocked" (the accelerator
    default) dequantises one expert at a time as unpacking does."""
    rng = np.random.default_rng(h + f)
    gs = np.array([1, 2, 3, 0, 16, 17, 18, 41, 47, 48, 49, 60], np.int32)
    q, deq = _quantised_experts(rng, len(gs), h, f, weight_dtype, dtype)
    x = jnp.asarray(rng.standard_normal((int(gs.sum()) + 2, h)), jnp.float32)
    got = moe.expert_ffn(*q, x, jnp.asarray(gs), "grouped")
    reference.assert_close(got, _fused_reference(q, np.asarray(x), gs, dtype),
                           rel_l2=REL_L2[dtype], name="grouped")
    unpacked = reference.expert_ffn_loop(*deq, x, jnp.asarray(gs))
    reference.assert_close(got, unpacked, rel_l2=REL_L2[dtype], name="vs unpacked")
    blocked = moe.expert_ffn(*q, x, jnp.asarray(gs), "blocked")
    reference.assert_close(blocked, unpacked, rel_l2=REL_L2[dtype], name="blocked")
    for y in (got, blocked):
        np.testing.assert_array_equal(np.asarray(y)[int(gs.sum()):], 0.0)


def test_grouped_kernel_rejects_bad_quantised_weights():
    rng = np.random.default_rng(0)
    q, _ = _quantised_experts(rng, 3, 64, 32, "int8", "float32")
    x, gs = jnp.ones((4, 64), jnp.float32), jnp.asarray([1, 2, 1], jnp.int32)
    codes, scales = [w.codes for w in q], tuple(w.scale for w in q)

    def call(codes, scales, weight_dtype, dtype="float32"):
        return jax.block_until_ready(experts.grouped_expert_ffn(
            *codes, x, gs, scales=scales, weight_dtype=weight_dtype, dtype=dtype))

    with pytest.raises(ValueError, match="quantised weights are int8 codes with scales"):
        call(codes, None, "int8")
    with pytest.raises(ValueError, match="need the model dtype"):
        call(codes, scales, "int8", None)
    with pytest.raises(ValueError, match="must be float32 or bfloat16"):
        call(codes, scales, "int8", "float16")
    with pytest.raises(Exception, match=r"s_gate must be \[E, out\] for int8"):
        call(codes, (scales[0][:, :16], scales[1], scales[2]), "int8")
    with pytest.raises(Exception, match="weight shapes disagree"):  # int8 codes read as int4
        call(codes, scales, "int4")
    q4, _ = _quantised_experts(rng, 3, 64, 32, "int4", "float32")
    c4, s4 = [w.codes for w in q4], [w.scale for w in q4]
    with pytest.raises(Exception, match="group dividing k"):  # 3 groups do not divide 64 rows
        call(c4, (jnp.ones((3, 3, 32), jnp.float32), s4[1], s4[2]), "int4")
    with pytest.raises(Exception, match="multiple of an even scale group"):  # 1-row groups
        call(c4, (jnp.ones((3, 64, 32), jnp.float32), jnp.ones((3, 64, 32), jnp.float32),
                  s4[2]), "int4")
    with pytest.raises(Exception, match="one group size"):
        call(c4, (s4[0], jnp.ones((3, 2, 32), jnp.float32), s4[2]), "int4")  # 64 vs 32 rows


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_logits_of_one_row_equal_that_row_in_a_batch(dtype):
    """The lm_head's one-row path (two rows on a 16-bit head, working around XLA CPU's slow
    one-row GEMV) gives the row's logits as a batch computes them, for [1, h] and [h]."""
    from moelens_jax.model import transformer
    model = mj.load_model("tiny-mixtral", dtype=dtype, seed=0)
    w, cfg = model.weights, model.config
    x = jax.random.normal(jax.random.PRNGKey(0), (3, cfg.hidden_size), jnp.float32)
    batch = np.asarray(transformer.logits(cfg, w, x))
    one = np.asarray(transformer.logits(cfg, w, x[1:2]))
    assert one.shape == (1, cfg.vocab_size)
    np.testing.assert_allclose(one[0], batch[1], rtol=1e-5, atol=1e-5)
    flat = np.asarray(transformer.logits(cfg, w, x[1]))
    assert flat.shape == (cfg.vocab_size,)
    np.testing.assert_allclose(flat, batch[1], rtol=1e-5, atol=1e-5)
