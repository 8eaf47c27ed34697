"""Calibration: measure this machine (and this engine) into a `HardwareSpec`.

`calibrate(model)` takes well under a minute and caches its result as JSON keyed by a
hardware fingerprint and the model shape (`~/.cache/moelens_jax/`, or $MOELENS_CACHE):

* the pipeline profiler: the engine itself runs two short seeded workloads (prefill-heavy and
  decode-heavy) with per-stage timing, and a least-squares fit of its per-iteration records
  gives the device line t_layer(n) = a + b n (GA + GB per layer; `gemm_flops` = 2 *
  active_params / b), the host-stage terms (fixed, per token, per KV byte read) and the
  per-iteration rest (lm_head + sampling per logits row, fixed) - the same terms Stage 2
  charges (stage2.iteration_seconds);
* host->device bandwidth as the weight mover achieves it, streaming whole layer buffers (one
  contiguous transfer each) for >= 1 GB in total (or 1/16 of RAM if smaller). On a CPU
  backend the "transfer" may alias the host buffer, so the rate is very high and t_io ~ 0;
  the engine's `h2d_limit_gb_per_s` cap is what emulates a link there;
* host memory read bandwidth (the C++ streaming-read probe).

On a CPU-only backend `shared_cores` is True (device and host stages run on the same cores).
The decode-attention read rate comes from the fit (it is what the engine achieves, conversion
and dispatch included); `experiments/bench_cpu_attention.py` measures the kernel alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time

import jax
import numpy as np

from moelens_jax import _cpu_ops, ops
from moelens_jax.perf.hardware import HardwareSpec


def fingerprint() -> str:
    """Short hash of what the calibration depends on (CPU, core count, ISA, jax, devices)."""
    info = ops.cpu_info()
    key = json.dumps([platform.processor() or platform.machine(), info["cpu_count"],
                      info["isa"], jax.__version__, jax.default_backend(),
                      [d.device_kind for d in jax.devices()]])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _cache_path(cfg) -> str:
    root = os.environ.get("MOELENS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "moelens_jax")
    shape = hashlib.sha256(repr(cfg).encode()).hexdigest()[:8]
    return os.path.join(root, f"calibration-{fingerprint()}-{cfg.name or 'model'}-{shape}.json")


def measure_h2d(model, min_bytes: int) -> float:
    """Bytes/s the engine's weight mover achieves streaming whole layers (each one large
    contiguous transfer), over at least `min_bytes` (and at least every layer once)."""
    from moelens_jax.runtime.mover import WeightMover

    mover = WeightMover(model, depth=1)
    mover.get(0)  # warm-up (compiles the unpack)
    bytes0, secs0, layer = mover.bytes_moved, mover.copy_s, 1
    while mover.bytes_moved - bytes0 < min_bytes or layer <= mover.num_layers:
        mover.get(layer % mover.num_layers)
        layer += 1
    mover.close()
    return (mover.bytes_moved - bytes0) / (mover.copy_s - secs0)


def measure_host_bandwidth(nbytes: int = 256 << 20, repeats: int = 5) -> float:
    probe = np.ones(nbytes, np.uint8)
    _cpu_ops.stream_read(probe)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        _cpu_ops.stream_read(probe)
        times.append(time.perf_counter() - t)
    return nbytes / float(np.median(times))


def _nonneg_lstsq(a: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares with x >= 0 (drops features that come out negative, refits)."""
    keep = np.ones(a.shape[1], bool)
    while True:
        x = np.zeros(a.shape[1])
        x[keep] = np.linalg.lstsq(a[:, keep], y, rcond=None)[0]
        if (x >= 0).all():
            return x
        keep &= x > 0


def fit_engine_costs(cfg, per_iteration: list[dict]) -> dict:
    """Stage-2 cost terms from an engine's per-iteration records (serial mode)."""
    L = cfg.num_layers
    it = per_iteration
    n = np.array([r["prefill_tokens"] + r["decode_tokens"] for r in it], float)
    seqs = np.array([r["logit_rows"] for r in it], float)
    kv = np.array([r["kv_tokens_read"] for r in it], float)
    rows = np.array([r["padded_rows"] for r in it], float)
    dev = np.array([r["ga_s"] + r["gb_s"] for r in it]) / L
    host = np.array([r["c_s"] for r in it]) / L
    rest = np.array([r["wall_s"] - r["ga_s"] - r["gb_s"] - r["c_s"] for r in it])
    ones = np.ones_like(n)
    a, b, c = _nonneg_lstsq(np.stack([ones, n, rows], 1), dev)
    per_layer_kv = cfg.kv_bytes_per_token() / L
    h0, h_tok, h_kv = _nonneg_lstsq(np.stack([ones, n, kv * per_layer_kv], 1), host)
    r0, r_seq = _nonneg_lstsq(np.stack([ones, seqs], 1), rest)
    return {"layer_fixed_s": a, "gemm_flops": 2.0 * cfg.active_params_per_layer / max(b, 1e-15),
            "padded_row_s": c,
            "attn_fixed_s": h0, "attn_s_per_token": h_tok,
            "cpu_attn_bytes_per_s": 1.0 / max(h_kv, 1e-15), "iteration_fixed_s": r0,
            "head_s_per_seq": r_seq}


def profile_engine(model, kv_cache_bytes: int | None = None, seed: int = 0) -> list[dict]:
    """Runs the engine (serial, stage-timed) on two short workloads; returns its records."""
    from moelens_jax import workloads
    from moelens_jax.runtime.engine import Engine

    cfg = model.config
    kv = kv_cache_bytes or 4096 * 16 * cfg.kv_bytes_per_token()
    eng = Engine(model, kv_cache_bytes=kv, pipeline="serial")
    records = []
    # Prefill-heavy with large iterations, decode-heavy with small ones, then a mix with many
    # sequences; each run once untimed (compiles) and once recorded.
    for num, p, g, budget in ((12, 160, 4, 1024), (32, 24, 12, 128), (64, 32, 16, 512)):
        eng.token_budget = budget
        reqs = workloads.synthetic(num, p, g, cfg.vocab_size, seed=seed)
        eng.generate(reqs)
        eng.generate(reqs)
        records += eng.stats.per_iteration
    eng.mover.close()
    return records


def cached(cfg) -> HardwareSpec | None:
    """The cached calibration of this machine for `cfg`'s shape, if one exists."""
    path = _cache_path(cfg)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return HardwareSpec.from_json(f.read())


def calibrate(model, *, use_cache: bool = True, h2d_bytes: int | None = None) -> HardwareSpec:
    """Measures the local machine with this engine and `model` (see module docstring)."""
    cfg = model.config
    path = _cache_path(cfg)
    if use_cache and (hit := cached(cfg)) is not None:
        return hit
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    nbytes = h2d_bytes or int(min(1e9, ram / 16))
    h2d = measure_h2d(model, nbytes)
    host_bw = measure_host_bandwidth()
    fit = {k: float(v) for k, v in fit_engine_costs(cfg, profile_engine(model)).items()}
    on_cpu = jax.default_backend() == "cpu"
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    hw = HardwareSpec(
        name=f"local:{fingerprint()}", h2d_bytes_per_s=h2d, d2h_bytes_per_s=h2d,
        host_memory_bandwidth=host_bw, host_memory_bytes=float(ram),
        device_memory_bytes=float((stats or {}).get("bytes_limit", ram)),
        shared_cores=on_cpu, source=f"calibrate() for {cfg.name or 'model'} on "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}", **fit)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(hw.to_json())
    return hw
