"""Slow, obviously-correct references that every fast path is tested against.

* `expert_ffn_loop`: the expert seam as a Python loop over experts with dense matmuls (no
  `ragged_dot`), drop-in for `moe.expert_ffn`.
* `moe_block_dense`: the whole MoE block computing every expert for every token and weighting
  by a dense [n, E] routing matrix (no sorting, no dispatch).
* `segment_causal_attention`: prefill attention of packed sequences as one dense n x n masked
  matrix, the reference for the engine's block-sparse tiled version.
* `greedy_generate`: greedy decoding by full recompute with `transformer.forward` each step
  (no KV cache): the oracle for the engine.
* `stored_kv`: what the paged KV store holds for float32 K/V rows in each storage dtype (the
  8-bit formats: one amax scale per row, codes rounded to nearest-even by numpy/ml_dtypes).
* `forward_with_stored_kv`: the full-sequence forward with every K/V row rounded as the store
  holds it (what each decode step attends to), for measuring the logits error of a KV format.
* `assert_close`: the one shared, dtype-aware comparison (finiteness first; reports max and RMS
  error).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moelens_jax.config import ModelConfig
from moelens_jax.model import moe, transformer
from moelens_jax.model.layers import causal_attention, linear
from moelens_jax.model.model import Model, check_tokens


def expert_ffn_loop(w_gate_ehf, w_up_ehf, w_down_efh, x_mh, group_sizes_e):
    """Same contract as `moe.expert_ffn`, computed expert by expert with masks."""
    m = x_mh.shape[0]
    ends = jnp.cumsum(group_sizes_e)
    starts = ends - group_sizes_e
    rows = jnp.arange(m)
    out = jnp.zeros((m, w_down_efh.shape[-1]), jnp.float32)
    for e in range(w_gate_ehf.shape[0]):
        mine = (rows >= starts[e]) & (rows < ends[e])
        a = jax.nn.silu(linear(x_mh, w_gate_ehf[e])) * linear(x_mh, w_up_ehf[e])
        y = linear(a.astype(w_down_efh.dtype), w_down_efh[e])
        out = jnp.where(mine[:, None], y, out)
    return out


def moe_block_dense(cfg: ModelConfig, lw, x_nh):
    """MoE block with a dense [n, E] routing matrix and every expert run on every token."""
    routing = moe.route(cfg, lw.router, x_nh)
    dense = jnp.zeros((x_nh.shape[0], cfg.num_experts), jnp.float32)
    dense = dense.at[jnp.arange(x_nh.shape[0])[:, None], routing.experts_nk].add(
        routing.weights_nk)
    out = jnp.zeros(x_nh.shape, jnp.float32)
    for e in range(cfg.num_experts):
        a = jax.nn.silu(linear(x_nh, lw.w_gate[e])) * linear(x_nh, lw.w_up[e])
        out = out + dense[:, e:e + 1] * linear(a.astype(lw.w_down.dtype), lw.w_down[e])
    if cfg.shared_expert_intermediate_size:
        out = out + moe.shared_expert(lw, x_nh)
    return out


def segment_causal_attention(q_nhd, k_ngd, v_ngd, seg_n, pos_n):
    """Causal attention of each row over earlier rows of its own segment (seg >= 0).

    Rows with seg < 0 (decode and padding rows) get zeros.
    """
    n, hq, d = q_nhd.shape
    g = k_ngd.shape[1]
    s = hq // g
    q = q_nhd.astype(jnp.float32).reshape(n, g, s, d)
    logits = jnp.einsum("ngsd,mgd->gsnm", q, k_ngd.astype(jnp.float32)) * d ** -0.5
    valid = ((seg_n[:, None] == seg_n[None, :]) & (seg_n[:, None] >= 0)
             & (pos_n[None, :] <= pos_n[:, None]))
    logits = jnp.where(valid, logits, -1e30)
    probs = jax.nn.softmax(logits, axis=-1) * valid
    out = jnp.einsum("gsnm,mgd->ngsd", probs, v_ngd.astype(jnp.float32))
    return out.reshape(n, hq, d)


@functools.partial(jax.jit, static_argnums=(0,))
def _last_logits(cfg, weights, tokens_bt, last_b):
    x = transformer.hidden_states(cfg, weights, tokens_bt)
    x_last = jnp.take_along_axis(x, last_b[:, None, None], axis=1)[:, 0]
    return transformer.logits(cfg, weights, x_last)


def greedy_generate(model: Model, prompts: Sequence[Sequence[int]],
                    max_new_tokens: int | Sequence[int]) -> list[list[int]]:
    """Greedy decoding by full recompute (right-padded batch, one compiled shape).

    Args:
      prompts: token-id lists (lengths may differ, each >= 1).
      max_new_tokens: per-request count, or one count for all.

    Returns:
      The generated token ids of each prompt (prompt excluded).
    """
    cfg = model.config
    if isinstance(max_new_tokens, int):
        max_new_tokens = [max_new_tokens] * len(prompts)
    lens = np.array([len(p) for p in prompts])
    if len(prompts) == 0 or lens.min() < 1:
        raise ValueError("every prompt needs at least one token")
    total = int((lens + np.asarray(max_new_tokens)).max())
    tokens = np.zeros((len(prompts), total), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = check_tokens(np.asarray(p)[None], cfg.vocab_size)[0]
    weights = model.device_weights()
    out: list[list[int]] = [[] for _ in prompts]
    cur = lens.copy()
    for step in range(max(max_new_tokens)):
        nxt = np.asarray(jnp.argmax(_last_logits(cfg, weights, tokens,
                                                 jnp.asarray(cur - 1, jnp.int32)), axis=-1))
        for i in range(len(prompts)):
            if step < max_new_tokens[i]:
                out[i].append(int(nxt[i]))
                tokens[i, cur[i]] = nxt[i]
                cur[i] += 1
    return out


KV_CODE_MAX = {"int8": 127.0, "float8_e4m3fn": 448.0}


def _stored_kv(xp, x, dtype: str):
    """`stored_kv` over an array module `xp` (numpy here, jax.numpy inside jit)."""
    x = x.astype("float32")
    if dtype not in KV_CODE_MAX:
        return x.astype(dtype).astype("float32")
    top = xp.float32(KV_CODE_MAX[dtype])
    amax = xp.abs(x).max(-1, keepdims=True)
    inv = xp.where(amax > 0, top / xp.where(amax > 0, amax, 1), 0).astype("float32")
    y = x * inv
    if dtype == "int8":
        codes = xp.clip(xp.round(y), -127, 127)  # round half to even, as the store
    else:
        codes = xp.clip(y, -448, 448).astype(dtype).astype("float32")
    return (codes * (amax / top)).astype("float32")


def stored_kv(x, dtype: str) -> np.ndarray:
    """float32 K/V rows [..., head_dim] as the store returns them for storage `dtype`: rounded
    to bfloat16/float16/float32, or (8-bit formats) each row quantised with scale = amax /
    code max (127 for int8, 448 for float8 e4m3fn) and dequantised."""
    import ml_dtypes  # noqa: F401  (registers the bfloat16 / float8 dtype names with numpy)
    return _stored_kv(np, np.asarray(x, np.float32), dtype)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _forward_stored_kv(cfg, weights, tokens_bt, kv_dtype):
    B, T = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = transformer.embed(weights, tokens_bt)
    for lw in weights.layers:
        q, k, v = transformer.pre_attention(cfg, lw, x, positions)
        attn = causal_attention(q, _stored_kv(jnp, k, kv_dtype), _stored_kv(jnp, v, kv_dtype))
        x = transformer.post_attention(cfg, lw, x, attn)
    return transformer.logits(cfg, weights, x)


def forward_with_stored_kv(model: Model, tokens_bt, kv_dtype: str) -> jax.Array:
    """float32 logits [B, T, V] of the full-sequence forward in which every query attends to
    K/V rows rounded as a `kv_dtype` store holds them (`stored_kv`): the numerics of each
    decode step over a KV cache of that format."""
    tokens = check_tokens(tokens_bt, model.config.vocab_size)
    return _forward_stored_kv(model.config, model.device_weights(), tokens, kv_dtype)


def assert_close(actual, expected, *, rel_l2: float | None = None, atol: float | None = None,
                 rtol: float = 0.0, name: str = "value") -> dict[str, float]:
    """Checks finiteness, then relative L2 error and/or elementwise |a-e| <= atol + rtol*|e|.

    Returns:
      {"max_abs", "rms", "rel_l2"} errors, for reporting.
    """
    a = np.asarray(jax.device_get(actual), dtype=np.float64)
    e = np.asarray(jax.device_get(expected), dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    for label, arr in (("actual", a), ("expected", e)):
        if not np.all(np.isfinite(arr)):
            raise AssertionError(f"{name}: {label} has {np.sum(~np.isfinite(arr))} non-finite "
                                 "values")
    diff = a - e
    stats = {"max_abs": float(np.max(np.abs(diff), initial=0.0)),
             "rms": float(np.sqrt(np.mean(diff ** 2))) if diff.size else 0.0,
             "rel_l2": float(np.linalg.norm(diff) / max(np.linalg.norm(e), 1e-30))}
    if rel_l2 is not None and stats["rel_l2"] > rel_l2:
        raise AssertionError(f"{name}: relative L2 error {stats['rel_l2']:.3e} > {rel_l2:.1e} "
                             f"(max abs {stats['max_abs']:.3e}, rms {stats['rms']:.3e})")
    if atol is not None:
        bad = np.abs(diff) > atol + rtol * np.abs(e)
        if np.any(bad):
            raise AssertionError(f"{name}: {int(bad.sum())}/{bad.size} elements exceed "
                                 f"atol={atol:g} rtol={rtol:g} (max abs {stats['max_abs']:.3e},"
                                 f" rms {stats['rms']:.3e})")
    return stats
