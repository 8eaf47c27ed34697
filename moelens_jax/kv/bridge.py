"""Decode attention from inside `jax.jit`: the C++ kernel via XLA FFI or `jax.pure_callback`.

Two paths to the same kernel, chosen per platform at lowering time
(`jax.lax.platform_dependent`): when the calling computation runs on the CPU backend, an XLA
FFI custom call (`jax.ffi.ffi_call`, zero-copy, ~0.2 us); on any other backend, a
`jax.pure_callback` (works everywhere, copies its arguments). `path=` forces one for tests and
benchmarks.

Only q, the sequence ids and the layer index cross into the callback; the KV cache stays in the
C++ store and never passes through jit inputs or outputs. In jax 0.10 a pure_callback copies
its arguments and costs ~28 us + ~20 us per argument, so keep the arguments few and small.

Appending new K/V is deliberately NOT a callback: the engine's host stage calls
`PagedKVStore.append` directly (eagerly, on the host) before dispatching the jitted attention,
so JAX can never drop, reorder or duplicate a write. Attention itself is read-only and safe as
a pure callback: running it twice gives the same answer, and its result is recomputed on every
execution (never cached across calls).

`vmap_method="sequential"`: under `jax.vmap` the callback runs once per mapped element, each a
complete, valid batch of sequences. Stage C jits this on the CPU device
(`jax.devices("cpu")[0]`), so on a GPU machine the callback never stalls the GPU stream.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moelens_jax import _cpu_ops, ops
from moelens_jax.kv.store import PagedKVStore

FFI_TARGET = "moelens_decode_attention"
jax.ffi.register_ffi_target(FFI_TARGET, _cpu_ops.decode_attention_ffi_handler(), platform="cpu")


def cpu_decode_attention(store: PagedKVStore, q: jax.Array, seq_ids: jax.Array,
                         layer: jax.Array | int, *, scale: float | None = None,
                         path: str = "auto", chunk_tokens: int = 512) -> jax.Array:
    """Attention of one query token per sequence over its cached tokens at `layer`.

    Args:
      store: the paged KV store holding every sequence in `seq_ids` (K/V already appended).
      q: [n, num_q_heads, head_dim] (any float dtype; computed in float32).
      seq_ids: [n] int sequence ids (distinct).
      layer: scalar int (traced or static).
      scale: softmax scale, finite and > 0 (a static Python number); None: 1/sqrt(head_dim).
      path: "auto" (FFI on the CPU backend, pure_callback elsewhere), "ffi" or "callback".
      chunk_tokens: KV tokens per kernel work item.

    Returns:
      float32 [n, num_q_heads, head_dim].

    Raises:
      ValueError: a zero, negative, NaN or infinite scale (at trace time); bad shapes.
    """
    scale = ops.checked_scale(scale)
    q = jnp.asarray(q, jnp.float32)
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    if q.ndim != 3 or seq_ids.shape != q.shape[:1]:
        raise ValueError(f"q must be [n, heads, head_dim] and seq_ids [n]; got {q.shape} and "
                         f"{seq_ids.shape}")

    if path not in ("auto", "ffi", "callback"):
        raise ValueError(f"path must be 'auto', 'ffi' or 'callback', got {path!r}")
    out_type = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    isa = ops.selected_isa()

    def host(q_np, ids_np, layer_np):
        return store.decode_attention(np.asarray(q_np), np.asarray(ids_np, np.int64),
                                      int(layer_np), scale=scale, isa=isa,
                                      chunk_tokens=chunk_tokens)

    def via_callback(q, seq_ids, layer):
        return jax.pure_callback(host, out_type, q, seq_ids, layer, vmap_method="sequential")

    def via_ffi(q, seq_ids, layer):
        call = jax.ffi.ffi_call(FFI_TARGET, out_type, vmap_method="sequential")
        return call(q, seq_ids, layer, store_id=np.int64(store.handle),
                    scale=np.float32(1.0 if scale is None else scale),
                    default_scale=np.bool_(scale is None),
                    chunk_tokens=np.int64(chunk_tokens), isa=np.int64(ops.ISA_LEVELS[isa]))

    if path == "callback":
        return via_callback(q, seq_ids, layer)
    if path == "ffi":
        return via_ffi(q, seq_ids, layer)
    return jax.lax.platform_dependent(q, seq_ids, layer, cpu=via_ffi, default=via_callback)
