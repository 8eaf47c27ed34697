"""GPU readiness in one command: correctness, the three rates, the overlap, the model's accuracy.

    python -m experiments.gpu_check --out DIR            # on a GPU machine (<= ~8 min, one H200)
    python -m experiments.gpu_check --out DIR --dry_run  # every step at tiny sizes, any backend

Writes `DIR/gpu_check.json` after every step (a failed step records its error and the rest
still run) and prints the same JSON last. Steps and their keys:

* ``oracle`` — the engine against the full-recompute reference on this backend (float32,
  matmuls at "highest" precision: TF32 would make near-tied greedy tokens differ) for
  tiny Mixtral and Qwen3 configs in both pipelines: `engine_equals_oracle`.
* ``link`` — host-to-device copies from pinned memory in the weight mover's 64 MiB packets
  (`h2d_gb_per_s`) beside the datasheet link of `--hardware` (`link_datasheet_gb_per_s`), one
  whole-buffer copy for comparison, and how long a small copy issued meanwhile waits behind
  each (`small_copy_wait_ms_packets` vs `small_copy_wait_ms_whole`).
* ``experts`` — `moe.expert_ffn` (what GB runs: "blocked" off the CPU) over uniformly routed
  rows at Mixtral-8x7B and Qwen3-30B-A3B expert shapes in bf16, against a dense GEMM of the
  same FLOPs: `expert_gemm_fraction_of_dense` (minimum over shapes; target >= 0.7).
* ``quantised`` — whether an accelerator should keep the routed experts quantised: at the
  same expert shapes, int8 and int4 codes + scales (`QuantisedMatrix`) through
  `moe.expert_ffn` ("blocked" dequantises one expert at a time inside its loop) against what
  the weight mover does today off the CPU (dequantise every expert at unpack, then the expert
  FFN on the model dtype): `quantised_experts_speedup` (unpack path time / in-loop time,
  minimum over shapes and formats; > 1 means keeping them quantised pays) and
  `quantised_experts_rel_err` (max |difference| / max |output| of the two, worst case: the
  weights are the same bits, so only the GEMMs' summation order may differ).
* ``prefill`` — the tiled prefill attention at Mixtral's heads over a 32,768-token iteration
  of 926-token prompts: `prefill_attention_tflops` (causal FLOPs actually needed / time).
* ``memory`` — XLA's memory analysis of GA and GB compiled for the device at Mixtral-8x7B
  shapes (4,096 and 32,768 rows) against the device plan's activation bound:
  `activation_bound_ratio` (bound / XLA's bytes, minimum; must be >= 1).
* ``overlap`` — Mixtral-8x7B layers (`--overlap_layers` of them, random weights made on the
  device) with a KV cache holding every request (the paper's decode-heavy regime): the same
  workload run serial (each stage timed alone) and VSLPipe; `overlap_efficiency` = sum over
  iterations of max(weight-stream, GA+GB, CPU attention) from the serial run / VSLPipe's wall
  time, the work outside the layer pass added to both (1.0 = perfect overlap; target >= 0.85),
  and the fraction of requests whose tokens the two runs agree on.
* ``prediction`` — `perf.calibrate` on small-mixtral then `validate_model`'s quick grid,
  predicted against measured: `prediction_mean_accuracy`, `prediction_min_accuracy`.

On the lent device machine (no registry; the image has jax 0.11.2 + CUDA 13, nanobind,
scikit-build-core, cmake): carry the scipy-openblas32 wheel in `.whl` (README "On a GPU"),
build `cpu_ops` there and run this; JAX needs its CPU backend beside CUDA (stage C).
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import moelens_jax as mj
from experiments import common
from moelens_jax import perf, reference, workloads
from moelens_jax.model import Model, moe
from moelens_jax.model.stages import prefill_attention
from moelens_jax.model.weights import (
    WEIGHT_DTYPES,
    QuantisedMatrix,
    random_init,
    scale_shape,
)
from moelens_jax.runtime.layout import build_group
from moelens_jax.runtime.mover import PACKET_BYTES

_OUT = flags.DEFINE_string("out", None, "Folder for gpu_check.json.", required=True)
_DRY = flags.DEFINE_bool("dry_run", False, "Every step at tiny sizes (CI runs this on a CPU).")
_STEPS = flags.DEFINE_list("steps", ["oracle", "link", "experts", "quantised", "prefill",
                                     "memory", "overlap", "prediction"],
                           "Steps to run, in order.")
_HARDWARE = flags.DEFINE_string("hardware", "h200", "Datasheet preset for the link.")
_OVERLAP_LAYERS = flags.DEFINE_integer("overlap_layers", 4, "Mixtral layers in `overlap`.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and requests.")

# Sizes per mode. Full: real shapes that fit one H200 and its host in minutes; dry: seconds.
FULL = {"link_bytes": 2 << 30, "small_copy_bytes": 8 << 20,
        "expert_shapes": {"mixtral-8x7b": (8, 2, 4096, 14336, 16384),
                          "qwen3-30b-a3b": (128, 8, 2048, 768, 32768)},
        "expert_dtype": "bfloat16", "prefill": (32768, 926, 32, 8, 128),
        "memory_model": "mixtral-8x7b", "memory_rows": (4096, 32768),
        "overlap_requests": (1024, 98, 32), "overlap_budget": 8192, "overlap_device_memory": None,
        "prediction_model": "small-mixtral", "prediction_rows": 4, "repeats": 5}
DRY = {"link_bytes": 24 << 20, "small_copy_bytes": 1 << 20,
       "expert_shapes": {"small": (8, 2, 64, 96, 512)},
       "expert_dtype": "float32", "prefill": (1024, 200, 4, 2, 16),
       "memory_model": "tiny-mixtral", "memory_rows": (1024,),
       # (a device-memory cap makes the CPU backend stream the layers like an accelerator)
       "overlap_requests": (24, 20, 6), "overlap_budget": 256, "overlap_device_memory": 1 << 30,
       "prediction_model": "tiny-mixtral",
       "prediction_rows": 1, "repeats": 2}


def step_oracle(sizes) -> dict:
    out, ok = {}, True
    rng = np.random.default_rng(_SEED.value)
    with jax.default_matmul_precision("highest"):
        for preset in ("tiny-mixtral", "tiny-qwen3-moe"):
            model = mj.load_model(preset, dtype="float32", seed=_SEED.value)
            lens = rng.integers(1, 60, 10)
            prompts = [tuple(rng.integers(0, model.config.vocab_size, n).tolist()) for n in lens]
            gens = rng.integers(1, 9, len(prompts)).tolist()
            want = reference.greedy_generate(model, prompts, gens)
            for pipeline in ("serial", "vslpipe"):
                kv = 4096 * model.config.kv_bytes_per_token("float32")
                with mj.Engine(model, kv_cache_bytes=kv, pipeline=pipeline,
                               token_budget=96) as eng:
                    got = [r.tokens for r in eng.generate(
                        [mj.Request(p, g) for p, g in zip(prompts, gens, strict=True)])]
                same = sum(a == b for a, b in zip(got, want, strict=True))
                out[f"{preset}/{pipeline}"] = {"identical": same, "requests": len(want),
                                               "iterations": eng.stats.iterations}
                ok &= same == len(want)
    return {"engine_equals_oracle": bool(ok), "runs": out}


def _copy_packets(packets, dst):
    for p in packets:
        jax.device_put(p, dst).block_until_ready()


def _wait_behind(copy, small, dst, delay_s=0.002) -> float:
    """Seconds a small copy issued `delay_s` after `copy` starts (on another thread) takes."""
    th = threading.Thread(target=copy)
    th.start()
    time.sleep(delay_s)
    t0 = time.perf_counter()
    jax.device_put(small, dst).block_until_ready()
    waited = time.perf_counter() - t0
    th.join()
    return waited


def step_link(sizes) -> dict:
    dev = jax.devices()[0]
    pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
    dst = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
    n = sizes["link_bytes"]
    host = np.random.default_rng(0).integers(0, 255, n, dtype=np.uint8)
    packet = min(PACKET_BYTES, n // 4)
    packets = [jax.device_put(host[i:i + packet], pinned) for i in range(0, n, packet)]
    whole = jax.device_put(host, pinned)
    small = jax.device_put(host[:sizes["small_copy_bytes"]], pinned)
    reps = sizes["repeats"]
    t_packets = common.median_time(lambda: _copy_packets(packets, dst), reps)
    t_whole = common.median_time(lambda: jax.device_put(whole, dst), reps)
    wait_p = float(np.median([_wait_behind(lambda: _copy_packets(packets, dst), small, dst)
                              for _ in range(reps)]))
    wait_w = float(np.median([_wait_behind(lambda: jax.device_put(whole, dst)
                                           .block_until_ready(), small, dst)
                              for _ in range(reps)]))
    hw = perf.get_hardware(_HARDWARE.value)
    return {"h2d_gb_per_s": n / t_packets / 1e9, "h2d_whole_gb_per_s": n / t_whole / 1e9,
            "link_datasheet_gb_per_s": hw.h2d_bytes_per_s / 1e9, "packet_bytes": packet,
            "copied_bytes": n, "small_copy_bytes": sizes["small_copy_bytes"],
            "small_copy_wait_ms_packets": wait_p * 1e3, "small_copy_wait_ms_whole": wait_w * 1e3}


def step_experts(sizes) -> dict:
    dt = jnp.dtype(sizes["expert_dtype"])
    shapes, fractions = {}, []
    for name, (E, k, h, f, m) in sizes["expert_shapes"].items():
        key = jax.random.split(jax.random.key(_SEED.value), 4)
        wg = (jax.random.normal(key[0], (E, h, f), jnp.float32) * 0.02).astype(dt)
        wu = (jax.random.normal(key[1], (E, h, f), jnp.float32) * 0.02).astype(dt)
        wd = (jax.random.normal(key[2], (E, f, h), jnp.float32) * 0.02).astype(dt)
        x = jax.random.normal(key[3], (m, h), jnp.float32)
        gs = np.bincount(np.random.default_rng(0).integers(0, E, m), minlength=E)
        gs = jnp.asarray(gs, jnp.int32)
        grouped = functools.partial(jax.jit(moe.expert_ffn), wg, wu, wd, x, gs)
        dense = functools.partial(jax.jit(moe._swiglu), x, wg[0], wu[0], wd[0])
        t_g = common.median_time(grouped, sizes["repeats"])
        t_d = common.median_time(dense, sizes["repeats"])
        flops = 6 * m * h * f
        shapes[name] = {"experts": E, "top_k": k, "hidden": h, "width": f, "rows": m,
                        "expert_tflops": flops / t_g / 1e12, "dense_tflops": flops / t_d / 1e12,
                        "fraction_of_dense": t_d / t_g}
        fractions.append(t_d / t_g)
    return {"expert_gemm_fraction_of_dense": min(fractions), "dtype": str(dt), "shapes": shapes}


def _random_quantised(key, shape, weight_dtype: str, dtype) -> QuantisedMatrix:
    """Random codes and scales of a [E, in, out] matrix (made on the device: quantising
    Mixtral-sized float weights on the host would take longer than the step)."""
    kc, ks = jax.random.split(key)
    lim = 127 if weight_dtype == "int8" else 7
    codes = jax.random.randint(kc, shape, -lim, lim + 1, jnp.int32)
    if weight_dtype == "int4":  # two codes per byte along the input rows (weights.quantise)
        pairs = codes.reshape(*shape[:-2], shape[-2] // 2, 2, shape[-1])
        codes = (pairs[..., 0, :] & 0x0F) | (pairs[..., 1, :] << 4)
    scale = jax.random.uniform(ks, scale_shape(shape, weight_dtype), jnp.float32, 1e-4, 2e-4)
    return QuantisedMatrix(codes.astype(jnp.int8), scale, weight_dtype, str(jnp.dtype(dtype)))


def step_quantised(sizes) -> dict:
    dt = jnp.dtype(sizes["expert_dtype"])
    shapes, speedups, worst_err = {}, [], 0.0
    for name, (E, _, h, f, m) in sizes["expert_shapes"].items():
        x = jax.random.normal(jax.random.key(_SEED.value), (m, h), jnp.float32)
        gs = np.bincount(np.random.default_rng(0).integers(0, E, m), minlength=E)
        gs = jnp.asarray(gs, jnp.int32)
        for wd in WEIGHT_DTYPES:
            keys = jax.random.split(jax.random.key(_SEED.value + 1), 3)
            ws = tuple(_random_quantised(k, shp, wd, dt) for k, shp in
                       zip(keys, ((E, h, f), (E, h, f), (E, f, h)), strict=True))
            blocked = jax.jit(functools.partial(moe.expert_ffn, impl="blocked"))
            dequantise = jax.jit(lambda ws: tuple(w.dequantise() for w in ws))
            wdq = dequantise(ws)
            reps = sizes["repeats"]
            t_loop = common.median_time(functools.partial(blocked, *ws, x, gs), reps)
            t_deq = common.median_time(functools.partial(dequantise, ws), reps)
            t_ffn = common.median_time(functools.partial(blocked, *wdq, x, gs), reps)
            a, b = blocked(*ws, x, gs), blocked(*wdq, x, gs)
            rel = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
            worst_err = max(worst_err, rel)
            del wdq, a, b
            speedup = (t_deq + t_ffn) / t_loop
            speedups.append(speedup)
            shapes[f"{name}/{wd}"] = {"in_loop_ms": t_loop * 1e3, "unpack_ms": t_deq * 1e3,
                                      "ffn_on_dequantised_ms": t_ffn * 1e3,
                                      "speedup": speedup, "max_rel_err": rel}
    return {"quantised_experts_speedup": min(speedups), "quantised_experts_rel_err": worst_err,
            "dtype": str(dt), "shapes": shapes}


def step_prefill(sizes) -> dict:
    n, plen, hq, g, d = sizes["prefill"]
    lens = [plen] * (n // plen)
    group = build_group([], list(enumerate(lens)), {i: [0] * ln for i, ln in enumerate(lens)})
    rows, pairs = group.tok.shape[0], np.asarray(group.pairs)
    key = jax.random.split(jax.random.key(_SEED.value), 3)
    q = jax.random.normal(key[0], (rows, hq, d), jnp.float32)
    k = jax.random.normal(key[1], (rows, g, d), jnp.float32).astype(jnp.bfloat16)
    v = jax.random.normal(key[2], (rows, g, d), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(prefill_attention)
    t = common.median_time(lambda: f(q, k, v, group.seg, group.pos, group.pairs),
                           sizes["repeats"])
    flops = sum(4 * ln * (ln + 1) // 2 * hq * d for ln in lens)
    return {"prefill_attention_tflops": flops / t / 1e12, "prefill_attention_ms": t * 1e3,
            "rows": rows, "prompts": len(lens), "tile_pairs": int((pairs[:, 2] > 0).sum())}


def step_memory(sizes) -> dict:
    """XLA's memory analysis of GA and GB compiled for this device at Mixtral-8x7B shapes,
    against the device plan's activation bound (`runtime.memory`; on a CPU the test suite ties
    them, here the accelerator's own compiler does)."""
    from moelens_jax.runtime import memory
    cfg = mj.get_preset(sizes["memory_model"])
    out = {}
    for n in sizes["memory_rows"]:
        used = sum(m.temp_size_in_bytes + m.output_size_in_bytes for m in (
            memory.compiled_ga_memory(cfg, n, "bfloat16"),
            memory.compiled_gb_memory(cfg, n, "bfloat16")))
        bound = memory.stage_activation_bytes(cfg, n, "bfloat16")
        out[str(n)] = {"xla_bytes": used, "bound_bytes": bound, "ratio": bound / used}
    return {"activation_bound_ratio": min(v["ratio"] for v in out.values()),
            "model": cfg.name, "rows": out}


def _device_normal(out: np.ndarray, key: tuple[int, ...], std: float) -> None:
    """`random_init`'s filler drawn on the default device and copied back."""
    k = jax.random.key(0)
    for part in key:
        k = jax.random.fold_in(k, part)
    out[...] = np.asarray(_draw(k, out.shape, jnp.dtype(out.dtype), std))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _draw(key, shape, dtype, std):
    return (jax.random.normal(key, shape, jnp.float32) * std).astype(dtype)


def device_random_model(cfg, seed: int) -> Model:
    """A `Model` with N(0, 0.02) weights drawn on the default device (seconds per Mixtral layer
    where numpy takes half a minute) and copied into the host buffers."""
    layers, rest = random_init(cfg, seed, normal=_device_normal)
    return Model(cfg, layers, rest, source=f"device-random:seed={seed}")


def step_overlap(sizes) -> dict:
    if _DRY.value:
        cfg = mj.get_preset("tiny-mixtral").replace(num_layers=_OVERLAP_LAYERS.value)
    else:
        cfg = mj.get_preset("mixtral-8x7b").replace(num_layers=_OVERLAP_LAYERS.value)
    model = device_random_model(cfg, _SEED.value)
    k, p, gen = sizes["overlap_requests"]
    reqs = workloads.synthetic(k, p, gen, cfg.vocab_size, seed=_SEED.value)
    kv = int(sum(len(r.prompt) + gen for r in reqs) * 1.1) * cfg.kv_bytes_per_token()
    runs = {}
    for pipeline in ("serial", "vslpipe"):
        with mj.Engine(model, kv_cache_bytes=kv, pipeline=pipeline, device_weight_layers=2,
                       token_budget=sizes["overlap_budget"],
                       device_memory_bytes=sizes["overlap_device_memory"]) as eng:
            eng.warmup(reqs)
            res = eng.generate(reqs)
            # (the budget that ran: the device-memory plan may have lowered it)
            runs[pipeline] = (eng.stats, [r.tokens for r in res], eng.config.token_budget)
    serial, vsl = runs["serial"][0], runs["vslpipe"][0]
    link = serial.h2d_gb_per_s or vsl.h2d_gb_per_s or float("inf")
    layer_bytes = model.host_layers[0].layout.nbytes
    stream_s = cfg.num_layers * layer_bytes / (link * 1e9)
    # Per iteration: the layer pass overlaps at best to its longest resource; what is outside
    # the layer pass (embedding, logits, sampling, scheduling) cannot overlap in either run.
    bound = sum(max(stream_s, it.ga_s + it.gb_s, it.c_s) + it.rest_s - it.io_s
                for it in serial.per_iteration)
    return {"overlap_efficiency": bound / vsl.wall_s if vsl.wall_s else None,
            "bound_s": bound, "vslpipe_wall_s": vsl.wall_s, "serial_wall_s": serial.wall_s,
            "iterations": [serial.iterations, vsl.iterations],
            "vslpipe_generated_tokens_per_s": vsl.generated_tokens / vsl.wall_s,
            "serial_generated_tokens_per_s": serial.generated_tokens / serial.wall_s,
            "stage_seconds_serial": serial.stage_seconds(), "layer_bytes": layer_bytes,
            "h2d_gb_per_s": link, "host_weight_bytes": vsl.host_weight_bytes,
            # (bf16 on a GPU: different GEMM shapes may flip a near-tied greedy token)
            "same_tokens_fraction": float(np.mean([a == b for a, b in zip(
                runs["serial"][1], runs["vslpipe"][1], strict=True)])), "layers": cfg.num_layers,
            "requests": k, "token_budget": runs["vslpipe"][2]}


def step_prediction(sizes) -> dict:
    from experiments import model_validation
    model = mj.load_model(sizes["prediction_model"], seed=_SEED.value)
    t0 = time.perf_counter()
    cal = perf.calibrate(model, use_cache=False)
    calibrate_s = time.perf_counter() - t0
    rows = [model_validation.run_config(model, cal, row, _SEED.value)
            for row in model_validation.QUICK_GRID[:sizes["prediction_rows"]]]
    acc = [r["accuracy"] for r in rows]
    return {"prediction_mean_accuracy": float(np.mean(acc)),
            "prediction_min_accuracy": float(np.min(acc)), "calibrate_s": calibrate_s,
            "configs": rows}


STEPS = {"oracle": step_oracle, "link": step_link, "experts": step_experts,
         "quantised": step_quantised, "prefill": step_prefill, "memory": step_memory,
         "overlap": step_overlap, "prediction": step_prediction}
SUMMARY = {"oracle": ["engine_equals_oracle"], "link": ["h2d_gb_per_s", "link_datasheet_gb_per_s"],
           "experts": ["expert_gemm_fraction_of_dense"],
           "quantised": ["quantised_experts_speedup", "quantised_experts_rel_err"],
           "prefill": ["prefill_attention_tflops"],
           "memory": ["activation_bound_ratio"],
           "overlap": ["overlap_efficiency"],
           "prediction": ["prediction_mean_accuracy", "prediction_min_accuracy"]}


def _write(path: str, result: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(common._clean(result), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def main(argv):
    del argv
    flag_values = common.log_flags(__name__)
    unknown = set(_STEPS.value) - set(STEPS)
    if unknown:
        raise app.UsageError(f"unknown steps {sorted(unknown)}; choose from {list(STEPS)}")
    if not _DRY.value and jax.default_backend() == "cpu":
        raise app.UsageError("no accelerator here (JAX backend is cpu): the full sizes are "
                             "for a GPU; use --dry_run to run every step at tiny sizes")
    sizes = DRY if _DRY.value else FULL
    os.makedirs(_OUT.value, exist_ok=True)
    path = os.path.join(_OUT.value, "gpu_check.json")
    result = {"machine": common.machine_fingerprint(), "flags": flag_values,
              "dry_run": _DRY.value, "steps": {}}
    for name in _STEPS.value:
        t0 = time.perf_counter()
        print(f"== {name} ==", flush=True)
        try:
            out = STEPS[name](sizes)
        except Exception as e:  # one failed step must not lose the others
            traceback.print_exc()
            out = {"error": f"{type(e).__name__}: {e}"}
        out["seconds"] = time.perf_counter() - t0
        result["steps"][name] = out
        for key in SUMMARY[name]:
            result[key] = out.get(key)
        print(common.table([(k, v) for k, v in out.items() if not isinstance(v, dict | list)]),
              flush=True)
        _write(path, result)
    print(common.table([(k, result.get(k)) for name in _STEPS.value for k in SUMMARY[name]],
                       "== gpu_check =="))
    common.print_json(result)


if __name__ == "__main__":
    app.run(main)
