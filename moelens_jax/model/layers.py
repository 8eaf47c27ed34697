"""Dense building blocks: RMSNorm, RoPE, GQA projections and causal attention.

Numerics policy (all families): weights stay in their storage dtype; activations are cast to
the weight dtype right before each matmul, which accumulates in float32
(``preferred_element_type``); norms, softmax and the residual stream are float32. For float32
weights this is exactly float32 math (what the HF parity tests compare).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moelens_jax.config import ModelConfig


def linear(x: jax.Array, w: jax.Array, b: jax.Array | None = None) -> jax.Array:
    """x[..., in] @ w[in, out] (+ b) with float32 accumulation and float32 output."""
    y = jnp.einsum("...i,io->...o", x.astype(w.dtype), w, preferred_element_type=jnp.float32)
    if b is not None:
        y = y + b.astype(jnp.float32)
    return y


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF-style RMSNorm: normalise in float32, round to the weight dtype, then scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale.astype(jnp.float32) * y.astype(scale.dtype).astype(jnp.float32)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., head_dim] for integer `positions` (non-interleaved, HF layout)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_nhd: jax.Array, cos_nd: jax.Array, sin_nd: jax.Array) -> jax.Array:
    """Rotates x[..., heads, d] by per-token cos/sin[..., d] (rotate-half convention)."""
    half = x_nhd.shape[-1] // 2
    rotated = jnp.concatenate([-x_nhd[..., half:], x_nhd[..., :half]], axis=-1)
    return x_nhd * cos_nd[..., None, :] + rotated * sin_nd[..., None, :]


def qkv_projection(cfg: ModelConfig, lw, x_nd: jax.Array, positions_n: jax.Array):
    """Pre-attention stage (GA without attention): norm, QKV, optional q/k norm, RoPE.

    Args:
      x_nd: residual stream [..., h] (float32).
      positions_n: absolute token positions [...].

    Returns:
      q [..., n_q, d], k [..., n_kv, d], v [..., n_kv, d], all float32.
    """
    with jax.named_scope("qkv_projection"):
        xn = rms_norm(x_nd, lw.attn_norm, cfg.rms_norm_eps)
        lead = x_nd.shape[:-1]
        q = linear(xn, lw.wq, lw.bq).reshape(*lead, cfg.num_heads, cfg.head_dim)
        k = linear(xn, lw.wk, lw.bk).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        v = linear(xn, lw.wv, lw.bv).reshape(*lead, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q = rms_norm(q, lw.q_norm, cfg.rms_norm_eps)
            k = rms_norm(k, lw.k_norm, cfg.rms_norm_eps)
        cos, sin = rope_cos_sin(positions_n, cfg.head_dim, cfg.rope_theta)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


def causal_attention(q_bthd: jax.Array, k_btgd: jax.Array, v_btgd: jax.Array,
                     scale: float | None = None) -> jax.Array:
    """Dense causal GQA attention over full sequences (the prefill/reference path).

    Args:
      q_bthd: queries [B, T, n_q, d]; k_btgd, v_btgd: keys/values [B, T, n_kv, d].

    Returns:
      [B, T, n_q, d] float32. Row t attends to positions <= t of its own sequence, so right
      padding never changes the outputs of real tokens.
    """
    B, T, nq, d = q_bthd.shape
    nkv = k_btgd.shape[2]
    s = nq // nkv
    scale = d ** -0.5 if scale is None else scale
    with jax.named_scope("causal_attention"):
        q = q_bthd.astype(jnp.float32).reshape(B, T, nkv, s, d)
        logits = jnp.einsum("btgsd,bugd->bgstu", q, k_btgd.astype(jnp.float32)) * scale
        mask = jnp.tril(jnp.ones((T, T), dtype=bool))
        logits = jnp.where(mask, logits, -jnp.inf)
        probs = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("bgstu,bugd->btgsd", probs, v_btgd.astype(jnp.float32))
        return out.reshape(B, T, nq, d)
