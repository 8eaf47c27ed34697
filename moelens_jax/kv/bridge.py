"""Decode attention from inside `jax.jit`: the C++ kernel reached through `jax.pure_callback`.

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

from moelens_jax.kv.store import PagedKVStore


def cpu_decode_attention(store: PagedKVStore, q: jax.Array, seq_ids: jax.Array,
                         layer: jax.Array | int, *, scale: float | None = None) -> jax.Array:
    """Attention of one query token per sequence over its cached tokens at `layer`.

    Args:
      store: the paged KV store holding every sequence in `seq_ids` (K/V already appended).
      q: [n, num_q_heads, head_dim] (any float dtype; computed in float32).
      seq_ids: [n] int sequence ids (distinct).
      layer: scalar int (traced or static).
      scale: softmax scale, default 1/sqrt(head_dim).

    Returns:
      float32 [n, num_q_heads, head_dim].
    """
    q = jnp.asarray(q, jnp.float32)
    seq_ids = jnp.asarray(seq_ids, jnp.int32)
    layer = jnp.asarray(layer, jnp.int32)
    if q.ndim != 3 or seq_ids.shape != q.shape[:1]:
        raise ValueError(f"q must be [n, heads, head_dim] and seq_ids [n]; got {q.shape} and "
                         f"{seq_ids.shape}")

    def host(q_np, ids_np, layer_np):
        return store.decode_attention(np.asarray(q_np), np.asarray(ids_np, np.int64),
                                      int(layer_np), scale=scale)

    out_type = jax.ShapeDtypeStruct(q.shape, jnp.float32)
    return jax.pure_callback(host, out_type, q, seq_ids, layer, vmap_method="sequential")
