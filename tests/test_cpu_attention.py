"""CPU decode attention vs a float64 numpy reference, on every ISA path this machine runs,
and the JAX bridge (pure_callback inside jit) vs the direct call."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from moelens_jax import _cpu_ops, ops
from moelens_jax.kv import KV_DTYPES, PagedKVStore, cpu_decode_attention
from moelens_jax.kv.bridge import FFI_TARGET

ISAS = ops.supported_isas()
# Against K/V as stored (already rounded to the storage dtype): only float32 accumulation and
# the kernel's exp (rel. error ~1e-7) differ from float64, so one tolerance fits every dtype.
STORED_ATOL = 2e-5
# Against the unrounded float32 inputs: dominated by rounding K/V to the storage dtype. int8's
# per-element error (amax / 254 of its row) is of bf16's order (2^-9 relative); float8 e4m3's
# (2^-4 relative) is 32x bf16's unit roundoff, of which errors that partly cancel over the
# softmax leave ~4x here (measured worst 0.05 on these sequences).
INPUT_ATOL = {"float32": 2e-5, "float16": 5e-3, "bfloat16": 4e-2, "int8": 4e-2,
              "float8_e4m3fn": 0.15}
LENGTHS = lambda ps: [1, ps - 1, ps, ps + 1, 1003]  # noqa: E731
# Paths that multiply an int8 store with integer dot products (attention_avx2.cc): queries are
# rounded to 16 bits per row (step max|q| / 32767) and each page's softmax weights times the V
# scales to 16 bits per (page, head). The first is reproduced exactly in `round_q16`; the
# second moves each weight by <= half a step of its page's largest, and the softmax sum holds
# every page's largest weight, so it moves the output by <= page_size * max|v| * 2^-16.
INT_DOT_ISAS = {"avx2"}


def round_q16(q, scale):
    """q * scale rounded as the integer-dot kernels round it (per row of head_dim, float32
    steps exactly as `QuantiseRowsI16`: codes rint(x * (32767 / amax)), value code * amax /
    32767), divided by `scale` again for `reference`."""
    qs = q.astype(np.float32) * np.float32(scale)
    amax = np.abs(qs).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.float32(32767) / amax
    codes = np.where(amax > 0, np.rint(qs * inv), 0).astype(np.float32)
    return (codes.astype(np.float64) * (amax / np.float32(32767))) / scale


def stored_reference(q, ks, vs, group, scale, *, dtype, isa, page_size):
    """`reference` over K/V as stored, and the tolerance of the kernel `isa` runs for `dtype`:
    STORED_ATOL, plus the integer-dot paths' rounding of the softmax weights (see above)."""
    if dtype == "int8" and isa in INT_DOT_ISAS and q.shape[-1] % 16 == 0:
        vmax = max((float(np.nanmax(np.abs(v))) for v in vs if v.size), default=0.0)
        return (reference(round_q16(q, scale), ks, vs, group, scale),
                STORED_ATOL + page_size * vmax * 2.0 ** -16)
    return reference(q, ks, vs, group, scale), STORED_ATOL


def reference(q, ks, vs, group, scale):
    """float64 two-pass softmax attention; q [n, Hq, d], ks/vs lists of [T, Hkv, d]."""
    out = np.zeros(q.shape, np.float64)
    for b, (k, v) in enumerate(zip(ks, vs, strict=True)):
        for h in range(q.shape[1]):
            s = k[:, h // group].astype(np.float64) @ q[b, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            out[b, h] = (p / p.sum()) @ v[:, h // group].astype(np.float64)
    return out


def _filled(rng, lengths, kv_heads, d, ps, dtype, layers=2, layer=1):
    store = PagedKVStore(layers, kv_heads, d, num_pages=sum(-(-n // ps) for n in lengths) + 1,
                         page_size=ps, dtype=dtype)
    ks, vs = [], []
    for i, n in enumerate(lengths):
        store.add_sequence(100 + i)
        k = (rng.standard_normal((n, kv_heads, d)) * 1.5).astype(np.float32)
        v = rng.standard_normal((n, kv_heads, d)).astype(np.float32)
        store.append([100 + i], [n], layer, k, v)
        ks.append(k)
        vs.append(v)
    return store, ks, vs


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", KV_DTYPES)
@pytest.mark.parametrize("ps", [16, 32])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("d", [64, 128])
def test_matches_float64_reference(d, group, ps, dtype, isa):
    rng = np.random.default_rng(d + group + ps)
    kv_heads = 2
    lengths = LENGTHS(ps)
    store, ks, vs = _filled(rng, lengths, kv_heads, d, ps, dtype)
    q = rng.standard_normal((len(lengths), kv_heads * group, d)).astype(np.float32)
    ids = [100 + i for i in range(len(lengths))]
    out = store.decode_attention(q, ids, 1, isa=isa, chunk_tokens=256)
    stored = [store.read(i, 1) for i in ids]
    ref_stored, atol = stored_reference(q, [s[0] for s in stored], [s[1] for s in stored],
                                        group, d ** -0.5, dtype=dtype, isa=isa, page_size=ps)
    np.testing.assert_allclose(out, ref_stored, rtol=0, atol=atol)
    ref_input = reference(q, ks, vs, group, d ** -0.5)
    np.testing.assert_allclose(out, ref_input, rtol=0, atol=INPUT_ATOL[dtype])


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("group,d", [(3, 64), (6, 128), (16, 64), (2, 40), (7, 24)])
def test_odd_groups_and_head_dims(group, d, isa):
    """Groups > 8 are split into head blocks; head_dim not a multiple of the vector width
    falls back to a narrower kernel; all must still be exact."""
    rng = np.random.default_rng(group * d)
    store, ks, vs = _filled(rng, [5, 70, 33], 1, d, 16, "bfloat16")
    q = rng.standard_normal((3, group, d)).astype(np.float32)
    out = store.decode_attention(q, [100, 101, 102], 1, isa=isa, scale=0.3, chunk_tokens=16)
    stored = [store.read(i, 1) for i in (100, 101, 102)]
    ref = reference(q, [s[0] for s in stored], [s[1] for s in stored], group, 0.3)
    np.testing.assert_allclose(out, ref, rtol=0, atol=STORED_ATOL)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_int8_store_propagates_nan(where, isa):
    """A NaN in the query or in a stored row gives NaN in every column of the heads that see
    it and leaves the other heads exact (those sharing the NaN head's kv head included), on
    the integer-dot path as on the float ones (the SIMD exp once clamped a NaN score to
    exp(-87.3), silently dropping a token with a NaN key)."""
    rng = np.random.default_rng(11)
    d, ps = 64, 16
    store = PagedKVStore(2, 2, d, num_pages=8, page_size=ps, dtype="int8")
    store.add_sequence(100)
    k = rng.standard_normal((40, 2, d)).astype(np.float32)
    v = rng.standard_normal((40, 2, d)).astype(np.float32)
    q = rng.standard_normal((1, 8, d)).astype(np.float32)
    q_ref = q.copy()
    if where == "q":
        q[0, 1, 5] = np.nan  # query head 1 (kv head 0)
    elif where == "k":
        k[21, 0, 3] = np.nan
    else:
        v[21, 0, 3] = np.nan
    store.append([100], [40], 1, k, v)
    out = store.decode_attention(q, [100], 1, isa=isa)
    bad = [1] if where == "q" else [0, 1, 2, 3]
    good = [h for h in range(8) if h not in bad]
    assert np.isnan(out[0, bad]).all()
    kk, vv = store.read(100, 1)
    ref, atol = stored_reference(q_ref, [kk], [vv], 4, d ** -0.5, dtype="int8", isa=isa,
                                 page_size=ps)
    np.testing.assert_allclose(out[:, good], ref[:, good], rtol=0, atol=atol)


INT_DOT_CASES = [(isa, group, d) for isa in sorted(INT_DOT_ISAS & set(ISAS))
                 for group in range(1, 9) for d in (16, 64, 128)]


@pytest.mark.parametrize("isa,group,d", INT_DOT_CASES)
def test_int8_integer_path_rounds_the_queries_exactly(isa, group, d):
    """One token per page: each page's only softmax weight rounds to exactly 32767 steps, so
    the integer-dot path differs from float64 only by its query rounding, which `round_q16`
    reproduces: STORED_ATOL, not the weight-rounding bound. Every group size (5-7 take the
    4 + remainder head passes), sequences of 1-37 tokens."""
    rng = np.random.default_rng(group * 100 + d)
    store, _, _ = _filled(rng, [1, 2, 37], 2, d, 1, "int8")
    q = rng.standard_normal((3, 2 * group, d)).astype(np.float32)
    out = store.decode_attention(q, [100, 101, 102], 1, isa=isa, chunk_tokens=8)
    stored = [store.read(i, 1) for i in (100, 101, 102)]
    ks, vs = [s[0] for s in stored], [s[1] for s in stored]
    np.testing.assert_allclose(out, reference(round_q16(q, d ** -0.5), ks, vs, group,
                                              d ** -0.5), rtol=0, atol=STORED_ATOL)
    assert np.abs(out - reference(q, ks, vs, group, d ** -0.5)).max() > STORED_ATOL / 100


@pytest.mark.parametrize("isa,group,d", INT_DOT_CASES)
def test_int8_integer_path_pairs_tokens_exactly(isa, group, d):
    """Equal weights on every token (q = 0) and V rows of equal amax (equal scales): every
    16-bit weight is exactly 32767, so the output is the mean of the stored V rows to within
    STORED_ATOL — which pins the pairing of tokens, the odd last token of a page and the
    order of the 16 columns each integer pass writes back."""
    rng = np.random.default_rng(group * 7 + d)
    ps, lengths = 16, [1, 15, 16, 17, 33]
    store = PagedKVStore(2, 2, d, num_pages=8, page_size=ps, dtype="int8")
    for i, n in enumerate(lengths):
        store.add_sequence(100 + i)
        k = rng.standard_normal((n, 2, d)).astype(np.float32)
        v = rng.standard_normal((n, 2, d)).astype(np.float32)
        v /= np.abs(v).max(-1, keepdims=True)
        store.append([100 + i], [n], 1, k, v)
    ids = [100 + i for i in range(len(lengths))]
    q = np.zeros((len(lengths), 2 * group, d), np.float32)
    out = store.decode_attention(q, ids, 1, isa=isa)
    for b, i in enumerate(ids):
        mean = store.read(i, 1)[1].astype(np.float64).mean(0)  # [kv_heads, d]
        np.testing.assert_allclose(out[b], np.repeat(mean, group, axis=0), rtol=0,
                                   atol=STORED_ATOL)


@pytest.mark.parametrize("isa", sorted(INT_DOT_ISAS & set(ISAS)))
def test_int8_integer_path_at_its_overflow_bound(isa):
    """head_dim 2048 and a 256-token page (the limits of the integer path) with every code
    at +-127 and a query of full-scale 16-bit codes aligned with one key's signs: each int32
    lane sums 256 products of 32767 * 127 (~1.07e9 < 2^31). An overflow would wrap that
    key's score negative; instead it dominates as in float64."""
    d, ps, n = 2048, 256, 256
    rng = np.random.default_rng(3)
    store = PagedKVStore(1, 1, d, num_pages=2, page_size=ps, dtype="int8")
    store.add_sequence(100)
    k = np.where(rng.random((n, 1, d)) < 0.5, -1.0, 1.0).astype(np.float32)
    v = rng.standard_normal((n, 1, d)).astype(np.float32)
    store.append([100], [n], 0, k, v)
    q = k[7:8].copy()  # [1, 1, d]: q . k_7 = d, the most a key can score
    out = store.decode_attention(q, [100], 0, isa=isa, scale=4e-3)
    kk, vv = store.read(100, 0)
    ref, atol = stored_reference(q, [kk], [vv], 1, 4e-3, dtype="int8", isa=isa, page_size=ps)
    assert ref[0, 0] @ vv[7, 0] > 0.5 * vv[7, 0] @ vv[7, 0]  # key 7 dominates
    np.testing.assert_allclose(out, ref, rtol=0, atol=atol)


def test_results_do_not_depend_on_chunking_or_threads():
    rng = np.random.default_rng(5)
    store, _, _ = _filled(rng, [3000, 2, 17, 900], 8, 128, 16, "bfloat16")
    q = rng.standard_normal((4, 32, 128)).astype(np.float32)
    ids = [100, 101, 102, 103]
    base = store.decode_attention(q, ids, 1, chunk_tokens=1 << 20)  # one chunk per sequence
    before = _cpu_ops.num_threads()
    try:
        for threads in (1, 2, 3):
            _cpu_ops.set_num_threads(threads)
            for chunk in (16, 100, 512):
                out = store.decode_attention(q, ids, 1, chunk_tokens=chunk)
                np.testing.assert_allclose(out, base, rtol=0, atol=1e-5)
    finally:
        _cpu_ops.set_num_threads(before)


def test_isa_paths_agree():
    rng = np.random.default_rng(9)
    store, _, _ = _filled(rng, [37, 260], 2, 128, 16, "bfloat16")
    q = rng.standard_normal((2, 8, 128)).astype(np.float32)
    outs = [store.decode_attention(q, [100, 101], 1, isa=isa) for isa in ISAS]
    for o in outs[1:]:
        np.testing.assert_allclose(o, outs[0], rtol=0, atol=STORED_ATOL)


def test_effective_isa_reports_fallbacks():
    best = ISAS[-1]
    assert _cpu_ops.effective_isa(best, "bfloat16", 128) == best
    assert _cpu_ops.effective_isa("portable", "bfloat16", 128) == "portable"
    if "avx2" in ISAS:
        assert _cpu_ops.effective_isa("avx2", "float32", 12) == "portable"  # 12 % 8 != 0


# ----- the JAX bridge ------------------------------------------------------------------------

def test_pure_callback_inside_jit_equals_direct_call():
    rng = np.random.default_rng(11)
    store, _, _ = _filled(rng, [5, 40, 17], 2, 64, 16, "bfloat16")
    q = rng.standard_normal((3, 8, 64)).astype(np.float32)
    ids = np.array([100, 101, 102])
    fn = jax.jit(lambda q, ids, layer: cpu_decode_attention(store, q, ids, layer) * 2.0)
    got = np.asarray(fn(q, ids, 1)) / 2.0
    np.testing.assert_array_equal(got, store.decode_attention(q, ids, 1))
    # bf16 q (as a jitted stage might produce) is computed in float32 too.
    got16 = fn(jnp.asarray(q, jnp.bfloat16), ids, 1)
    want16 = store.decode_attention(q.astype(ml_dtypes.bfloat16).astype(np.float32), ids, 1)
    np.testing.assert_allclose(np.asarray(got16) / 2.0, want16, rtol=0, atol=1e-6)


def test_append_outside_jit_is_seen_by_the_next_call():
    """The append is an eager host call, so the jitted attention can never miss or repeat it."""
    rng = np.random.default_rng(12)
    store, _, _ = _filled(rng, [9], 2, 64, 16, "float32")
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    fn = jax.jit(lambda q: cpu_decode_attention(store, q, jnp.array([100]), 1))
    first = np.asarray(fn(q))
    new = np.full((1, 2, 64), 3.0, np.float32)
    store.append([100], [1], 1, new, new)
    second = np.asarray(fn(q))
    assert not np.allclose(first, second)
    np.testing.assert_array_equal(second, store.decode_attention(q, [100], 1))
    np.testing.assert_array_equal(np.asarray(fn(q)), second)  # re-run: same, not re-appended
    assert store.length(100, 1) == 10


def test_vmap_runs_the_callback_per_element():
    rng = np.random.default_rng(13)
    store, _, _ = _filled(rng, [4, 30], 1, 64, 16, "bfloat16")
    qs = rng.standard_normal((3, 2, 2, 64)).astype(np.float32)
    out = jax.vmap(lambda q: cpu_decode_attention(store, q, jnp.array([100, 101]), 1))(qs)
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(out[i]),
                                      store.decode_attention(qs[i], [100, 101], 1))


def test_bridge_shape_errors():
    store = PagedKVStore(1, 1, 8, num_pages=1)
    with pytest.raises(ValueError, match="q must be"):
        cpu_decode_attention(store, jnp.ones((2, 8)), jnp.array([0, 1]), 0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_ffi_and_callback_paths_agree(dtype):
    rng = np.random.default_rng(14)
    store, _, _ = _filled(rng, [3, 50, 700], 2, 128, 16, dtype)
    q = rng.standard_normal((3, 8, 128)).astype(np.float32)
    ids = jnp.array([100, 101, 102])
    outs = {p: np.asarray(jax.jit(lambda q, ids, layer, p=p: cpu_decode_attention(
        store, q, ids, layer, path=p))(q, ids, 1)) for p in ("ffi", "callback", "auto")}
    np.testing.assert_array_equal(outs["ffi"], outs["callback"])
    np.testing.assert_array_equal(outs["auto"], outs["ffi"])
    np.testing.assert_array_equal(outs["ffi"], store.decode_attention(q, ids, 1))


# Zero, negative, NaN, infinite, and float64 values that round to 0 / inf in float32.
BAD_SCALES = [0.0, -0.0, -0.5, float("nan"), float("inf"), float("-inf"), 1e300, 1e-50]


@pytest.mark.parametrize("scale", BAD_SCALES, ids=str)
def test_bad_scales_are_value_errors_on_every_path(scale):
    """Never silently replaced by the default: Python rejects them before calling C++, and the
    C++ adapter rejects them when called directly."""
    rng = np.random.default_rng(16)
    store, _, _ = _filled(rng, [5], 1, 64, 16, "float32")
    q = rng.standard_normal((1, 2, 64)).astype(np.float32)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        store.decode_attention(q, [100], 1, scale=scale)
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        store._s.decode_attention_into(q, np.array([100]), 1, scale, "portable", 512,
                                       np.empty_like(q))
    for path in ("ffi", "callback", "auto"):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            jax.jit(lambda q, path=path: cpu_decode_attention(store, q, jnp.array([100]), 1,
                                                              scale=scale, path=path))(q)


@pytest.mark.parametrize("scale", [0.0, -0.5, float("nan"), float("inf")], ids=str)
def test_ffi_handler_rejects_bad_scales(scale):
    """The FFI handler itself (called without the bridge's check) returns an error."""
    rng = np.random.default_rng(17)
    store, _, _ = _filled(rng, [5], 1, 64, 16, "float32")
    q = rng.standard_normal((1, 2, 64)).astype(np.float32)

    def call(q, scale, default_scale):
        return jax.ffi.ffi_call(FFI_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))(
            q, jnp.array([100], jnp.int32), jnp.int32(1), store_id=np.int64(store.handle),
            scale=np.float32(scale), default_scale=np.bool_(default_scale),
            chunk_tokens=np.int64(512), isa=np.int64(0))

    with pytest.raises(Exception, match="scale must be a finite positive number"):
        jax.block_until_ready(jax.jit(lambda q: call(q, scale, False))(q))
    # default_scale=True ignores `scale`: 1/sqrt(head_dim), as the direct call's default.
    got = np.asarray(jax.jit(lambda q: call(q, scale, True))(q))
    np.testing.assert_array_equal(got, store.decode_attention(q, [100], 1, isa="portable"))


def test_explicit_scale_is_used_and_none_is_the_default():
    rng = np.random.default_rng(18)
    store, ks, vs = _filled(rng, [40], 2, 64, 16, "float32")
    q = rng.standard_normal((1, 4, 64)).astype(np.float32)
    default = store.decode_attention(q, [100], 1)
    np.testing.assert_array_equal(store.decode_attention(q, [100], 1, scale=64 ** -0.5), default)
    for path in ("ffi", "callback"):
        for scale in (None, 0.3):
            got = jax.jit(lambda q, path=path, scale=scale: cpu_decode_attention(
                store, q, jnp.array([100]), 1, scale=scale, path=path))(q)
            np.testing.assert_array_equal(np.asarray(got),
                                          store.decode_attention(q, [100], 1, scale=scale))
    np.testing.assert_allclose(store.decode_attention(q, [100], 1, scale=0.3),
                               reference(q, ks, vs, 2, 0.3), rtol=0, atol=STORED_ATOL)


def test_auto_path_lowers_to_the_ffi_call_on_cpu():
    store = PagedKVStore(1, 1, 8, num_pages=1)
    text = jax.jit(lambda q: cpu_decode_attention(store, q, jnp.array([0]), 0)).lower(
        jnp.ones((1, 1, 8))).as_text()
    assert "moelens_decode_attention" in text


def test_ffi_errors_are_exceptions_not_crashes():
    rng = np.random.default_rng(15)
    store, _, _ = _filled(rng, [4], 1, 64, 16, "bfloat16")
    q = rng.standard_normal((1, 2, 64)).astype(np.float32)
    fn = jax.jit(lambda q, ids: cpu_decode_attention(store, q, ids, 1, path="ffi"))
    with pytest.raises(Exception, match="unknown sequence id 999"):
        jax.block_until_ready(fn(q, jnp.array([999])))
    with pytest.raises(Exception, match=r"layer 5 out of range"):
        jax.block_until_ready(jax.jit(lambda q: cpu_decode_attention(
            store, q, jnp.array([100]), 5, path="ffi"))(q))

    def compiled_for_a_store_that_dies():
        doomed = PagedKVStore(1, 1, 64, num_pages=1)
        fn = jax.jit(lambda q: cpu_decode_attention(doomed, q, jnp.array([0]), 0, path="ffi"))
        return fn.lower(jnp.ones((1, 1, 64))).compile()

    stale = compiled_for_a_store_that_dies()
    gc.collect()
    with pytest.raises(Exception, match="unknown KV store handle"):
        jax.block_until_ready(stale(jnp.ones((1, 1, 64))))
