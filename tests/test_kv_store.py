"""The paged KV store: a seeded random driver against a pure-Python model, and bad input."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from moelens_jax import _cpu_ops
from moelens_jax.kv import KV_DTYPES, KvCapacityError, PagedKVStore, page_bytes
from moelens_jax.reference import stored_kv


class ModelStore:
    """What the store should contain: per sequence, per layer, the rounded K/V rows."""

    def __init__(self, num_layers, num_pages, page_size):
        self.L, self.num_pages, self.ps = num_layers, num_pages, page_size
        self.seqs: dict[int, list[list[tuple[np.ndarray, np.ndarray]]]] = {}

    def pages(self, sid):
        longest = max(len(rows) for rows in self.seqs[sid])
        return -(-longest // self.ps)

    def free(self):
        return self.num_pages - sum(self.pages(s) for s in self.seqs)

    def need(self, sids, counts, layer):
        n = 0
        for s, c in zip(sids, counts, strict=True):
            longest_after = max(max(len(r) for r in self.seqs[s]), len(self.seqs[s][layer]) + c)
            n += max(0, -(-longest_after // self.ps) - self.pages(s))
        return n


@pytest.mark.parametrize("dtype", KV_DTYPES)
def test_random_operations_match_python_model(dtype):
    rng = np.random.default_rng(KV_DTYPES.index(dtype) + 1)
    L, H, d, ps, pages = 3, 2, 8, 4, 48
    store = PagedKVStore(L, H, d, num_pages=pages, page_size=ps, dtype=dtype)
    model = ModelStore(L, pages, ps)
    next_id, ops, capacity_errors = 0, 0, 0
    while ops < 10_000:
        ops += 1
        r = rng.random()
        live = list(model.seqs)
        if r < 0.15 or not live:
            store.add_sequence(next_id)
            model.seqs[next_id] = [[] for _ in range(L)]
            next_id += 1
        elif r < 0.25:
            sid = int(rng.choice(live))
            store.free_sequence(sid)
            del model.seqs[sid]
        elif r < 0.85:
            sids = [int(s) for s in rng.choice(live, size=min(len(live), rng.integers(1, 4)),
                                               replace=False)]
            counts = [int(c) for c in rng.integers(0, 9, len(sids))]
            layer = int(rng.integers(0, L))
            k = rng.standard_normal((sum(counts), H, d)).astype(np.float32)
            v = rng.standard_normal((sum(counts), H, d)).astype(np.float32)
            need = model.need(sids, counts, layer)
            assert store.pages_needed(sids, counts) >= 0
            if need > model.free():
                with pytest.raises(KvCapacityError, match=f"needs {need} new pages"):
                    store.append(sids, counts, layer, k, v)
                capacity_errors += 1
            else:
                store.append(sids, counts, layer, k, v)
                row = 0
                for s, c in zip(sids, counts, strict=True):
                    for _ in range(c):
                        model.seqs[s][layer].append((stored_kv(k[row], dtype),
                                                     stored_kv(v[row], dtype)))
                        row += 1
        else:
            if not live:
                continue
            sid, layer = int(rng.choice(live)), int(rng.integers(0, L))
            k, v = store.read(sid, layer)
            rows = model.seqs[sid][layer]
            assert k.shape == (len(rows), H, d)
            if rows:
                np.testing.assert_array_equal(k, np.stack([x[0] for x in rows]))
                np.testing.assert_array_equal(v, np.stack([x[1] for x in rows]))
            assert store.length(sid, layer) == len(rows)
            assert len(store.page_table(sid)) == model.pages(sid)
        assert store.free_pages() == model.free()
        assert store.num_sequences() == len(model.seqs)
    assert capacity_errors > 0  # the driver really exercised a full cache
    for sid in list(model.seqs):
        store.free_sequence(sid)
    assert store.free_pages() == store.num_pages == pages


def test_pages_are_allocated_as_tokens_arrive():
    store = PagedKVStore(2, 1, 8, num_pages=10, page_size=16)
    store.add_sequence(0)
    assert store.free_pages() == 10 and store.pages_needed([0], [1]) == 1
    one = np.zeros((1, 1, 8), np.float32)
    store.append([0], [1], 0, one, one)
    assert store.free_pages() == 9
    assert store.pages_needed([0], [15]) == 0 and store.pages_needed([0], [16]) == 1
    many = np.zeros((15, 1, 8), np.float32)
    store.append([0], [15], 0, many, many)
    assert store.free_pages() == 9  # 16 tokens: still one page
    store.append([0], [1], 1, one, one)  # layer 1 uses the same page
    assert store.free_pages() == 9 and store.length(0, 1) == 1 and store.length(0, 0) == 16


def test_budget_sizing_and_page_bytes():
    pb = page_bytes(32, 8, 128, 16, "bfloat16")
    assert pb == 32 * 2 * 8 * 16 * 128 * 2
    store = PagedKVStore(32, 8, 128, budget_bytes=10 * pb + pb - 1, page_size=16)
    assert store.num_pages == 10 and store.page_bytes == pb and store.capacity_tokens == 160
    with pytest.raises(ValueError, match="holds no page"):
        PagedKVStore(32, 8, 128, budget_bytes=pb - 1)


@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_quantised_pages_hold_one_scale_per_token_and_head(dtype):
    """The 8-bit formats: the byte layout (codes padded to 4 bytes, then a float32 scale per
    token) agrees between Python and C++; each (token, head) row is quantised on its own, so
    rows of very different magnitude, and all-zero rows, come back within the format's bound
    (int8: amax / 254 per element; e4m3: half a unit in the last of 3 mantissa bits, 2^-4
    relative, or amax / 448 * 2^-10 below the normal range); raw 16-bit bits are refused."""
    L, H, d, ps = 2, 3, 40, 5
    pb = page_bytes(L, H, d, ps, dtype)
    assert pb == L * 2 * H * (-(-ps * d // 4) * 4 + 4 * ps)
    store = PagedKVStore(L, H, d, num_pages=6, page_size=ps, dtype=dtype)
    assert store.page_bytes == pb and store.dtype == dtype
    rng = np.random.default_rng(7)
    k = (rng.standard_normal((13, H, d)) * rng.uniform(1e-3, 1e3, (13, H, 1))).astype(np.float32)
    k[4, 2] = 0.0
    store.add_sequence(1)
    store.append([1], [13], 1, k, -k)
    got_k, got_v = store.read(1, 1)
    np.testing.assert_array_equal(got_k, stored_kv(k, dtype))
    np.testing.assert_array_equal(got_v, -got_k)
    amax = np.abs(k).max(-1, keepdims=True)
    err = np.abs(got_k - k)
    if dtype == "int8":
        bound = amax / 254 * (1 + 1e-5)
    else:
        bound = np.maximum(np.abs(k) * 2.0 ** -4, amax / 448 * 2.0 ** -10) * (1 + 1e-5)
    assert (err <= bound).all() and not got_k[4, 2].any()
    # The wrapper hands any float array over as float32; raw 16-bit bits cannot be quantised.
    raw = k.astype(ml_dtypes.bfloat16).view(np.uint16)
    with pytest.raises(ValueError, match=f"must be float32 for a {dtype} store"):
        store._s.append(np.array([1], np.int64), np.array([13], np.int32), 0, raw, raw)
    assert store.length(1, 0) == 0


def test_bf16_input_is_taken_as_raw_bits():
    store = PagedKVStore(1, 1, 8, num_pages=2, page_size=4, dtype="bfloat16")
    store.add_sequence(1)
    x = (np.arange(8, dtype=np.float32) * 1.37).astype(ml_dtypes.bfloat16).reshape(1, 1, 8)
    store.append([1], [1], 0, x, x)
    k, _ = store.read(1, 0)
    np.testing.assert_array_equal(k, x.astype(np.float32))


# ----- bad input: clear errors, nothing changed ---------------------------------------------

@pytest.fixture
def small():
    store = PagedKVStore(2, 2, 8, num_pages=4, page_size=4)
    store.add_sequence(7)
    return store


def _kv(n, h=2, d=8, dtype=np.float32):
    return np.ones((n, h, d), dtype)


def test_unknown_and_freed_sequences(small):
    with pytest.raises(IndexError, match="unknown sequence id 8"):
        small.append([8], [1], 0, _kv(1), _kv(1))
    small.free_sequence(7)
    for call in (lambda: small.free_sequence(7), lambda: small.length(7, 0),
                 lambda: small.append([7], [1], 0, _kv(1), _kv(1)),
                 lambda: small.decode_attention(np.ones((1, 2, 8), np.float32), [7], 0)):
        with pytest.raises(IndexError, match="unknown sequence id 7 .*freed"):
            call()
    small.add_sequence(3)
    with pytest.raises(ValueError, match="already exists"):
        small.add_sequence(3)


def test_layer_out_of_range(small):
    with pytest.raises(IndexError, match=r"layer 2 out of range \[0, 2\)"):
        small.append([7], [1], 2, _kv(1), _kv(1))
    with pytest.raises(IndexError, match=r"layer -1 out of range"):
        small.decode_attention(np.ones((1, 2, 8), np.float32), [7], -1)


def test_capacity_error_reports_pages_and_changes_nothing(small):
    small.add_sequence(8)
    small.append([7], [12], 0, _kv(12), _kv(12))  # 3 of 4 pages
    with pytest.raises(KvCapacityError, match="needs 2 new pages, 1 free of 4"):
        small.append([7, 8], [1, 1], 0, _kv(2), _kv(2))
    assert small.free_pages() == 1 and small.length(7, 0) == 12 and small.length(8, 0) == 0


@pytest.mark.parametrize("k,match", [
    (_kv(1, h=3), "k has shape \\[1, 3, 8\\], dimension 1 must be 2"),
    (_kv(1, d=4), "dimension 2 must be 8"),
    (_kv(1, dtype=np.int64), "k must be float32, or uint16"),
    (_kv(2), "2 rows but counts sum to 1"),
])
def test_append_shape_and_dtype_errors(small, k, match):
    with pytest.raises(ValueError, match=match):
        small.append([7], [1], 0, k, k if k.shape[0] == 1 else k)
    assert small.length(7, 0) == 0 and small.free_pages() == 4


def test_binding_rejects_non_contiguous_and_mismatched_arrays(small):
    k = np.ones((1, 2, 16), np.float32)[:, :, ::2]
    with pytest.raises(ValueError, match="C-contiguous"):
        small._s.append(np.array([7]), np.array([1], np.int32), 0, k, k)
    with pytest.raises(ValueError, match="seq_ids must have dtype int64"):
        small._s.append(np.array([7], np.int32), np.array([1], np.int32), 0, _kv(1), _kv(1))
    with pytest.raises(ValueError, match="v has shape"):
        small._s.append(np.array([7]), np.array([1], np.int32), 0, _kv(1), _kv(2))


def test_duplicate_ids_and_negative_counts(small):
    with pytest.raises(ValueError, match="appears twice"):
        small.append([7, 7], [1, 1], 0, _kv(2), _kv(2))
    # A large batch (the check is a hash set, not a pairwise scan) with the repeat far apart.
    many = list(range(100, 20_100))
    for sid in many:
        small.add_sequence(sid)
    ids = [7, *many, 7]
    with pytest.raises(ValueError, match="sequence id 7 appears twice in one append"):
        small.append(ids, [0] * len(ids), 0, _kv(0), _kv(0))
    small.append([7, *many], [1] + [0] * len(many), 0, _kv(1), _kv(1))
    assert small.length(7, 0) == 1 and small.free_pages() == 3
    with pytest.raises(ValueError, match="negative token count"):
        small.append([7], [-1], 0, _kv(0), _kv(0))
    with pytest.raises(ValueError, match="1-D integer"):
        small.append([7.5], [1], 0, _kv(1), _kv(1))


def test_attention_input_errors(small):
    small.append([7], [3], 0, _kv(3), _kv(3))
    with pytest.raises(ValueError, match="must be a positive multiple"):
        small.decode_attention(np.ones((1, 3, 8), np.float32), [7], 0)
    with pytest.raises(ValueError, match="dimension 2 must be 8"):
        small.decode_attention(np.ones((1, 2, 4), np.float32), [7], 0)
    with pytest.raises(ValueError, match="dimension 0 must be 2"):
        small.decode_attention(np.ones((1, 2, 8), np.float32), [7, 7], 0)
    # Attention is read-only: the same sequence may appear twice (the engine pads with one).
    twice = small.decode_attention(np.ones((2, 2, 8), np.float32), [7, 7], 0)
    np.testing.assert_array_equal(twice[0], twice[1])
    with pytest.raises(ValueError, match="no cached tokens at layer 1"):
        small.decode_attention(np.ones((1, 2, 8), np.float32), [7], 1)
    missing = [i for i in ("avx2", "avx512", "avx512_bf16")
               if i not in _cpu_ops.supported_isas()]
    if missing:  # the C++ layer itself refuses an ISA the CPU cannot run
        with pytest.raises(ValueError, match="not supported by this CPU"):
            small._s.decode_attention_into(np.ones((1, 2, 8), np.float32), np.array([7]), 0,
                                           None, missing[0], 512, np.empty((1, 2, 8), np.float32))


def test_constructor_errors():
    with pytest.raises(ValueError, match="unsupported KV dtype"):
        PagedKVStore(1, 1, 8, num_pages=1, dtype="int4")
    with pytest.raises(ValueError, match="unsupported KV dtype .float8_e5m2."):
        _cpu_ops.KvStore(1, 1, 8, 16, 1, "float8_e5m2")
    with pytest.raises(ValueError, match="exactly one of"):
        PagedKVStore(1, 1, 8)
    with pytest.raises(ValueError, match="must be positive"):
        _cpu_ops.KvStore(0, 1, 8, 16, 1, "bfloat16")
    big = PagedKVStore(1, 1, 8, num_pages=1, page_size=300)
    big.add_sequence(0)
    big.append([0], [1], 0, np.ones((1, 1, 8), np.float32), np.ones((1, 1, 8), np.float32))
    with pytest.raises(ValueError, match="page_size > 256"):
        big.decode_attention(np.ones((1, 1, 8), np.float32), [0], 0)
