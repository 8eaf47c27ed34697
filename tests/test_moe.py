"""The expert paths (ragged_dot, blocked, capacity) against per-expert references, fp32 and bf16."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import moelens_jax as mj
from moelens_jax import reference
from moelens_jax.model import moe

# Tolerances (relative L2 over the whole output). float32: the grouped GEMM and the dense loop
# differ only in summation order. bfloat16: both round inputs to bf16 identically and accumulate
# in f32, so they differ by f32 summation order plus at most one bf16 rounding of the SwiGLU
# activation that lands differently.
REL_L2 = {"float32": 1e-6, "bfloat16": 1e-2}


def _layer_and_tokens(preset, dtype, n=37, seed=0):
    model = mj.load_model(preset, dtype=dtype, seed=seed)
    lw = jax.device_put(model.weights.layers[0])
    x = jax.random.normal(jax.random.key(seed), (n, model.config.hidden_size), jnp.float32)
    return model.config, lw, x


def _fast(lw, disp, impl):
    cap = moe.capacity_bucket(int(disp.group_sizes_e.max())) if impl == "capacity" else None
    return moe.expert_ffn(lw.w_gate, lw.w_up, lw.w_down, disp.x_mh, disp.group_sizes_e, impl,
                          capacity=cap)


@pytest.mark.parametrize("impl", ["ragged", "blocked", "capacity"])
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


@pytest.mark.parametrize("impl", ["ragged", "blocked", "capacity"])
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


@pytest.mark.parametrize("impl", ["ragged", "blocked", "capacity"])
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


def test_unknown_expert_impl():
    cfg, lw, x = _layer_and_tokens("tiny-mixtral", "float32", n=4)
    with pytest.raises(ValueError, match="unknown expert implementation"):
        moe.expert_ffn(lw.w_gate, lw.w_up, lw.w_down, x, jnp.array([4, 0, 0, 0]), "magic")
    with pytest.raises(ValueError, match="needs a static capacity"):
        moe.expert_ffn(lw.w_gate, lw.w_up, lw.w_down, x, jnp.array([4, 0, 0, 0]), "capacity")
