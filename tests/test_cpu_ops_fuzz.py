"""Random-call fuzz of the C++ kernels (KV store, decode attention, grouped expert FFN, packed
prefill attention), and thread-pool stress tests.

The fuzz drives seeded random sequences of valid AND invalid calls (add/free, append with good
and bad ids, counts, layers, shapes and dtypes, attention with good and bad ids, shapes, layers,
scales, ISAs) through `PagedKVStore` and the raw binding, against a small Python model of the
store. A valid call must match the model (attention: a float64 numpy reference over the model's
K/V, within the tolerance `stored_reference` gives the kernel that runs); an invalid one must
raise the documented error and change nothing.

The expert and prefill kernels get random shapes, group sizes and layouts against float64 /
dense references, and invalid ones that must raise. The stress tests swap the thread pool
(`set_num_threads`) from one thread while another attends (directly and through the FFI path of
a jitted call) or runs the expert kernel on it. `.ci/sanitize` runs this file under
AddressSanitizer + UBSan, where any out-of-bounds access or use-after-free aborts the run.
"""

from __future__ import annotations

import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from test_cpu_attention import BAD_SCALES, stored_reference

from moelens_jax import _cpu_ops, ops
from moelens_jax.kv import KvCapacityError, PagedKVStore, cpu_decode_attention
from moelens_jax.reference import stored_kv

STORAGE = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
           "float32": np.dtype(np.float32)}
# Store geometries, one fuzz run each: (layers, kv_heads, head_dim, page_size, dtype, pages).
# Small pools so the cache fills up; head dims that hit the vector kernels (64, 128) and the
# scalar fallbacks (8, 24, 40); page sizes of 1, odd, and a power of two.
GEOMETRIES = [(3, 2, 24, 3, "bfloat16", 8), (2, 2, 64, 16, "float32", 12),
              (1, 3, 40, 17, "float16", 10), (3, 1, 8, 1, "bfloat16", 40),
              (2, 4, 128, 16, "bfloat16", 16), (2, 1, 16, 5, "float32", 20),
              (2, 2, 64, 16, "int8", 12), (2, 3, 24, 3, "float8_e4m3fn", 10)]
FUZZ_OPS = 1500  # per geometry; ~0.5 s each on one laptop core
MAX_LIVE = 16  # sequences alive at once
STRESS_SECONDS = 2.0


class _Model:
    """What the store should hold: per live sequence and layer, the stored (rounded) K/V rows."""

    def __init__(self, num_layers: int, num_pages: int, page_size: int):
        self.L, self.num_pages, self.ps = num_layers, num_pages, page_size
        # seq id -> per layer: (list of K rows [H, d], list of V rows [H, d]) as float32
        self.seqs: dict[int, list[tuple[list, list]]] = {}

    def length(self, sid: int, layer: int) -> int:
        return len(self.seqs[sid][layer][0])

    def pages(self, sid: int) -> int:
        return -(-max(len(k) for k, _ in self.seqs[sid]) // self.ps)

    def free(self) -> int:
        return self.num_pages - sum(self.pages(s) for s in self.seqs)

    def append_need(self, sids, counts, layer: int) -> int:
        return sum(max(0, -(-(self.length(s, layer) + c) // self.ps) - self.pages(s))
                   for s, c in zip(sids, counts, strict=True))

    def pages_needed(self, sids, counts) -> int:
        longest = lambda s: max(len(k) for k, _ in self.seqs[s])  # noqa: E731
        return sum(max(0, -(-(longest(s) + c) // self.ps) - self.pages(s))
                   for s, c in zip(sids, counts, strict=True))

    def kv(self, sid: int, layer: int, H: int, d: int) -> tuple[np.ndarray, np.ndarray]:
        k, v = self.seqs[sid][layer]
        shape = (0, H, d)
        return (np.stack(k) if k else np.zeros(shape, np.float32),
                np.stack(v) if v else np.zeros(shape, np.float32))


class _Fuzzer:
    """One seeded run over one store geometry: random calls, each checked as it is made."""

    def __init__(self, seed: int, geometry: tuple):
        self.rng = np.random.default_rng(seed)
        self.L, self.H, self.d, self.ps, self.dtype, pages = geometry
        self.store = PagedKVStore(self.L, self.H, self.d, num_pages=pages, page_size=self.ps,
                                  dtype=self.dtype)
        self.model = _Model(self.L, pages, self.ps)
        self.isas = ops.supported_isas()
        self.counts = {"valid": 0, "invalid": 0, "capacity": 0, "attention": 0}

    # ----- helpers -----
    def new_id(self) -> int:
        while True:
            sid = int(self.rng.choice([self.rng.integers(-1000, 1000),
                                       self.rng.integers(-2**62, 2**62), -2**63, 2**63 - 1]))
            if sid not in self.model.seqs:
                return sid

    def live(self) -> list[int]:
        return list(self.model.seqs)

    def some_live(self, k: int) -> list[int]:
        live = self.live()
        return [int(s) for s in self.rng.choice(live, size=min(k, len(live)), replace=False)]

    def new_kv(self, n: int, heads: int | None = None, d: int | None = None):
        """Random (k, v) rows, both float32 or both the store's 16-bit dtype (which C++ takes
        as raw bits)."""
        shape = (n, self.H if heads is None else heads, self.d if d is None else d)
        raw = self.dtype in ("bfloat16", "float16") and self.rng.random() < 0.5
        k, v = (self.rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        return (k.astype(STORAGE[self.dtype]), v.astype(STORAGE[self.dtype])) if raw else (k, v)

    def expect(self, exc, match: str, call) -> None:
        """An invalid call: raises `exc` (message matching) and leaves the store unchanged."""
        with pytest.raises(exc, match=match):
            call()
        self.counts["invalid"] += 1
        self.check_state()

    def check_state(self) -> None:
        s, m = self.store, self.model
        assert s.free_pages() == m.free()
        assert s.num_sequences() == len(m.seqs)
        for sid in m.seqs:
            assert len(s.page_table(sid)) == m.pages(sid)
            for layer in range(self.L):
                assert s.length(sid, layer) == m.length(sid, layer)

    # ----- operations -----
    def op_add(self) -> None:
        if len(self.live()) >= MAX_LIVE:
            return self.op_free()
        if self.live() and self.rng.random() < 0.25:
            self.expect(ValueError, "already exists",
                        lambda: self.store.add_sequence(self.rng.choice(self.live())))
            return
        sid = self.new_id()
        self.store.add_sequence(sid)
        self.model.seqs[sid] = [([], []) for _ in range(self.L)]
        self.counts["valid"] += 1

    def op_free(self) -> None:
        if not self.live() or self.rng.random() < 0.25:
            self.expect(IndexError, "unknown sequence id",
                        lambda: self.store.free_sequence(self.new_id()))
            return
        sid = int(self.rng.choice(self.live()))
        self.store.free_sequence(sid)
        del self.model.seqs[sid]
        self.counts["valid"] += 1

    def op_append(self) -> None:
        if not self.live():
            return self.op_add()
        sids = self.some_live(int(self.rng.integers(1, 5)))
        counts = [int(c) for c in self.rng.integers(0, 2 * self.ps + 2, len(sids))]
        layer = int(self.rng.integers(0, self.L))
        k, v = self.new_kv(sum(counts))
        need = self.model.append_need(sids, counts, layer)
        if need > self.model.free():
            self.counts["capacity"] += 1
            self.expect(KvCapacityError, f"needs {need} new pages",
                        lambda: self.store.append(sids, counts, layer, k, v))
            return
        self.store.append(sids, counts, layer, k, v)
        stored_k = stored_kv(np.asarray(k, np.float32), self.dtype)
        stored_v = stored_kv(np.asarray(v, np.float32), self.dtype)
        row = 0
        for s, c in zip(sids, counts, strict=True):
            ks, vs = self.model.seqs[s][layer]
            ks.extend(stored_k[row:row + c])
            vs.extend(stored_v[row:row + c])
            row += c
        self.counts["valid"] += 1

    def op_bad_append(self) -> None:
        if not self.live():
            return self.op_add()
        s, rng = self.store, self.rng
        sids = self.some_live(int(rng.integers(1, 4)))
        counts = [int(c) for c in rng.integers(0, 4, len(sids))]
        n = sum(counts)
        layer = int(rng.integers(0, self.L))
        case = str(rng.choice(["dup", "unknown", "negative", "layer", "rows", "heads", "dim",
                               "dtype", "mixed", "counts_len", "ids_2d", "v_rows"]))
        k, v = self.new_kv(n)
        if case == "dup":
            self.expect(ValueError, "appears twice", lambda: s.append(
                sids + sids[:1], counts + [1], layer, *self.new_kv(n + 1)))
        elif case == "unknown":
            self.expect(IndexError, "unknown sequence id", lambda: s.append(
                sids + [self.new_id()], counts + [1], layer, *self.new_kv(n + 1)))
        elif case == "negative":
            bad = counts[:-1] + [-int(rng.integers(1, 5))]
            self.expect(ValueError, "negative token count", lambda: s.append(
                sids, bad, layer, *self.new_kv(sum(bad[:-1]))))
        elif case == "layer":
            bad_layer = int(rng.choice([-1, self.L, 2**31 - 1]))
            self.expect(IndexError, "out of range", lambda: s.append(sids, counts, bad_layer,
                                                                     k, v))
        elif case == "rows":
            self.expect(ValueError, "rows but counts sum to", lambda: s.append(
                sids, counts, layer, *self.new_kv(n + 1)))
        elif case == "heads":
            self.expect(ValueError, "dimension 1 must be", lambda: s.append(
                sids, counts, layer, *self.new_kv(n, heads=self.H + 1)))
        elif case == "dim":
            self.expect(ValueError, "dimension 2 must be", lambda: s.append(
                sids, counts, layer, *self.new_kv(n, d=self.d - 1)))
        elif case == "mixed":  # v not of k's dtype
            self.expect(ValueError, "v must have dtype", lambda: s.append(
                sids, counts, layer, k, v.astype(np.int16)))
        elif case == "dtype":
            bad = np.ones((n, self.H, self.d), np.int32)
            self.expect(ValueError, "k must be float32, or uint16",
                        lambda: s.append(sids, counts, layer, bad, bad))
        elif case == "counts_len":
            self.expect(ValueError, "counts has shape", lambda: s.append(
                sids, counts + [0], layer, k, v))
        elif case == "ids_2d":
            self.expect(ValueError, "1-D integer", lambda: s.append(
                [sids], counts, layer, k, v))
        else:  # v_rows
            self.expect(ValueError, "v has shape", lambda: s.append(
                sids, counts, layer, k, self.new_kv(n + 1)[0].astype(k.dtype)))

    def op_pages_needed(self) -> None:
        if not self.live() or self.rng.random() < 0.3:
            case = self.rng.random()
            if not self.live() or case < 0.5:
                self.expect(IndexError, "unknown sequence id",
                            lambda: self.store.pages_needed([self.new_id()], [1]))
            else:
                self.expect(ValueError, "negative token count",
                            lambda: self.store.pages_needed(self.some_live(1), [-3]))
            return
        sids = self.some_live(int(self.rng.integers(1, 4)))
        counts = [int(c) for c in self.rng.integers(0, 3 * self.ps, len(sids))]
        assert self.store.pages_needed(sids, counts) == self.model.pages_needed(sids, counts)
        self.counts["valid"] += 1

    def op_read(self) -> None:
        if not self.live() or self.rng.random() < 0.3:
            if self.live() and self.rng.random() < 0.5:
                self.expect(IndexError, "out of range",
                            lambda: self.store.read(self.some_live(1)[0], self.L))
            else:
                self.expect(IndexError, "unknown sequence id",
                            lambda: self.store.read(self.new_id(), 0))
            return
        sid, layer = self.some_live(1)[0], int(self.rng.integers(0, self.L))
        k, v = self.store.read(sid, layer)
        want_k, want_v = self.model.kv(sid, layer, self.H, self.d)
        np.testing.assert_array_equal(k, want_k)
        np.testing.assert_array_equal(v, want_v)
        self.counts["valid"] += 1

    def attendable(self, layer: int) -> list[int]:
        return [s for s in self.model.seqs if self.model.length(s, layer) > 0]

    def op_attention(self) -> None:
        rng = self.rng
        layer = int(rng.integers(0, self.L))
        ready = self.attendable(layer)
        if not ready:
            return self.op_append()
        n = int(rng.integers(0, 5))
        ids = [int(x) for x in rng.choice(ready, size=n)]  # repeats allowed (read-only)
        group = int(rng.choice([1, 2, 3, 8, 9]))  # 9 > kMaxGroup: split into head blocks
        q = rng.standard_normal((n, self.H * group, self.d)).astype(np.float32)
        scale = None if rng.random() < 0.4 else float(rng.uniform(0.3, 1.5)) * self.d ** -0.5
        isa = str(rng.choice(self.isas))
        out = self.store.decode_attention(q, ids, layer, scale=scale, isa=isa,
                                          chunk_tokens=int(rng.choice([1, self.ps, 5, 64, 512])))
        assert out.shape == q.shape and out.dtype == np.float32
        kvs = [self.model.kv(s, layer, self.H, self.d) for s in ids]
        want, atol = stored_reference(q, [k for k, _ in kvs], [v for _, v in kvs], group,
                                      self.d ** -0.5 if scale is None else scale,
                                      dtype=self.dtype, isa=isa, page_size=self.ps)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, want, rtol=0, atol=atol)
        self.counts["valid"] += 1
        self.counts["attention"] += 1

    def op_bad_attention(self) -> None:
        s, rng, H, d = self.store, self.rng, self.H, self.d
        layer = int(rng.integers(0, self.L))
        ready = self.attendable(layer)
        empty = [x for x in self.model.seqs if self.model.length(x, layer) == 0]
        cases = ["unknown", "layer"] + (["empty"] if empty else [])
        if ready:
            cases += ["dim", "heads", "ids_len", "scale_py", "scale_cpp", "out_shape", "isa",
                      "q_rank"]
        case = str(rng.choice(cases))
        ids = [int(x) for x in rng.choice(ready, size=int(rng.integers(1, 4)))] if ready else []
        n = len(ids)
        q = rng.standard_normal((n, H, d)).astype(np.float32)
        if case == "unknown":
            bad_ids = ids + [self.new_id()]
            q = rng.standard_normal((n + 1, H, d)).astype(np.float32)
            self.expect(IndexError, "unknown sequence id",
                        lambda: s.decode_attention(q, bad_ids, layer))
        elif case == "layer":
            bad_ids = ids or [self.new_id()]
            q = rng.standard_normal((len(bad_ids), H, d)).astype(np.float32)
            bad_layer = int(rng.choice([-1, self.L, -2**31]))
            self.expect(IndexError, "out of range",  # checked before the id
                        lambda: s.decode_attention(q, bad_ids, bad_layer))
        elif case == "empty":
            bad_ids = ids + [int(rng.choice(empty))]
            q = rng.standard_normal((n + 1, H, d)).astype(np.float32)
            self.expect(ValueError, "no cached tokens",
                        lambda: s.decode_attention(q, bad_ids, layer))
        elif case == "dim":
            q = rng.standard_normal((n, H, d + int(rng.choice([-1, 1])))).astype(np.float32)
            self.expect(ValueError, "dimension 2 must be",
                        lambda: s.decode_attention(q, ids, layer))
        elif case == "heads":
            heads = 0 if H == 1 or rng.random() < 0.3 else H * 2 + 1
            q = np.ones((n, heads, d), np.float32)
            self.expect(ValueError, "positive multiple",
                        lambda: s.decode_attention(q, ids, layer))
        elif case == "ids_len":
            self.expect(ValueError, "dimension 0 must be",
                        lambda: s.decode_attention(q, ids + ids[:1], layer))
        elif case == "scale_py":
            bad = float(rng.choice(BAD_SCALES))
            self.expect(ValueError, "scale", lambda: s.decode_attention(q, ids, layer,
                                                                        scale=bad))
        elif case == "scale_cpp":  # the C++ adapter checks too, without the Python guard
            bad = float(rng.choice(BAD_SCALES))
            self.expect(ValueError, "scale", lambda: s._s.decode_attention_into(
                q, np.array(ids, np.int64), layer, bad, "portable", 512, np.empty_like(q)))
        elif case == "out_shape":
            out = np.empty((n, H, d + 1), np.float32)
            self.expect(ValueError, "out has shape", lambda: s._s.decode_attention_into(
                q, np.array(ids, np.int64), layer, None, "portable", 512, out))
        elif case == "isa":
            self.expect(ValueError, "unknown ISA",
                        lambda: s.decode_attention(q, ids, layer, isa="sse9"))
        else:  # q_rank
            self.expect(ValueError, "q must have rank 3",
                        lambda: s.decode_attention(q.reshape(n, H * d), ids, layer))

    def run(self, num_ops: int) -> dict[str, int]:
        ops_ = [self.op_add, self.op_free, self.op_append, self.op_bad_append,
                self.op_pages_needed, self.op_read, self.op_attention, self.op_bad_attention]
        for _ in range(num_ops):
            # Frees grow likelier as the cache fills, so it is full some of the time, not always.
            full = 1 - self.model.free() / self.model.num_pages
            weights = np.array([0.10, 0.02 + 0.2 * full**2, 0.28, 0.12, 0.05, 0.05, 0.20, 0.13])
            ops_[int(self.rng.choice(len(ops_), p=weights / weights.sum()))]()
            self.check_state()
        return self.counts


@pytest.mark.parametrize("seed,geometry", list(enumerate(GEOMETRIES)),
                         ids=[f"{g[4]}-d{g[2]}-ps{g[3]}" for g in GEOMETRIES])
def test_random_valid_and_invalid_calls(seed, geometry):
    counts = _Fuzzer(seed, geometry).run(FUZZ_OPS)
    # The driver really exercised every kind of outcome, a full cache included.
    assert (counts["valid"] > 100 and counts["invalid"] > 50 and counts["attention"] > 20
            and counts["capacity"] > 0), counts


def test_set_num_threads_while_attention_runs():
    """One thread swaps the attention pool (set_num_threads 1 <-> 2) in a loop while another
    attends on it, directly and through the FFI path of a jitted call: every result stays exact
    (the kernel's result does not depend on the thread count) and nothing crashes or hangs.

    A call holds its pool for its whole duration; before it did, the swap freed the pool under
    the running call (ASan: heap-use-after-free within the first second)."""
    rng = np.random.default_rng(21)
    store = PagedKVStore(2, 4, 128, num_pages=200, page_size=16, dtype="bfloat16")
    ids = np.array([100, 101, 102])
    for sid, n in zip(ids, [1500, 40, 900], strict=True):
        store.add_sequence(sid)
        kv = rng.standard_normal((n, 4, 128)).astype(np.float32)
        store.append([sid], [n], 1, kv, -kv)
    q = rng.standard_normal((3, 16, 128)).astype(np.float32)
    want = store.decode_attention(q, ids, 1, chunk_tokens=128)
    ffi = jax.jit(lambda q: cpu_decode_attention(store, q, jnp.asarray(ids), 1, path="ffi",
                                                 chunk_tokens=128))
    np.testing.assert_array_equal(np.asarray(ffi(q)), want)  # compiled before the race

    before = _cpu_ops.num_threads()
    stop = threading.Event()
    done = {"swaps": 0, "direct": 0, "ffi": 0}
    errors: list[BaseException] = []

    def swap():
        while not stop.is_set():
            for n in (1, 2):
                _cpu_ops.set_num_threads(n)
                done["swaps"] += 1

    def attend():
        try:
            deadline = time.monotonic() + STRESS_SECONDS
            while time.monotonic() < deadline:
                np.testing.assert_array_equal(store.decode_attention(q, ids, 1,
                                                                     chunk_tokens=128), want)
                done["direct"] += 1
                np.testing.assert_array_equal(np.asarray(ffi(q)), want)
                done["ffi"] += 1
        except BaseException as e:  # re-raised in the test's thread below
            errors.append(e)

    swapper = threading.Thread(target=swap, daemon=True)
    attender = threading.Thread(target=attend, daemon=True)
    swapper.start()
    attender.start()
    try:
        attender.join(STRESS_SECONDS + 60)
        assert not attender.is_alive(), f"attention hung (pool destroyed under it?): {done}"
    finally:
        stop.set()
        swapper.join(60)
        _cpu_ops.set_num_threads(before)
    if errors:
        raise errors[0]
    assert done["swaps"] > 10 and done["direct"] > 5 and done["ffi"] > 5, done


# --- the expert FFN and prefill-attention kernels (also run under ASan/UBSan by .ci/sanitize) ---

EXPERT_CASES = 24


def _expert_reference(w, x, gs, bf16=None):
    """float64 grouped SwiGLU with the kernel's rounding (x and bf16 activations rounded;
    `bf16`: whether they round, default the weights' dtype)."""
    wg, wu, wd = (np.asarray(a, np.float64) for a in w)
    bf16 = w[0].dtype == jnp.bfloat16 if bf16 is None else bf16
    xdt = jnp.bfloat16 if bf16 else jnp.float32
    xr = np.asarray(jnp.asarray(x).astype(xdt).astype(jnp.float32), np.float64)
    out = np.zeros((x.shape[0], wd.shape[-1]))
    start = 0
    for e, g in enumerate(gs):
        rows = xr[start:start + g]
        gate, up = rows @ wg[e], rows @ wu[e]
        a = gate / (1 + np.exp(-gate)) * up
        if bf16:
            a = np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)
        out[start:start + g] = a @ wd[e]
        start += g
    return out


def test_expert_kernel_random_valid_and_invalid_calls():
    """Random shapes (widths below and above the SIMD width and the packed GEMM's 256-row
    blocks), dtypes and group sizes (empty experts, one expert taking everything, groups for
    each of the kernel's three GEMMs, padding rows), plus invalid group sizes and weight
    shapes/dtypes that must raise, never crash."""
    from moelens_jax.ops.experts import grouped_expert_ffn

    rng = np.random.default_rng(5)
    bad = 0
    for case in range(EXPERT_CASES):
        E, h, f = int(rng.integers(1, 9)), int(rng.integers(1, 70)), int(rng.integers(1, 90))
        if case % 3 == 0:  # inner dimensions past one packed block (256 rows)
            h, f = int(rng.integers(250, 320)), int(rng.integers(250, 320))
        dt = jnp.bfloat16 if case % 2 else jnp.float32
        w = [jnp.asarray(rng.standard_normal(s) * 0.3, dt) for s in ((E, h, f), (E, h, f),
                                                                      (E, f, h))]
        gs = rng.multinomial(int(rng.integers(0, 160)), rng.dirichlet(np.ones(E))).astype(np.int32)
        if case % 5 == 0:
            gs[:] = 0
            gs[-1] = int(rng.integers(1, 40))  # one expert takes every row
        m = int(gs.sum()) + int(rng.integers(0, 5))  # trailing padding rows
        x = rng.standard_normal((m, h)).astype(np.float32)
        got = np.asarray(grouped_expert_ffn(*w, jnp.asarray(x), jnp.asarray(gs)))
        want = _expert_reference(w, x, gs)
        tol = 2e-2 if dt == jnp.bfloat16 else 1e-4
        np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0)
        np.testing.assert_array_equal(got[int(gs.sum()):], 0.0)
        if E > 1:  # invalid: a negative group, or more rows than x has
            for bad_gs in (np.r_[gs[:-1], -1], np.r_[gs[:-1], gs[-1] + m + 1]):
                with pytest.raises(Exception, match="negative|sum to"):
                    jax.block_until_ready(grouped_expert_ffn(*w, jnp.asarray(x),
                                                             jnp.asarray(bad_gs, np.int32)))
                bad += 1
    with pytest.raises(Exception, match="disagree"):
        jax.block_until_ready(grouped_expert_ffn(w[0], w[1][:, :-1], w[2], jnp.asarray(x),
                                                 jnp.asarray(gs)))
    with pytest.raises(ValueError, match="share one dtype"):
        grouped_expert_ffn(w[0], w[1].astype(jnp.float16), w[2], jnp.asarray(x),
                           jnp.asarray(gs))
    assert bad > 10


def test_expert_kernel_random_quantised_calls():
    """Random int8 / int4 experts (random shapes, scale groups of 32-128 rows, float32 or
    bf16 model, random group sizes with padding rows) against the float64 loop on code x
    scale; scales of the wrong shape must raise, never crash or read past."""
    from moelens_jax.model.weights import dequantise, quantise
    from moelens_jax.ops.experts import grouped_expert_ffn

    rng = np.random.default_rng(11)
    for case in range(EXPERT_CASES // 2):
        wd = "int4" if case % 2 else "int8"
        model_dt = "bfloat16" if case % 3 == 1 else "float32"
        E = int(rng.integers(1, 7))
        if wd == "int8":
            h, f = int(rng.integers(1, 300)), int(rng.integers(1, 300))
        else:  # int4 rows come in multiples of 32 (`int4_group`)
            h, f = 32 * int(rng.integers(1, 10)), 32 * int(rng.integers(1, 10))
        q = [quantise(rng.standard_normal(s).astype(np.float32) * 0.3, wd)
             for s in ((E, h, f), (E, h, f), (E, f, h))]
        deq = [dequantise(np, c, sc, np.float32, wd) for c, sc in q]  # code x scale, unrounded
        gs = rng.multinomial(int(rng.integers(0, 120)), rng.dirichlet(np.ones(E))).astype(np.int32)
        m = int(gs.sum()) + int(rng.integers(0, 4))
        x = rng.standard_normal((m, h)).astype(np.float32)
        codes = [jnp.asarray(c) for c, _ in q]
        scales = tuple(jnp.asarray(sc) for _, sc in q)
        got = np.asarray(grouped_expert_ffn(*codes, jnp.asarray(x), jnp.asarray(gs),
                                            scales=scales, weight_dtype=wd, dtype=model_dt))
        want = _expert_reference(deq, x, gs, bf16=model_dt == "bfloat16")
        tol = 2e-2 if model_dt == "bfloat16" else 1e-4
        np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0)
        np.testing.assert_array_equal(got[int(gs.sum()):], 0.0)
        short = (scales[0], scales[1], scales[2][..., :-1])  # one output channel short
        with pytest.raises(Exception, match="s_down must be"):
            jax.block_until_ready(grouped_expert_ffn(*codes, jnp.asarray(x), jnp.asarray(gs),
                                                     scales=short, weight_dtype=wd,
                                                     dtype=model_dt))


def test_prefill_kernel_random_layouts():
    """Random packed layouts (segments of 1..300 rows, rows that belong to none) against the
    dense reference; shuffled segments and broken positions must raise."""
    from moelens_jax.ops.prefill import packed_prefill_attention
    from moelens_jax.reference import segment_causal_attention

    rng = np.random.default_rng(9)
    for _ in range(12):
        lens = [int(v) for v in rng.integers(1, 300, rng.integers(1, 5))]
        lead, tail = int(rng.integers(0, 20)), int(rng.integers(0, 20))
        n = lead + sum(lens) + tail
        seg, pos = np.full(n, -1, np.int32), np.zeros(n, np.int32)
        row = lead
        for k, ln in enumerate(lens):
            seg[row:row + ln], pos[row:row + ln] = k, np.arange(ln)
            row += ln
        g = int(rng.integers(1, 4))
        hq, d = g * int(rng.integers(1, 11)), int(rng.choice([8, 24, 64]))
        q = rng.standard_normal((n, hq, d)).astype(np.float32)
        k_ = rng.standard_normal((n, g, d)).astype(np.float32)
        v = rng.standard_normal((n, g, d)).astype(np.float32)
        got = np.asarray(packed_prefill_attention(q, k_, v, jnp.asarray(seg), jnp.asarray(pos)))
        want = np.asarray(segment_causal_attention(q, k_, v, jnp.asarray(seg), jnp.asarray(pos)))
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=0)
        if len(lens) > 1 and lens[0] > 1:
            broken = pos.copy()
            broken[lead + 1] = 5  # not consecutive
            with pytest.raises(Exception, match="not consecutive"):
                jax.block_until_ready(packed_prefill_attention(
                    q, k_, v, jnp.asarray(seg), jnp.asarray(broken)))


def test_set_num_threads_while_experts_run():
    """The expert kernel holds its pool for the whole call, like attention."""
    from moelens_jax.ops.experts import grouped_expert_ffn

    rng = np.random.default_rng(3)
    w = [jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
         for s in ((4, 64, 96), (4, 64, 96), (4, 96, 64))]
    x = jnp.asarray(rng.standard_normal((300, 64)), jnp.float32)
    gs = jnp.asarray([100, 0, 150, 50], jnp.int32)
    call = jax.jit(grouped_expert_ffn)
    want = np.asarray(call(*w, x, gs))
    before = _cpu_ops.num_threads()
    stop = threading.Event()
    swaps = [0]

    def swap():
        while not stop.is_set():
            for n in (1, 2):
                _cpu_ops.set_num_threads(n)
                swaps[0] += 1

    t = threading.Thread(target=swap, daemon=True)
    t.start()
    try:
        deadline, calls = time.monotonic() + 1.0, 0
        while time.monotonic() < deadline:
            np.testing.assert_allclose(np.asarray(call(*w, x, gs)), want, atol=1e-5, rtol=0)
            calls += 1
    finally:
        stop.set()
        t.join(60)
        _cpu_ops.set_num_threads(before)
    assert swaps[0] > 10 and calls > 5
