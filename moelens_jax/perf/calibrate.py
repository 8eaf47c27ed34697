"""Calibration: measure this machine (and this engine) into a `Calibration`: the machine's
rates (`HardwareSpec`) and the engine's cost terms (`EngineCosts`).

`calibrate(model)` caches its result as JSON keyed by a hardware fingerprint and the model
shape (`~/.cache/moelens_jax/`, or $MOELENS_CACHE); `validate_model` reports how long it took:

* the pipeline profiler: the engine itself runs three short seeded workloads (long prompts in
  large iterations, small decode-heavy iterations, many short prompts) with per-stage timing,
  each recorded run repeated (mean per iteration) until 2 s were recorded, at most 5 runs;
  non-negative least squares on the typed per-iteration records (`IterationRecord.shape`, the
  same `IterationShape` Stage 2 charges) give every `EngineCosts` term: the per-layer device
  line (per group + per token + per padded row + per prefill-attention tile pair + per
  attended prefill key + per expected active expert; the experts compute the routed rows, so
  their GEMM work is in the per-token term, and reading an active expert's weights in the
  per-expert one), the host-stage terms (per group, per token, per KV byte read) and the
  per-iteration rest (lm_head + sampling per logits row, fixed);
* host->device bandwidth as the weight mover achieves it, streaming whole layer buffers (one
  contiguous transfer each) for >= 1 GB in total (or 1/16 of RAM if smaller). On a CPU
  backend the "transfer" aliases the host buffer, so the rate is very high and t_io ~ 0 (the
  engine keeps the layers resident there and streams nothing); the engine's
  `h2d_limit_gb_per_s` cap is what emulates a link there;
* device->host bandwidth of a float32 array copied to host memory, as the engine copies
  K/V and queries to its host stage (on a CPU backend nothing crosses a link: the h2d rate
  stands in, and Stage 2 charges no activation copies there);
* host memory read bandwidth (the C++ streaming-read probe), which the CPU attention, the
  weight stream and the activation copies share;
* the device's unpacking of a streamed layer (typed weights from the copied bytes; for int8 /
  int4 layouts a dequantisation): one layer of the model, as stored and quantised, unpacked
  on the device, per byte of the unpacked layer;
* a speed probe (`speed_probe`: one fixed mixed group's stages), recorded so that a later
  probe shows how much faster or slower the machine runs now than when it was calibrated.

On a CPU-only backend `shared_cores` is True (device and host stages run on the same cores).
The decode-attention read rate comes from the fit (it is what the engine achieves, conversion
and dispatch included); `experiments/bench_cpu_attention.py` measures the kernel alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import time
import warnings

import jax
import numpy as np

from moelens_jax import _cpu_ops, ops, workloads
from moelens_jax.model.weights import WEIGHT_DTYPES, LayerLayout, packet_bounds, unpack_packets
from moelens_jax.perf.costs import EngineCosts, activation_bytes, active_experts
from moelens_jax.perf.hardware import HardwareSpec
from moelens_jax.runtime.engine import Engine
from moelens_jax.runtime.layout import IterationShape
from moelens_jax.runtime.mover import WeightMover, experts_stay_quantised
from moelens_jax.runtime.stats import IterationRecord

CALIBRATION_VERSION = 11  # bump when the fitted terms change: older cache files are not read


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
    return os.path.join(root, f"calibration-v{CALIBRATION_VERSION}-{fingerprint()}-"
                        f"{cfg.name or 'model'}-{shape}.json")


def measure_h2d(model, min_bytes: int) -> float:
    """Bytes/s the engine's weight mover achieves streaming whole layers (each one large
    contiguous transfer), over at least `min_bytes` (and at least every layer once)."""
    mover = WeightMover(model, depth=1, resident=False)
    mover.get(0)  # warm-up (compiles the unpack)
    bytes0, secs0, layer = mover.bytes_moved, mover.copy_s, 1
    while mover.bytes_moved - bytes0 < min_bytes or layer <= mover.num_layers:
        mover.get(layer % mover.num_layers)
        layer += 1
    mover.close()
    return (mover.bytes_moved - bytes0) / (mover.copy_s - secs0)


def measure_d2h(nbytes: int, repeats: int = 3) -> float:
    """Bytes/s of copying a float32 device array of `nbytes` to host memory (`np.asarray`,
    as the engine copies K/V and queries to the host stage): the median of `repeats` copies."""
    x = jax.device_put(np.zeros(max(nbytes // 4, 1), np.float32), jax.devices()[0])
    times = []
    for _ in range(repeats):
        y = x + 0  # a fresh device buffer: nothing cached on the host side
        y.block_until_ready()
        t0 = time.perf_counter()
        np.asarray(y)
        times.append(time.perf_counter() - t0)
    return x.nbytes / max(float(np.median(times)), 1e-12)


def measure_unpack(model, repeats: int = 9) -> dict[str, float]:
    """Seconds per unpacked byte of turning one copied layer into typed weights on the default
    device (`weights.unpack_packets`, as the weight mover runs it after each copy), stored in
    the model dtype ("float") and in each quantised format (int8, int4: unpacking dequantises,
    all but the routed experts where `experts_stay_quantised`, as the mover does): the median
    of `repeats` timed calls after a compile, per byte of the layer in the model dtype."""
    if not model.pageable or model.weight_dtype is not None:
        warnings.warn("calibrate: the model's float layers are not on the host (released or "
                      "quantised); unpacking is not measured and costs 0", stacklevel=2)
        return dict.fromkeys(("float", *WEIGHT_DTYPES), 0.0)
    dev = jax.devices()[0]
    fused = experts_stay_quantised(dev)
    base = model.host_layers[0]
    typed = LayerLayout.for_config(model.config, model.dtype).nbytes
    out = {}
    for wd in ("float", *WEIGHT_DTYPES):
        layer = base if wd == "float" else base.quantise(wd)
        pk = (jax.device_put(layer.buffer, dev),)
        bounds = packet_bounds(layer.layout.nbytes, layer.layout.nbytes)
        jax.block_until_ready(unpack_packets(layer.layout, bounds, pk, fused))  # compile
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(unpack_packets(layer.layout, bounds, pk, fused))
            times.append(time.perf_counter() - t0)
        out[wd] = float(np.median(times)) / typed
    return out


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


def _stage_terms(cfg, shapes: list, ga_s, gb_s, host_s, kv_dtype
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Device and host terms by non-negative least squares on the features Stage 2 charges
    (`EngineCosts.iteration`), from per-layer seconds of GA, GB and C. GA (which holds the
    prefill attention) and GB are fitted apart, so the larger, noisier GB cannot leak into
    the attention terms; the device terms are their sums."""
    L = cfg.num_layers
    col = {k: np.array([getattr(s, k) for s in shapes], float) for k in (
        "tokens", "padded_rows", "tile_pairs", "attended_keys", "kv_tokens_read")}
    groups = np.array([len(s.groups) for s in shapes], float)
    active = np.array([active_experts(cfg, s) for s in shapes], float)
    ga = _nonneg_lstsq(np.stack([groups, col["tokens"], col["padded_rows"], col["tile_pairs"],
                                 col["attended_keys"]], 1), np.asarray(ga_s, float))
    gb = _nonneg_lstsq(np.stack([groups, col["tokens"], col["padded_rows"], active], 1),
                       np.asarray(gb_s, float))
    kv_bytes = col["kv_tokens_read"] * cfg.kv_bytes_per_token(kv_dtype) / L
    host = _nonneg_lstsq(np.stack([groups, col["tokens"], kv_bytes], 1),
                         np.asarray(host_s, float))
    return np.r_[ga + np.r_[gb[:3], 0.0, 0.0], gb[3]], host


def fit_engine_costs(cfg, records: list, runs: list[tuple[float, float, int]] = (),
                     kv_dtype: str | None = None, stage_points: list | None = None,
                     d2h_s_per_byte: float = 0.0) -> EngineCosts:
    """`EngineCosts` from an engine's per-iteration records (`IterationRecord`s of serial
    runs): the per-iteration rest (lm_head + sampling per logits row, fixed) from the
    records; the device and host terms from the records (per layer) together with
    `stage_points` ((GroupShape, {"ga_s", "c_s", "gb_s"}) of `Engine.profile_group`, one
    layer each), when given. `runs`
    (wall_s, seconds in iterations, requests) per profiled run give the per-request cost
    outside iterations. With `d2h_s_per_byte` (an accelerator) the host stage's measured time
    holds the activation copies it waits for, which Stage 2 charges apart (`t_d2h`): they are
    taken out before the host terms are fitted."""
    L = cfg.num_layers

    def c_only(shape, c_s):  # one layer's host stage less its device->host copies
        return max(0.0, c_s - d2h_s_per_byte * activation_bytes(cfg, shape)[1] / L)

    # Per-layer, per-group samples: the designed micro-profile (well conditioned: attended
    # keys, rows and KV read vary independently of tokens) plus every engine iteration.
    samples = [(IterationShape((s,)), t["ga_s"], t["gb_s"], c_only(IterationShape((s,)),
                                                                    t["c_s"]))
               for s, t in stage_points or ()]
    samples += [(r.shape, r.ga_s / L, r.gb_s / L, c_only(r.shape, r.c_s / L))
                for r in records]
    dev, host = _stage_terms(cfg, *map(list, zip(*samples, strict=True)), kv_dtype)
    rest = _nonneg_lstsq(np.stack([np.ones(len(records)),
                                   [r.shape.logit_rows for r in records]], 1),
                         np.array([r.rest_s for r in records], float))
    request_s = (max(0.0, sum(w - i for w, i, _ in runs)) / sum(k for *_, k in runs)
                 if runs else 0.0)
    return EngineCosts(
        layer_fixed_s=dev[0], layer_token_s=dev[1], padded_row_s=dev[2], attn_pair_s=dev[3],
        attn_key_s=dev[4], expert_s=dev[5], attn_fixed_s=host[0], attn_s_per_token=host[1],
        attn_s_per_kv_byte=host[2], iteration_fixed_s=rest[0], head_s_per_seq=rest[1],
        request_s=request_s, shared_cores=jax.default_backend() == "cpu",
        source="fitted by calibrate()")


# The micro-profile's designed group layouts: (decode contexts, prefill lengths). Decode-only
# groups vary rows and KV read independently (and, from 1 to 4 tokens, the active experts);
# prefill groups of ~the same tokens vary the attended keys 64-fold; padding varies from none
# to 8x the tokens.
STAGE_DESIGN = (
    ([64], []), ([256] * 2, []), ([512] * 4, []),  # few tokens: few experts active
    ([64] * 8, []), ([1024] * 8, []), ([256] * 32, []), ([1024] * 32, []), ([64] * 128, []),
    ([256] * 128, []), ([32] * 256, []), ([16] * 512, []),
    ([], [1024]), ([], [256] * 4), ([], [64] * 16), ([], [16] * 64), ([], [512] * 2),
    ([], [128] * 8), ([], [64]), ([], [2048]), ([], [32] * 8), ([], [300, 200]), ([], [257]),
    ([128] * 64, [128] * 4), ([512] * 16, [900]),
)
STAGE_REPEATS = 5


def profile_stages(model, kv_cache_bytes: int | None = None) -> list:
    """`Engine.profile_group` over `STAGE_DESIGN` (medians of STAGE_REPEATS passes each)."""
    cfg = model.config
    need = max(sum(d) + sum(p) * (STAGE_REPEATS + 1) for d, p in STAGE_DESIGN)
    kv = kv_cache_bytes or 2 * need * cfg.kv_bytes_per_token()
    with Engine(model, kv_cache_bytes=kv, pipeline="serial") as eng:
        return [eng.profile_group(d, p, STAGE_REPEATS) for d, p in STAGE_DESIGN]


# The speed probe's group (decode contexts, prefill lengths): a mixed group whose stages take
# tens of milliseconds per layer at small-mixtral's size.
PROBE_GROUP = ([256] * 32, [256] * 2)


def speed_probe(model, repeats: int = 11) -> float:
    """Seconds of one layer's GA + C + GB on `PROBE_GROUP` (medians of `repeats` passes, after
    the compile): a fixed measure of how fast this machine runs this engine right now.
    `calibrate` records it (`Calibration.probe_s`); `validate_model` probes again next to each
    measurement, so a shared machine's drift between calibration and measurement is visible
    apart from the model's own error."""
    decode_kv, prefill = PROBE_GROUP
    kv = 2 * (sum(decode_kv) + sum(prefill) * (repeats + 1)) * model.config.kv_bytes_per_token()
    with Engine(model, kv_cache_bytes=kv, pipeline="serial") as eng:
        eng.profile_group(decode_kv, prefill, 1)  # compiles
        _, t = eng.profile_group(decode_kv, prefill, repeats)
    return t["ga_s"] + t["c_s"] + t["gb_s"]


PROFILE_MIN_RECORDED_S = 2.0  # per workload: repeat the recorded run (mean) up to this


def _mean_records(runs: list[list]) -> list:
    """Per-iteration means of the stage times over repeated runs of one workload (their
    plans are identical: the scheduler is deterministic). Means, not medians: a run's total
    includes its occasional slow iterations, and totals are what Stage 2 predicts."""
    return [dataclasses.replace(recs[0], **{
        k: float(np.mean([getattr(r, k) for r in recs]))
        for k in ("ga_s", "gb_s", "c_s", "io_s", "wall_s")})
        for recs in zip(*runs, strict=True)]


def _profile_workloads(vocab: int, seed: int) -> list[tuple[list, int]]:
    """(requests, token budget), chosen so the fitted terms vary independently: large
    iterations of long prompts (many attention tile pairs per row), small decode-heavy
    iterations, large iterations of many short prompts (few
    pairs per row) draining into many decoding sequences."""
    return [(workloads.synthetic(12, 160, 4, vocab, seed=seed), 1024),
            (workloads.synthetic(32, 24, 12, vocab, seed=seed), 128),
            (workloads.synthetic(64, 32, 16, vocab, seed=seed), 512)]


def profile_engine(model, kv_cache_bytes: int | None = None, seed: int = 0
                   ) -> tuple[list[IterationRecord], list[tuple[float, float, int]]]:
    """Runs the engine (serial, stage-timed) on the profile workloads: each once untimed
    (compiles; the first run of a shape also pays allocation and warm-up well beyond the
    compile time jax reports), then recorded, repeated while cheap (up to 5 runs). Returns
    the per-iteration records (averaged over the repeats) and (wall_s, seconds in
    iterations, requests) per recorded run."""
    cfg = model.config
    kv = kv_cache_bytes or 4096 * 16 * cfg.kv_bytes_per_token()
    records, runs = [], []
    for reqs, budget in _profile_workloads(cfg.vocab_size, seed):
        with Engine(model, kv_cache_bytes=kv, pipeline="serial", token_budget=budget) as eng:
            eng.generate(reqs)
            repeats, recorded = [], 0.0
            while not repeats or (recorded < PROFILE_MIN_RECORDED_S and len(repeats) < 5):
                eng.generate(reqs)
                st = eng.stats
                repeats.append(st.per_iteration)
                runs.append((st.wall_s, sum(r.wall_s for r in st.per_iteration), len(reqs)))
                recorded += st.wall_s
        records += _mean_records(repeats)
    return records, runs


@dataclasses.dataclass(frozen=True)
class Calibration:
    """What `calibrate()` measured: the machine's rates, this engine's cost terms, and the
    speed probe's seconds at calibration time (`speed_probe`; 0 when not measured)."""

    hardware: HardwareSpec
    costs: EngineCosts
    probe_s: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"version": CALIBRATION_VERSION,
                           "hardware": dataclasses.asdict(self.hardware),
                           "costs": dataclasses.asdict(self.costs),
                           "probe_s": self.probe_s}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        d = json.loads(text)
        if d.get("version") != CALIBRATION_VERSION:
            raise ValueError(f"calibration version {d.get('version')}, expected "
                             f"{CALIBRATION_VERSION}")
        return cls(HardwareSpec(**d["hardware"]), EngineCosts(**d["costs"]),
                   float(d.get("probe_s", 0.0)))


def cached(cfg) -> Calibration | None:
    """The cached calibration of this machine for `cfg`'s shape, if one exists. An unreadable
    cache file is reported (warning naming it) and treated as absent: calibrate() rewrites it."""
    path = _cache_path(cfg)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return Calibration.from_json(f.read())
    except (OSError, ValueError, TypeError, KeyError) as e:
        warnings.warn(f"ignoring unreadable calibration cache {path}: {e}", stacklevel=2)
        return None


def calibrate(model, *, use_cache: bool = True, h2d_bytes: int | None = None) -> Calibration:
    """Measures the local machine with this engine and `model` (see module docstring)."""
    cfg = model.config
    path = _cache_path(cfg)
    if use_cache and (hit := cached(cfg)) is not None:
        return hit
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    nbytes = h2d_bytes or int(min(1e9, ram / 16))
    h2d = measure_h2d(model, nbytes)
    host_bw = measure_host_bandwidth()
    unpack = measure_unpack(model)  # first: an accelerator engine releases the float layers
    on_cpu = jax.default_backend() == "cpu"
    # On a CPU-only machine nothing crosses a link (the activations are charged nothing).
    d2h = h2d if on_cpu else measure_d2h(min(nbytes, 256 << 20))
    records, runs = profile_engine(model)
    probe_s = speed_probe(model)  # next to the engine profile, which the fit rests on
    costs = dataclasses.replace(
        fit_engine_costs(cfg, records, runs, stage_points=profile_stages(model),
                         d2h_s_per_byte=0.0 if on_cpu else 1.0 / d2h),
        io_s_per_byte=1.0 / h2d, link_s_per_byte=1.0 / h2d, d2h_s_per_byte=1.0 / d2h,
        host_mem_s_per_byte=1.0 / host_bw,
        unpack_s_per_byte=unpack["float"],
        dequant_int8_s_per_byte=unpack["int8"], dequant_int4_s_per_byte=unpack["int4"])
    for name in ("layer_token_s", "attn_s_per_kv_byte"):
        if getattr(costs, name) == 0:
            warnings.warn(f"calibrate: the fit put {name} at 0 (the profile did not separate "
                          "it); predictions will not charge it", stacklevel=2)
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    hw = HardwareSpec(
        name=f"local:{fingerprint()}",
        gemm_flops=cfg.flops_per_token_per_layer / max(costs.token_s, 1e-15),
        h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h,
        host_memory_bandwidth=host_bw, host_memory_bytes=float(ram),
        cpu_attn_bytes_per_s=(1.0 / costs.attn_s_per_kv_byte if costs.attn_s_per_kv_byte
                              else host_bw),
        device_memory_bytes=float((stats or {}).get("bytes_limit", ram)),
        shared_cores=on_cpu, source=f"calibrate() for {cfg.name or 'model'} on "
        f"{platform.processor() or platform.machine()}, jax {jax.__version__}")
    cal = Calibration(hw, dataclasses.replace(costs, source=hw.source), probe_s)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(cal.to_json())
    return cal
