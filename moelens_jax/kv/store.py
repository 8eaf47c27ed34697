"""Python side of the paged host KV store (the C++ `KvStore` in cpu_ops/src/kv_store.h).

Layout (owned by C++, never passed through jit): one 64-byte-aligned pool of pages; a page
holds `page_size` tokens of ONE sequence for ALL layers,

    page[layer][K=0 | V=1][kv_head][page_size][head_dim]      (storage dtype)

(the 8-bit formats, int8 and float8_e4m3fn, follow each block's codes with a float32 scale per
token: each (token, kv head) row is quantised on append with its own amax scale and
dequantised in registers by the attention kernel)

so each sequence has one page table, pages are allocated as tokens arrive (never reserved for
prompt + generation up front), and the attention kernel streams one contiguous
``page_size * head_dim`` run per (page, layer, K|V, kv head). Each layer keeps its own token count
per sequence. Every call validates its inputs in C++ and fails without changing anything.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from moelens_jax import _cpu_ops, ops
from moelens_jax.config import QUANTISED_KV_DTYPES, ModelConfig, dtype_itemsize

KvCapacityError = _cpu_ops.KvCapacityError
KV_DTYPES = ("bfloat16", "float16", "float32", *QUANTISED_KV_DTYPES)
_RAW16 = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16)}


def page_bytes(num_layers: int, num_kv_heads: int, head_dim: int, page_size: int,
               dtype: str) -> int:
    block = page_size * head_dim * dtype_itemsize(dtype)
    if dtype in QUANTISED_KV_DTYPES:  # codes (padded to 4 bytes), then a scale per token
        block = -(-block // 4) * 4 + 4 * page_size
    return num_layers * 2 * num_kv_heads * block


def kv_compute_dtype(dtype: str) -> str:
    """The dtype K/V leave the device in for a store of `dtype`: the store's own float type,
    or float32 for the 8-bit formats (the store quantises on append)."""
    return "float32" if dtype in QUANTISED_KV_DTYPES else dtype


class PagedKVStore:
    """A paged KV cache in host memory for one model.

    Args:
      num_layers, num_kv_heads, head_dim: the model's KV geometry.
      num_pages: pool size in pages; or give `budget_bytes` and it is floor(budget / page).
      page_size: tokens per page (<= 256 for the attention kernel).
      dtype: storage dtype, "bfloat16" (default), "float16", "float32", or the 8-bit "int8"
        / "float8_e4m3fn" (a float32 scale per token and kv head).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *,
                 num_pages: int | None = None, budget_bytes: int | None = None,
                 page_size: int = 16, dtype: str = "bfloat16"):
        if dtype not in KV_DTYPES:
            raise ValueError(f"unsupported KV dtype {dtype!r}; supported: {', '.join(KV_DTYPES)}")
        if (num_pages is None) == (budget_bytes is None):
            raise ValueError("give exactly one of num_pages and budget_bytes")
        if page_size <= 0:
            raise ValueError(f"page_size must be positive, got {page_size}")
        pb = page_bytes(num_layers, num_kv_heads, head_dim, page_size, dtype)
        if num_pages is None:
            num_pages = int(budget_bytes) // pb
            if num_pages < 1:
                raise ValueError(f"KV budget of {budget_bytes} bytes holds no page: one page of "
                                 f"{page_size} tokens needs {pb} bytes")
        self._s = _cpu_ops.KvStore(num_layers, num_kv_heads, head_dim, page_size, num_pages,
                                   dtype)

    @classmethod
    def for_model(cls, cfg: ModelConfig, kv_cache_bytes: int, page_size: int = 16,
                  dtype: str | None = None) -> PagedKVStore:
        """A store sized from a byte budget for `cfg` (dtype defaults to the model's)."""
        return cls(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, budget_bytes=kv_cache_bytes,
                   page_size=page_size, dtype=dtype or cfg.dtype)

    # ----- geometry and accounting -----
    num_layers = property(lambda self: self._s.num_layers)
    num_kv_heads = property(lambda self: self._s.num_kv_heads)
    head_dim = property(lambda self: self._s.head_dim)
    page_size = property(lambda self: self._s.page_size)
    page_bytes = property(lambda self: self._s.page_bytes)
    dtype = property(lambda self: self._s.dtype)
    num_pages = property(lambda self: self._s.num_pages)
    handle = property(lambda self: self._s.handle)  # names the store in FFI calls

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    def free_pages(self) -> int:
        return self._s.free_pages()

    def used_pages(self) -> int:
        return self.num_pages - self._s.free_pages()

    def num_sequences(self) -> int:
        return self._s.num_sequences()

    def pages_needed(self, seq_ids, counts) -> int:
        """New pages required for sequence i to take counts[i] more tokens."""
        return self._s.pages_needed(_ids(seq_ids), _counts(counts))

    # ----- sequences -----
    def add_sequence(self, seq_id: int) -> None:
        self._s.add_sequence(int(seq_id))

    def free_sequence(self, seq_id: int) -> None:
        self._s.free_sequence(int(seq_id))

    def has_sequence(self, seq_id: int) -> bool:
        return self._s.has_sequence(int(seq_id))

    def length(self, seq_id: int, layer: int = 0) -> int:
        return self._s.length(int(seq_id), int(layer))

    def page_table(self, seq_id: int) -> list[int]:
        return list(self._s.page_table(int(seq_id)))

    def append(self, seq_ids, counts, layer: int, k, v) -> None:
        """Appends counts[i] new tokens of sequence seq_ids[i] at `layer` (all-or-nothing).

        Args:
          k, v: [sum(counts), num_kv_heads, head_dim], float32 or the store's 16-bit dtype
            (bf16 arrays are handed to C++ as their raw uint16 bits); an 8-bit store takes
            any float array (as float32) and quantises each row.

        Raises:
          KvCapacityError: not enough free pages (message: pages needed vs free).
          IndexError / ValueError: unknown sequence, bad layer, wrong shape/dtype.
        """
        self._s.append(_ids(seq_ids), _counts(counts), int(layer), self._kv_array(k),
                       self._kv_array(v))

    def _kv_array(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype == _RAW16.get(self.dtype):
            x = x.view(np.uint16)  # raw bits; never an integer conversion
        elif x.dtype in (np.float64, np.float16) or x.dtype == np.dtype(ml_dtypes.bfloat16):
            x = x.astype(np.float32)
        return np.ascontiguousarray(x)

    def read(self, seq_id: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Cached (K, V) of one sequence at `layer` as float32 [len, kv_heads, head_dim]."""
        return self._s.read(int(seq_id), int(layer))

    # ----- attention -----
    def decode_attention(self, q, seq_ids, layer: int, *, scale: float | None = None,
                         isa: str | None = None, chunk_tokens: int = 512,
                         out: np.ndarray | None = None) -> np.ndarray:
        """One-query-token attention for each sequence over its cached tokens at `layer`.

        Args:
          q: float32 [n, num_q_heads, head_dim]; num_q_heads a multiple of num_kv_heads (query
            head h uses kv head h // group).
          seq_ids: [n] distinct sequence ids (each with >= 1 cached token at `layer`).
          scale: softmax scale, finite and > 0 (None: 1/sqrt(head_dim)).
          isa: kernel ISA (default `ops.selected_isa()`: $MOELENS_CPU_ISA or the best).
          chunk_tokens: KV tokens per work item (rounded up to whole pages).

        Returns:
          float32 [n, num_q_heads, head_dim].

        Raises:
          ValueError: a zero, negative, NaN or infinite scale; bad shapes, empty sequences.
          IndexError: unknown sequence, bad layer.
        """
        scale = ops.checked_scale(scale)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if out is None:
            out = np.empty_like(q)
        self._s.decode_attention_into(q, _ids(seq_ids), int(layer), scale,
                                      ops.selected_isa(isa), int(chunk_tokens), out)
        return out

    def __repr__(self) -> str:
        return (f"PagedKVStore(layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, page_size={self.page_size}, dtype={self.dtype}, "
                f"pages={self.num_pages}, free={self.free_pages()})")


def _ids(seq_ids) -> np.ndarray:
    a = np.asarray(seq_ids)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"seq_ids must be a 1-D integer array, got {a.dtype}{list(a.shape)}")
    return np.ascontiguousarray(a, dtype=np.int64)


def _counts(counts) -> np.ndarray:
    a = np.asarray(counts)
    if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise ValueError(f"counts must be a 1-D integer array, got {a.dtype}{list(a.shape)}")
    return np.ascontiguousarray(a, dtype=np.int32)
