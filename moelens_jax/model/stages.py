"""The device stages of one decoder layer, as the engine runs them (DESIGN section 3).

GA: RMSNorm, QKV, RoPE for every row of an iteration, and causal attention of the prefill rows
within their own sequence; GB: O projection, residual, norm, router, experts over the routed
rows, residual. Pure functions of (config, layer weights, rows): the engine jits them, the
performance model's micro-profile times them.

Prefill attention: on the CPU backend the C++ kernel over each row's own context
(`ops.prefill`); elsewhere block-sparse over TILE-row tiles: only (query tile, key tile) pairs
that share a sequence are computed (`tiled_prefill_attention`), merged by log-sum-exp.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moelens_jax.model import transformer
from moelens_jax.ops.prefill import packed_prefill_attention

TILE = 64  # rows per tile of the block-sparse prefill attention


def tiled_prefill_attention(q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3):
    """`reference.segment_causal_attention` computed only on the listed tile pairs, merged by
    LSE.

    Costs O(pairs * TILE^2) instead of O(n^2): an iteration of many short prompts touches a
    thin band around the diagonal. Rows with seg < 0 get zeros.
    """
    n, hq, d = q_nhd.shape
    g = k_ngd.shape[1]
    s = hq // g
    nt = n // TILE
    qt = q_nhd.astype(jnp.float32).reshape(nt, TILE, g, s, d)
    kt = k_ngd.astype(jnp.float32).reshape(nt, TILE, g, d)
    vt = v_ngd.astype(jnp.float32).reshape(nt, TILE, g, d)
    segt, post = seg_n.reshape(nt, TILE), pos_n.reshape(nt, TILE)
    qi, kj, real = pairs_p3[:, 0], pairs_p3[:, 1], pairs_p3[:, 2] > 0
    logits = jnp.einsum("ptgsd,pugd->pgstu", qt[qi], kt[kj]) * d ** -0.5
    sq, sk, pq, pk = segt[qi], segt[kj], post[qi], post[kj]
    valid = ((sq[:, :, None] == sk[:, None, :]) & (sq[:, :, None] >= 0)
             & (pk[:, None, :] <= pq[:, :, None]) & real[:, None, None])[:, None, None]
    logits = jnp.where(valid, logits, -1e30)
    m = jnp.max(logits, axis=-1)  # [P, g, s, T]
    p = jnp.where(valid, jnp.exp(logits - m[..., None]), 0.0)
    l_ = jnp.sum(p, axis=-1)
    o = jnp.einsum("pgstu,pugd->pgstd", p, vt[kj])
    big_m = jax.ops.segment_max(m, qi, num_segments=nt)  # [nt, g, s, T]
    w = jnp.exp(m - big_m[qi])
    den = jax.ops.segment_sum(l_ * w, qi, num_segments=nt)
    num = jax.ops.segment_sum(o * w[..., None], qi, num_segments=nt)
    out = jnp.where(den[..., None] > 0, num / jnp.maximum(den, 1e-30)[..., None], 0.0)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(n, hq, d)


def ga_stage(cfg, kv_dtype, lw, x_nh, pos_n, seg_n, pairs_p3):
    """GA: QKV + RoPE for every row, causal attention of the prefill rows (zeros elsewhere).

    Prefill attention reads K/V rounded to the KV store's dtype, exactly what decode reads back
    from the store later, so a sequence recomputed after preemption sees the same numbers."""
    q, k, v = transformer.pre_attention(cfg, lw, x_nh, pos_n)
    k_s, v_s = k.astype(kv_dtype), v.astype(kv_dtype)
    return q, k, v, prefill_attention(q, k_s, v_s, seg_n, pos_n, pairs_p3)


def prefill_attention(q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3):
    """The C++ packed-prefill kernel on the CPU backend (work proportional to the rows each row
    attends to), `tiled_prefill_attention` on any other (chosen at lowering)."""
    return jax.lax.platform_dependent(
        q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3,
        cpu=lambda q, k, v, seg, pos, _: packed_prefill_attention(q, k, v, seg, pos),
        default=tiled_prefill_attention)


def gb_stage(cfg, lw, x_nh, attn_nqd, mask_n):
    """GB in one computation on every backend: O projection, residual, norm, router, experts
    over the routed rows only (`moe.expert_ffn`'s default path: the C++ grouped kernel on CPU,
    "blocked" elsewhere; the group sizes never leave the device), residual."""
    x, xn, routing = transformer.attention_out_and_route(cfg, lw, x_nh, attn_nqd)
    return transformer.experts_residual(cfg, lw, x, xn, routing, token_mask_n=mask_n)
