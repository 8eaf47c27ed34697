"""The device stages of one decoder layer, as the engine runs them (DESIGN section 3).

GA: RMSNorm, QKV, RoPE for every row of an iteration, and causal attention of the prefill rows
within their own sequence; GB: O projection, residual, norm, router, experts over the routed
rows, residual. Pure functions of (config, layer weights, rows): the engine jits them, the
performance model's micro-profile times them.

Prefill attention: on the CPU backend the C++ kernel over each row's own context
(`ops.prefill`); elsewhere block-sparse over TILE-row tiles: only (query tile, key tile) pairs
that share a sequence are computed (`tiled_prefill_attention`), a bounded chunk of pairs at a
time, merged by online softmax.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moelens_jax.model import moe, transformer
from moelens_jax.ops.prefill import packed_prefill_attention

TILE = 64  # rows per tile of the block-sparse prefill attention
PAIR_CHUNK_BYTES = 256 << 20  # temporaries of one chunk of tile pairs (bounds GA's memory)


def pair_bytes(heads: int, kv_heads: int, head_dim: int, itemsize: int) -> int:
    """Temporaries of one tile pair in `tiled_prefill_attention`: gathered q/k/v, float32
    logits, probabilities and their mask, float32 partial output, its merged and gathered
    running state."""
    return (TILE * heads * head_dim * (itemsize + 12) + 2 * TILE * kv_heads * head_dim * itemsize
            + 3 * TILE * TILE * heads * 4)


def pair_chunk(num_pairs: int, heads: int, kv_heads: int, head_dim: int, itemsize: int,
               budget: int = PAIR_CHUNK_BYTES) -> int:
    """Tile pairs per chunk of `tiled_prefill_attention`: the largest power of two whose
    `pair_bytes` fit `budget` bytes, at most `num_pairs`."""
    c = max(1, budget // pair_bytes(heads, kv_heads, head_dim, itemsize))
    return max(1, min(1 << (c.bit_length() - 1), num_pairs))


def tiled_prefill_attention(q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3, chunk: int | None = None):
    """`reference.segment_causal_attention` computed only on the listed tile pairs.

    Costs O(pairs * TILE^2) instead of O(n^2): an iteration of many short prompts touches a
    thin band around the diagonal. The pairs are processed `chunk` at a time (default:
    `pair_chunk`, ~256 MB of temporaries) in a scan that carries a running max, denominator
    and numerator per query tile (online softmax), so memory is O(n * heads * d + chunk) for
    any pair count: ~8k pairs at a 32k-token budget never materialise ~28 GB of logits.
    Pairs may come in any order (they are sorted by query tile here); padding pairs
    (`pairs_p3[:, 2] == 0`) are ignored. Rows with seg < 0 get zeros. Returns float32.
    """
    q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3 = map(
        jnp.asarray, (q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3))
    n, hq, d = q_nhd.shape
    g = k_ngd.shape[1]
    s = hq // g
    nt = n // TILE
    chunk = chunk or pair_chunk(pairs_p3.shape[0], hq, g, d, jnp.dtype(q_nhd.dtype).itemsize)
    qt = q_nhd.reshape(nt, TILE, g, s, d)
    kt, vt = k_ngd.reshape(nt, TILE, g, d), v_ngd.reshape(nt, TILE, g, d)
    segt, post = seg_n.reshape(nt, TILE), pos_n.reshape(nt, TILE)
    # Sort by query tile (padding last, as tile nt) and pad to whole chunks.
    tile_p = jnp.where(pairs_p3[:, 2] > 0, pairs_p3[:, 0], nt)
    order = jnp.argsort(tile_p, stable=True)
    tile_p, kj_p = tile_p[order], pairs_p3[order, 1]
    pad = -pairs_p3.shape[0] % chunk
    tile_p = jnp.pad(tile_p, (0, pad), constant_values=nt).reshape(-1, chunk)
    kj_p = jnp.pad(kj_p, (0, pad)).reshape(-1, chunk)

    def step(carry, xs):
        big_m, big_l, big_o = carry  # [nt, g, s, T] x2, [nt, g, s, T, d]
        tile, kj = xs
        real = tile < nt
        qi = jnp.minimum(tile, nt - 1)
        logits = jnp.einsum("ptgsd,pugd->pgstu", qt[qi], kt[kj],
                            preferred_element_type=jnp.float32) * d ** -0.5
        sq, sk, pq, pk = segt[qi], segt[kj], post[qi], post[kj]
        valid = ((sq[:, :, None] == sk[:, None, :]) & (sq[:, :, None] >= 0)
                 & (pk[:, None, :] <= pq[:, :, None]) & real[:, None, None])[:, None, None]
        logits = jnp.where(valid, logits, -1e30)
        m = jnp.max(logits, axis=-1)  # [C, g, s, T]
        p = jnp.where(valid, jnp.exp(logits - m[..., None]), 0.0)
        o = jnp.einsum("pgstu,pugd->pgstd", p, vt[kj], preferred_element_type=jnp.float32)
        # Merge the chunk's pairs per query tile (one slot per run of equal tiles) ...
        slot = jnp.cumsum(jnp.concatenate([jnp.ones(1, bool), tile[1:] != tile[:-1]])) - 1
        slot_tile = jnp.full(chunk, nt, tile.dtype).at[slot].set(tile)
        m_loc = jax.ops.segment_max(m, slot, num_segments=chunk)
        w = jnp.exp(m - m_loc[slot])
        l_loc = jax.ops.segment_sum(jnp.sum(p, axis=-1) * w, slot, num_segments=chunk)
        o_loc = jax.ops.segment_sum(o * w[..., None], slot, num_segments=chunk)
        # ... then into the running per-tile state (tile nt = padding: dropped).
        m_old = big_m.at[slot_tile].get(mode="fill", fill_value=-1e30)
        m_new = jnp.maximum(m_old, m_loc)
        a, b = jnp.exp(m_old - m_new), jnp.exp(m_loc - m_new)
        l_new = big_l.at[slot_tile].get(mode="fill", fill_value=0.0) * a + l_loc * b
        o_new = (big_o.at[slot_tile].get(mode="fill", fill_value=0.0) * a[..., None]
                 + o_loc * b[..., None])
        return (big_m.at[slot_tile].set(m_new, mode="drop"),
                big_l.at[slot_tile].set(l_new, mode="drop"),
                big_o.at[slot_tile].set(o_new, mode="drop")), None

    init = (jnp.full((nt, g, s, TILE), -1e30, jnp.float32),
            jnp.zeros((nt, g, s, TILE), jnp.float32),
            jnp.zeros((nt, g, s, TILE, d), jnp.float32))
    (_, den, num), _ = jax.lax.scan(step, init, (tile_p, kj_p))
    out = jnp.where(den[..., None] > 0, num / jnp.maximum(den, 1e-30)[..., None], 0.0)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(n, hq, d)


def ga_stage(cfg, kv_dtype, lw, x_nh, pos_n, seg_n, pairs_p3, attention=None):
    """GA: QKV + RoPE for every row, causal attention of the prefill rows (zeros elsewhere).

    Prefill attention reads K/V rounded to the KV store's dtype, exactly what decode reads back
    from the store later, so a sequence recomputed after preemption sees the same numbers.
    `attention` defaults to `prefill_attention` (chosen per backend at lowering); tests pass
    `tiled_prefill_attention` to compile the accelerator's path on a CPU."""
    q, k, v = transformer.pre_attention(cfg, lw, x_nh, pos_n)
    k_s, v_s = k.astype(kv_dtype), v.astype(kv_dtype)
    return q, k, v, (attention or prefill_attention)(q, k_s, v_s, seg_n, pos_n, pairs_p3)


def prefill_attention(q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3):
    """The C++ packed-prefill kernel on the CPU backend (work proportional to the rows each row
    attends to), `tiled_prefill_attention` on any other (chosen at lowering)."""
    return jax.lax.platform_dependent(
        q_nhd, k_ngd, v_ngd, seg_n, pos_n, pairs_p3,
        cpu=lambda q, k, v, seg, pos, _: packed_prefill_attention(q, k, v, seg, pos),
        default=tiled_prefill_attention)


def gb_stage(cfg, lw, x_nh, attn_nqd, mask_n, expert_ffn=None):
    """GB in one computation on every backend: O projection, residual, norm, router, experts
    over the routed rows only (`moe.expert_ffn`'s default path: the C++ grouped kernel on CPU,
    "blocked" elsewhere; the group sizes never leave the device), residual. Tests pass
    `expert_ffn` (e.g. "blocked") to compile the accelerator's path on a CPU."""
    x, xn, routing = transformer.attention_out_and_route(cfg, lw, x_nh, attn_nqd)
    return transformer.experts_residual(cfg, lw, x, xn, routing,
                                        expert_ffn or moe.expert_ffn, token_mask_n=mask_n)
