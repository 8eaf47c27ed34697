"""Causal attention of packed prefill sequences on the CPU backend (C++ via XLA FFI).

The engine's GA stage packs the prompts of an iteration into one row block: each prompt is a
contiguous run of rows (its segment) with positions 0, 1, ...; every row attends to the rows of
its own segment at or before its position. On the CPU backend `packed_prefill_attention` runs
that in C++ (`PrefillAttention` in cpu_ops/src/attention.cc: the decode kernel's online-softmax
page kernel over float32 K/V, per (row block, kv head) on the shared thread pool) with cost
proportional to the rows each row attends to. Other backends use the engine's block-sparse XLA
formulation. `reference.segment_causal_attention` is the dense reference both are tested
against.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moelens_jax import _cpu_ops, ops

FFI_TARGET = "moelens_prefill_attention"
jax.ffi.register_ffi_target(FFI_TARGET, _cpu_ops.prefill_attention_ffi_handler(), platform="cpu")


def packed_prefill_attention(q_nhd: jax.Array, k_ngd: jax.Array, v_ngd: jax.Array,
                             seg_n: jax.Array, pos_n: jax.Array,
                             scale: float | None = None) -> jax.Array:
    """Causal attention of each row over earlier rows of its own segment (CPU backend only).

    Args:
      q_nhd: [n, n_q, d]; k_ngd, v_ngd: [n, n_kv, d] (computed in float32).
      seg_n: [n] int segment of each row (< 0: not a prefill row, output zeros); each segment
        one contiguous run of rows with consecutive positions `pos_n` [n].
      scale: softmax scale, default 1/sqrt(d); must be finite and > 0.

    Returns:
      float32 [n, n_q, d].
    """
    scale = ops.checked_scale(scale)
    out = jax.ShapeDtypeStruct(q_nhd.shape, jnp.float32)
    call = jax.ffi.ffi_call(FFI_TARGET, out, vmap_method="sequential")
    return call(q_nhd.astype(jnp.float32), k_ngd.astype(jnp.float32), v_ngd.astype(jnp.float32),
                seg_n.astype(jnp.int32), pos_n.astype(jnp.int32),
                scale=np.float32(1.0 if scale is None else scale),
                default_scale=np.bool_(scale is None),
                isa=np.int64(ops.selected_isa_level()))


__all__ = ["FFI_TARGET", "packed_prefill_attention"]
