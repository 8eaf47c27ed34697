"""The decoder as pure functions over a `ModelWeights` pytree.

Each layer is written in the three stages the engine schedules separately:

* `pre_attention`  (GA on the device): RMSNorm, QKV projections, q/k norm, RoPE;
* attention        (prefill: `causal_attention` on the device; decode: the host kernel);
* `post_attention` (GB on the device): O projection, residual, RMSNorm, router, experts
  (+ shared expert), residual.

`forward` composes them over full sequences: the causal reference path every faster path is
tested against. Why weights-as-pytree plus functions instead of NNX modules: the engine streams
each layer's weights from one contiguous host buffer into a small device buffer and calls the
stages on whatever layer is resident, so the weights must be plain data that can live on the
host, the device or nowhere (`jax.eval_shape`), rather than state owned by a module.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moelens_jax.config import ModelConfig
from moelens_jax.model import moe
from moelens_jax.model.layers import causal_attention, linear, qkv_projection, rms_norm
from moelens_jax.model.weights import LayerWeights, ModelWeights


def embed(weights: ModelWeights, tokens: jax.Array) -> jax.Array:
    """Token ids [...] -> float32 residual stream [..., h]."""
    return jnp.take(weights.embed, tokens, axis=0).astype(jnp.float32)


def pre_attention(cfg: ModelConfig, lw: LayerWeights, x_nh: jax.Array, positions_n: jax.Array):
    """GA: returns (q [..., n_q, d], k [..., n_kv, d], v [..., n_kv, d])."""
    with jax.named_scope("pre_attention"):
        return qkv_projection(cfg, lw, x_nh, positions_n)


def post_attention(cfg: ModelConfig, lw: LayerWeights, x_nh: jax.Array,
                   attn_nqd: jax.Array, expert_ffn=moe.expert_ffn) -> jax.Array:
    """GB: O projection + residual, then RMSNorm -> MoE -> residual. Shapes [..., h]."""
    with jax.named_scope("post_attention"):
        x, xn, routing = attention_out_and_route(cfg, lw, x_nh, attn_nqd)
        return experts_residual(cfg, lw, x, xn, routing, expert_ffn)


def attention_out_and_route(cfg: ModelConfig, lw: LayerWeights, x_nh: jax.Array,
                            attn_nqd: jax.Array):
    """First half of GB: O projection + residual, RMSNorm, router.

    Returns (x [..., h] residual stream, xn [n, h] normalised, `moe.Routing` over the n rows).
    """
    lead = x_nh.shape[:-1]
    x = x_nh + linear(attn_nqd.reshape(*lead, cfg.q_size), lw.wo)
    xn = rms_norm(x, lw.ffn_norm, cfg.rms_norm_eps).reshape(-1, cfg.hidden_size)
    return x, xn, moe.route(cfg, lw.router, xn)


def experts_residual(cfg: ModelConfig, lw: LayerWeights, x: jax.Array, xn_nh: jax.Array,
                     routing: moe.Routing, expert_ffn=moe.expert_ffn,
                     token_mask_n: jax.Array | None = None) -> jax.Array:
    """Second half of GB: experts (+ shared expert) over routed rows, residual.

    `token_mask_n` (bool [n]) drops padding rows from the routed experts (zero output)."""
    y = moe.moe_block(cfg, lw, xn_nh, expert_ffn, routing=routing, token_mask_n=token_mask_n)
    return x + y.reshape(x.shape)


def logits(cfg: ModelConfig, weights: ModelWeights, x_nh: jax.Array) -> jax.Array:
    """Final norm + lm_head: [..., h] -> float32 [..., V]."""
    with jax.named_scope("lm_head"):
        xn = rms_norm(x_nh, weights.final_norm, cfg.rms_norm_eps)
        head = weights.embed if weights.lm_head is None else weights.lm_head
        single = math.prod(x_nh.shape[:-1]) == 1 and head.dtype.itemsize < 4
        if single:
            # XLA's CPU backend runs a one-row 16-bit GEMV ~10x slower than two rows
            # (measured: 41 ms vs 3.6 ms for a 32000 x 512 bfloat16 head, 2-core AVX2): one
            # sequence per group (a micro-batch of 1) would pay it every iteration.
            xn = jnp.concatenate([xn.reshape(1, -1)] * 2)
        out = jnp.einsum("...h,vh->...v", xn.astype(head.dtype), head,
                         preferred_element_type=jnp.float32)
        return out[:1].reshape(*x_nh.shape[:-1], -1) if single else out


def hidden_states(cfg: ModelConfig, weights: ModelWeights, tokens_bt: jax.Array,
                  expert_ffn=moe.expert_ffn) -> jax.Array:
    """All decoder layers over full sequences: tokens [B, T] -> residual stream [B, T, h].

    Sequences may be right-padded: causal masking means padding never affects real positions.
    """
    B, T = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = embed(weights, tokens_bt)
    for i, lw in enumerate(weights.layers):
        with jax.named_scope(f"layer_{i}"):
            q, k, v = pre_attention(cfg, lw, x, positions)
            attn = causal_attention(q, k, v)
            x = post_attention(cfg, lw, x, attn, expert_ffn)
    return x


def forward(cfg: ModelConfig, weights: ModelWeights, tokens_bt: jax.Array,
            expert_ffn=moe.expert_ffn) -> jax.Array:
    """Full-sequence causal forward: tokens [B, T] -> float32 logits [B, T, V]."""
    return logits(cfg, weights, hidden_states(cfg, weights, tokens_bt, expert_ffn))
