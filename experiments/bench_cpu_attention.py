"""Benchmark: CPU decode attention over the paged KV store, judged against memory bandwidth.

Decode attention is memory-bound: every call streams each sequence's K and V once. The ceiling
is the machine's memory read bandwidth, measured here in the same process with a streaming-read
kernel on the same thread pool. Also measured on the same data: XLA attention (jitted jnp over
the cache in dense [B, T, H, d] form), a numpy two-pass reference (on a subset; rate scaled by
bytes), the FFI path inside jit, and thread scaling 1..N. Medians over repeats.

    python -m experiments.bench_cpu_attention                 # Mixtral shapes, 1 GiB of KV
    python -m experiments.bench_cpu_attention --num_seqs 16 --seq_len 512 --repeats 3
    python -m experiments.bench_cpu_attention --kv_dtype int8  # + its token rate vs bf16

With an 8-bit `--kv_dtype` (int8, fp8 = float8_e4m3fn) the same tokens are also held in a
bfloat16 store, and each repeat times both kernels back to back: `token_rate_vs_bf16` is the
median of those per-repeat ratios of tokens attended per second.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags

from experiments import common
from moelens_jax import _cpu_ops, ops
from moelens_jax.kv import PagedKVStore, cpu_decode_attention, page_bytes
from moelens_jax.reference import stored_kv

_NUM_SEQS = flags.DEFINE_integer("num_seqs", 128, "Sequences in the batch.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 2048, "Cached tokens per sequence.")
_KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads (Mixtral: 8).")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim (Mixtral: 128).")
_GROUP = flags.DEFINE_integer("group", 4, "Query heads per KV head (Mixtral: 4).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per page.")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", "bfloat16",
                              ["bfloat16", "float16", "float32", "int8", "fp8", "float8_e4m3fn"],
                              "KV storage dtype (fp8 = float8_e4m3fn).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed repeats (median reported).")
_THREADS = flags.DEFINE_integer("threads", 0, "Threads (0 = all available CPUs).")
_NUMPY_SEQS = flags.DEFINE_integer("numpy_seqs", 8, "Sequences timed for the numpy reference.")
_SKIP_XLA = flags.DEFINE_bool("skip_xla", False, "Skip the XLA dense baseline.")


def interleaved_rates(attend, kv_bytes: int, probe_bytes: int, repeats: int):
    """Per repeat: streaming-read GB/s over `probe_bytes`, then the kernel's KV GB/s."""
    probe = np.ones(probe_bytes, np.uint8)  # touched here, so no page faults while timing
    read = lambda: _cpu_ops.stream_read(probe)  # noqa: E731
    for _ in range(2):  # warm-up
        read()
        attend()
    mem, ker = [], []
    for _ in range(repeats):
        mem.append(probe_bytes / common.median_time(read, 1, 0) / 1e9)
        ker.append(kv_bytes / common.median_time(attend, 1, 0) / 1e9)
    return mem, ker


def xla_attention(q_bhd, k_bthd, v_bthd, group):
    """Dense reference attention as XLA sees it (float32 math on the stored dtype)."""
    B, T, H, d = k_bthd.shape
    q = q_bhd.reshape(B, H, group, d)
    s = jnp.einsum("bhgd,bthd->bhgt", q, k_bthd.astype(jnp.float32)) * d ** -0.5
    p = jax.nn.softmax(s, axis=-1)
    return jnp.einsum("bhgt,bthd->bhgd", p, v_bthd.astype(jnp.float32)).reshape(B, H * group, d)


def numpy_attention(q_bhd, k_bthd, v_bthd, group):
    B, T, H, d = k_bthd.shape
    q = q_bhd.reshape(B, H, group, d).astype(np.float32)
    s = np.einsum("bhgd,bthd->bhgt", q, k_bthd.astype(np.float32)) * d ** -0.5
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("bhgt,bthd->bhgd", s, v_bthd.astype(np.float32)).reshape(B, H * group, d)


def filled_store(dtype, B, T, H, d, page_size, base_k, base_v) -> PagedKVStore:
    """One layer of B sequences of T tokens, each a different roll of the same two arrays."""
    store = PagedKVStore(1, H, d, num_pages=B * -(-T // page_size), page_size=page_size,
                         dtype=dtype)
    for b in range(B):
        store.add_sequence(b)
        shift = (b * 7) % T
        store.append([b], [T], 0, np.roll(base_k, shift, 0), np.roll(base_v, shift, 0))
    return store


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    dtype = {"fp8": "float8_e4m3fn"}.get(_KV_DTYPE.value, _KV_DTYPE.value)
    B, T, H, d, s = (_NUM_SEQS.value, _SEQ_LEN.value, _KV_HEADS.value, _HEAD_DIM.value,
                     _GROUP.value)
    threads = _THREADS.value or len(os.sched_getaffinity(0))
    _cpu_ops.set_num_threads(threads)
    isa = ops.selected_isa()
    kernel_isa = _cpu_ops.effective_isa(isa, dtype, d)
    ps = _PAGE_SIZE.value
    # Bytes one call reads: K and V of every token (codes and scales), one token per "page".
    kv_bytes = B * T * page_bytes(1, H, d, 1, dtype)
    print(common.table([
        ("shape", f"{B} seqs x {T} tokens, {H} kv heads x {d}, group {s}, page {_PAGE_SIZE.value}"),
        ("KV bytes per call", f"{kv_bytes / 2**30:.3f} GiB ({dtype})"),
        ("threads", threads),
        ("ISA", f"{isa} (kernel: {kernel_isa})"),
        ("ceiling", "memory read bandwidth, measured below with the same threads"),
    ], "== bench_cpu_attention card =="), flush=True)

    # (b) our kernel over the paged store.
    rng = np.random.default_rng(0)
    base_k = rng.standard_normal((T, H, d)).astype(np.float32)
    base_v = rng.standard_normal((T, H, d)).astype(np.float32)
    store = filled_store(dtype, B, T, H, d, ps, base_k, base_v)
    q = rng.standard_normal((B, H * s, d)).astype(np.float32)
    ids = np.arange(B)
    out = np.empty_like(q)

    # (a) + (b), interleaved so that each ratio compares measurements taken moments apart on
    # this shared machine: a streaming read over >= 1 GiB, then the kernel, per repeat.
    mem, ker = interleaved_rates(lambda: store.decode_attention(q, ids, 0, out=out), kv_bytes,
                                 max(kv_bytes, 1 << 30), _REPEATS.value)
    mem_gbs, kernel_gbs = float(np.median(mem)), float(np.median(ker))
    fraction = float(np.median(np.array(ker) / np.array(mem)))
    t_kernel = kv_bytes / (kernel_gbs * 1e9)

    # An 8-bit store vs a bfloat16 one of the same tokens, timed back to back per repeat.
    vs_bf16 = None
    if dtype in ("int8", "float8_e4m3fn"):
        bf16 = filled_store("bfloat16", B, T, H, d, ps, base_k, base_v)
        out16 = np.empty_like(q)
        ratios = []
        for _ in range(_REPEATS.value):
            t16 = common.median_time(lambda: bf16.decode_attention(q, ids, 0, out=out16), 1)
            t8 = common.median_time(lambda: store.decode_attention(q, ids, 0, out=out), 1)
            ratios.append(t16 / t8)
        vs_bf16 = float(np.median(ratios))
        del bf16

    # FFI inside jit (the engine's path on the CPU backend).
    ffi_fn = jax.jit(lambda q, ids: cpu_decode_attention(store, q, ids, 0, path="ffi"))
    jq, jids = jnp.asarray(q), jnp.asarray(ids, jnp.int32)
    t_ffi = common.median_time(lambda: ffi_fn(jq, jids), _REPEATS.value)

    # (d) thread scaling.
    scaling = []
    for n in range(1, threads + 1):
        _cpu_ops.set_num_threads(n)
        t = common.median_time(lambda: store.decode_attention(q, ids, 0, out=out), _REPEATS.value)
        scaling.append({"threads": n, "kv_read_gb_per_s": kv_bytes / t / 1e9})
    _cpu_ops.set_num_threads(threads)

    # (c) baselines on the same data in dense form.
    # (the 8-bit formats as their dequantised float32 values)
    np_dt = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}.get(dtype, np.float32)
    dense_k = np.stack([stored_kv(np.roll(base_k, (b * 7) % T, 0), dtype)
                        for b in range(B)]).astype(np_dt)
    dense_v = np.stack([stored_kv(np.roll(base_v, (b * 7) % T, 0), dtype)
                        for b in range(B)]).astype(np_dt)
    xla_gbs = max_err_xla = float("nan")
    if not _SKIP_XLA.value:
        jk, jv = jnp.asarray(dense_k), jnp.asarray(dense_v)
        xla_fn = jax.jit(lambda q, k, v: xla_attention(q, k, v, s))
        t_xla = common.median_time(lambda: xla_fn(jq, jk, jv), _REPEATS.value)
        xla_gbs = kv_bytes / t_xla / 1e9
        max_err_xla = float(np.max(np.abs(np.asarray(xla_fn(jq, jk, jv)) - out)))
        del jk, jv
    nb = min(_NUMPY_SEQS.value, B)
    t_np = common.median_time(lambda: numpy_attention(q[:nb], dense_k[:nb], dense_v[:nb], s),
                       max(1, _REPEATS.value // 2), warmup=0)
    numpy_gbs = kv_bytes * nb / B / t_np / 1e9

    result = {
        "kv_read_gb_per_s": kernel_gbs,
        "kv_tokens_per_s": B * T / t_kernel,
        "token_rate_vs_bf16": vs_bf16,
        "kv_dtype": dtype,
        "memory_read_gb_per_s": mem_gbs,
        "bandwidth_fraction": fraction,  # median of per-repeat ratios
        "xla_kv_read_gb_per_s": xla_gbs,
        "speedup_vs_xla": kernel_gbs / xla_gbs,
        "numpy_kv_read_gb_per_s": numpy_gbs,
        "speedup_vs_numpy": kernel_gbs / numpy_gbs,
        "ffi_in_jit_kv_read_gb_per_s": kv_bytes / t_ffi / 1e9,
        "max_abs_diff_vs_xla": max_err_xla,
        "thread_scaling": scaling,
        "threads": threads,
        "isa": kernel_isa,
        "kv_bytes_per_call": kv_bytes,
        "flags": settings,
        "machine": common.machine_fingerprint(),
    }
    rows = [("memory read (stream)", f"{mem_gbs:.2f} GB/s  (ceiling)"),
            ("kernel KV read", f"{kernel_gbs:.2f} GB/s  = {fraction:.2f} of ceiling"),
            ("kernel tokens attended", f"{B * T / t_kernel / 1e6:.1f} M tokens/s"
             + (f"  = {vs_bf16:.2f}x a bf16 store of the same tokens" if vs_bf16 else "")),
            ("kernel via FFI in jit", f"{result['ffi_in_jit_kv_read_gb_per_s']:.2f} GB/s"),
            ("XLA dense attention",
             f"{xla_gbs:.2f} GB/s  (kernel {result['speedup_vs_xla']:.1f}x)"),
            ("numpy two-pass", f"{numpy_gbs:.2f} GB/s on {nb} seqs "
                               f"(kernel {result['speedup_vs_numpy']:.1f}x)"),
            ("max |kernel - XLA|", f"{max_err_xla:.2e}")]
    rows += [(f"  {r['threads']} thread(s)", f"{r['kv_read_gb_per_s']:.2f} GB/s") for r in scaling]
    print(common.table(rows, "== results (medians) =="))
    common.print_json(result)


if __name__ == "__main__":
    app.run(main)
