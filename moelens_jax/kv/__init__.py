"""The paged host KV store (Python side) and the decode-attention bridge into JAX."""

from moelens_jax.kv.bridge import cpu_decode_attention
from moelens_jax.kv.store import (
    KV_DTYPES,
    KvCapacityError,
    PagedKVStore,
    kv_compute_dtype,
    page_bytes,
)

__all__ = ["KV_DTYPES", "KvCapacityError", "PagedKVStore", "cpu_decode_attention",
           "kv_compute_dtype", "page_bytes"]
