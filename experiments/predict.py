"""Stage 1 (upper bound) and Stage 2 (simulated scheduler) predictions for a model on hardware.

    python -m experiments.predict --model mixtral-8x7b --hardware a40 --kv_cache_gb 70 \
        --prompt_len 98 --gen_len 32
    python -m experiments.predict --hardware local     # calibrates this machine (cached)
    python -m experiments.predict --policy moe-lightning --hardware a40 --cpu_memory_gb 265 \
        --device_memory_gb 16 --prompt_len 98 --gen_len 32   # MoE-Lightning's own plan

With `--policy moe-lightning` it prints MoE-Lightning's plan from its published planner
(`perf.lightning_planner`: N, mu, micro-batches, r_w, r_c) with its own throughput prediction
and memory use; `--lightning_constants artifact` (default) uses the artifact's hardware
constants (its L4/T4 entries, its fallback for any other GPU), `datasheet` our preset's.
"""

from __future__ import annotations

import json

from absl import app, flags

import moelens_jax as mj
from experiments import common
from moelens_jax import batch, perf
from moelens_jax.kv import KV_DTYPES
from moelens_jax.model.weights import WEIGHT_DTYPES

_MODEL = flags.DEFINE_string("model", "mixtral-8x7b", "Preset name or checkpoint folder.")
_HARDWARE = flags.DEFINE_string("hardware", "a40",
                                f"One of {', '.join(perf.PRESETS)}, or 'local' (calibrate).")
_KV_CACHE_GB = flags.DEFINE_float("kv_cache_gb", 70.0, "Host KV cache (GB = 1e9 bytes).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 98, "Prompt length.")
_GEN_LEN = flags.DEFINE_integer("gen_len", 32, "Generation length.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", None,
                                     "Requests for Stage 2 (default: 4x what fits in the KV).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", None, list(KV_DTYPES),
                              "KV cache storage dtype (default: the model's).")
_WEIGHT_DTYPE = flags.DEFINE_enum("weight_dtype", None, list(WEIGHT_DTYPES),
                                  "Layers streamed quantised (default: the model dtype).")
_ACCURACY_JSON = flags.DEFINE_string("accuracy_json", None, "JSON of experiments.quant_accuracy"
                                     ": with --max_logit_rel_err, pick the fastest (weight, "
                                     "KV) format whose measured error is under it.")
_MAX_ERR = flags.DEFINE_float("max_logit_rel_err", None, "Largest logits rel-L2 error allowed "
                              "when choosing the precision (needs --accuracy_json).")
_ACCURACY_MODEL = flags.DEFINE_string("accuracy_model", None, "Whose rows of --accuracy_json to "
                                      "use (default: --model).")
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", None,
                                     "Tokens per iteration (default: tokens to saturate).")
_POLICY = flags.DEFINE_enum("policy", "moe-lens", ["moe-lens", "moe-lightning"],
                            "Whose plan to predict.")
_CPU_MEMORY_GB = flags.DEFINE_float("cpu_memory_gb", 265.0,
                                    "moe-lightning: host memory its planner may use (1e9 B).")
_DEVICE_MEMORY_GB = flags.DEFINE_float("device_memory_gb", None,
                                       "moe-lightning: GPU memory cap (default: the GPU's).")
_HOSTS = flags.DEFINE_integer("hosts", 1, "Also predict a batch job data parallel over this "
                              "many identical hosts (run_batch --ray), one engine each.")
_CHUNK = flags.DEFINE_integer("chunk", None, "Lines per block of that job (default: "
                              "batch.default_chunk).")
_DRIVER_LINES = flags.DEFINE_float("driver_lines_per_s", None, "Lines per second the job's "
                                   "driver reads and writes (run_batch --ray reports it); "
                                   "default: unbounded.")
_CONSTANTS = flags.DEFINE_enum("lightning_constants", "artifact", ["artifact", "datasheet"],
                               "moe-lightning: the artifact's hardware constants or ours.")


def _fits(cfg, weight_dtype) -> bool:
    """Whether this shape can be stored in `weight_dtype` (int4 needs 32-row groups)."""
    try:
        perf.layer_bytes(cfg, weight_dtype)
    except ValueError:
        return False
    return True


def _choose(cfg, by_format):
    """(the fastest (weight, KV) format within --max_logit_rel_err, its measured error), from
    --accuracy_json's rows for --accuracy_model (default: this model), or None."""
    if _MAX_ERR.value is None:
        return None
    if not _ACCURACY_JSON.value:
        raise app.UsageError("--max_logit_rel_err needs --accuracy_json (the JSON of "
                             "python -m experiments.quant_accuracy)")
    with open(_ACCURACY_JSON.value) as f:
        rows = json.load(f)["settings"]
    name = _ACCURACY_MODEL.value or _MODEL.value
    mine = [r for r in rows if r["model"] == name]
    if not mine:
        raise app.UsageError(f"{_ACCURACY_JSON.value} has no rows for {name!r} (it has "
                             f"{sorted({r['model'] for r in rows})}); pass --accuracy_model")
    # a row of the model in its own dtype stands for this config's dtype
    errors = {(cfg.dtype if r["weight_dtype"] == r.get("dtype") else r["weight_dtype"],
               r["kv_dtype"]): r["logit_rel_l2"] for r in mine}
    best = perf.choose_precision(by_format, errors, _MAX_ERR.value)
    return best, errors[best]


def lightning(settings) -> None:
    from moelens_jax.perf import lightning_planner as lp
    cfg = mj.config.resolve_config(_MODEL.value)
    cmem = _CPU_MEMORY_GB.value * 1e9
    gmem = _DEVICE_MEMORY_GB.value * 1e9 if _DEVICE_MEMORY_GB.value else None
    if _CONSTANTS.value == "artifact":
        # For a GPU it has no entry for, the artifact plans with its fallback host (192 GiB)
        # whatever the machine has; utilisation is still reported against --cpu_memory_gb.
        known = _HARDWARE.value in lp.ARTIFACT_GPUS
        hw = lp.LightningHardware.artifact(_HARDWARE.value, cmem if known else None,
                                           gpu_memory_bytes=gmem)
    else:
        hw = lp.LightningHardware.from_spec(perf.get_hardware(_HARDWARE.value), cmem,
                                            gpu_memory_bytes=gmem)
    p = lp.plan(cfg, hw, _PROMPT_LEN.value, _GEN_LEN.value)
    terms = ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in p.terms.items())
    print(common.table([
        ("model", cfg.name), ("hardware", f"{hw.name} ({_CONSTANTS.value} constants): GPU "
                                          f"{hw.gpu_memory / 2**30:.1f} GiB, link "
                                          f"{hw.ctog_bandwidth / 2**30:.1f} GiB/s"),
        ("workload", f"s={_PROMPT_LEN.value} n={_GEN_LEN.value}; the planner's host memory "
                     f"{hw.cpu_memory / 2**30:.1f} GiB"),
        ("plan", f"N={p.batch_size} = mu {p.micro_batch} x {p.num_micro_batches} micro-batches,"
                 f" r_w={p.weights_on_gpu:.3f}, r_c=0 (KV and attention on the CPU)"),
        ("per layer", f"T = {p.layer_s * 1e3:.1f} ms ({terms})"),
        ("throughput", f"{p.generated_tokens_per_s:,.1f} generated tok/s (decode only, its "
                       "own model)"),
        ("GPU memory", f"{p.gpu_memory_bytes / 2**30:.2f} of {p.gpu_limit_bytes / 2**30:.2f} GiB"),
        ("CPU memory", f"{p.cpu_memory_bytes / 1e9:.1f} GB = "
                       f"{p.cpu_memory_utilisation(cmem):.1%} of {cmem / 1e9:.0f} GB"),
    ], "== MoE-Lightning plan =="))
    common.print_json({
        "model": cfg.name, "hardware": hw.name, "policy": "moe-lightning",
        "prompt_len": _PROMPT_LEN.value, "gen_len": _GEN_LEN.value,
        "batch_size": p.batch_size, "micro_batch": p.micro_batch,
        "num_micro_batches": p.num_micro_batches, "weights_on_gpu": p.weights_on_gpu,
        "kv_on_gpu": 0.0, "layer_s": p.layer_s, "terms_s": p.terms,
        "generated_tokens_per_s": p.generated_tokens_per_s,
        "gpu_memory_bytes": p.gpu_memory_bytes, "cpu_memory_bytes": p.cpu_memory_bytes,
        "cpu_memory_utilisation": p.cpu_memory_utilisation(cmem), "flags": settings})


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    if _POLICY.value == "moe-lightning":
        return lightning(settings)
    if _HARDWARE.value == "local":
        model = mj.load_model(_MODEL.value)
        cal = perf.calibrate(model)
        cfg, hw, costs = model.config, cal.hardware, cal.costs
    else:
        cfg, hw = mj.config.resolve_config(_MODEL.value), perf.get_hardware(_HARDWARE.value)
        costs = perf.EngineCosts.from_hardware(cfg, hw)
    kv = _KV_CACHE_GB.value * 1e9
    p, g = _PROMPT_LEN.value, _GEN_LEN.value
    wd = _WEIGHT_DTYPE.value
    s1 = perf.stage1(cfg, hw, perf.Workload.fixed(p, g), kv, _KV_DTYPE.value, wd)
    # The Stage-1 bound for every KV format in the same bytes (M scales with 1 / bytes per token)
    # and every weight format (delta scales with the bytes a layer streams).
    by_kv_dtype = {d: perf.stage1(cfg, hw, perf.Workload.fixed(p, g), kv, d, wd)
                   .generated_tokens_per_s for d in KV_DTYPES}
    weight_formats = [cfg.dtype, *(w for w in WEIGHT_DTYPES if _fits(cfg, w))]
    s1_format = {(w, d): perf.stage1(cfg, hw, perf.Workload.fixed(p, g), kv, d,
                                     None if w == cfg.dtype else w)
                 for w in weight_formats for d in KV_DTYPES}
    by_format = {c: r.generated_tokens_per_s for c, r in s1_format.items()}
    chosen = _choose(cfg, by_format)
    overrides = {"token_budget": _TOKEN_BUDGET.value} if _TOKEN_BUDGET.value else {}
    config = perf.engine_config(cfg, hw, costs, kv_cache_bytes=int(kv),
                                kv_dtype=_KV_DTYPE.value, weight_dtype=wd,
                                page_size=_PAGE_SIZE.value, **overrides)
    budget = config.token_budget
    k = _NUM_REQUESTS.value or max(8, int(4 * s1.kv_tokens / (p + g)))
    s2 = perf.predict(cfg, costs, perf.Workload.fixed(p, g, k), config)
    hosts = _HOSTS.value
    chunk = _CHUNK.value or batch.default_chunk(cfg, int(kv), _KV_DTYPE.value, p + g,
                                                k * hosts, hosts)
    dp = perf.predict_data_parallel(cfg, costs, perf.Workload.fixed(p, g, k * hosts), config,
                                    hosts, chunk, _DRIVER_LINES.value)
    print(common.table([
        ("model", f"{cfg.name} ({cfg.total_params / 1e9:.1f} B params, "
                  f"{cfg.num_layers * perf.layer_bytes(cfg, wd) / 1e9:.1f} GB streamed/pass "
                  f"as {wd or cfg.dtype})"),
        ("hardware", f"{hw.name}: {hw.gemm_flops / 1e12:.1f} TFLOP/s, link "
                     f"{hw.h2d_bytes_per_s / 1e9:.1f} GB/s ({hw.source})"),
        ("workload", f"p={p} g={g}, {k} requests, KV {kv / 1e9:.0f} GB = "
                     f"{s1.kv_tokens:,.0f} tokens"),
        ("tokens to saturate", f"{s1.tokens_to_saturate:,.0f} (approx (C/B)(Ne/Nk) = "
                               f"{s1.tokens_to_saturate_approx:,.0f})"),
        ("PME", f"{s1.pme:.4f}; overlap factor {s1.overlap_factor:.2f}"),
        ("Stage 1", f"{s1.processed_tokens_per_s:,.0f} processed / "
                    f"{s1.generated_tokens_per_s:,.1f} generated tok/s, bound by {s1.binding}"),
        ("turning point", f"{s1.turning_point_kv_bytes / 1e9:,.0f} GB of KV"),
        ("host bandwidth", f"need {s1.host_bandwidth_need / 1e9:.1f} of "
                           f"{s1.host_bandwidth_available / 1e9:.0f} GB/s"),
        ("Stage 2", f"{s2.generated_tokens_per_s:,.1f} generated tok/s, {s2.iterations} "
                    f"iterations, token budget {budget}, KV peak {s2.kv_peak_fraction:.0%}"),
        ("data parallel", f"{hosts} hosts x 1 engine, {k * hosts} requests in blocks of "
                          f"{chunk}: {dp.generated_tokens_per_s:,.1f} generated tok/s "
                          f"({dp.scaling:.2f}x one host running the same blocks; bound by "
                          f"{dp.bound})"),
        ("Stage 1 by KV dtype", ", ".join(f"{d} {v:,.0f}" for d, v in by_kv_dtype.items())
                                + " generated tok/s (the 8-bit rows charge KV reads by bytes)"),
    ], "== predict =="))
    print(common.table([(f"weights {w}", ", ".join(
        f"KV {d} {by_format[w, d]:,.0f} ({s1_format[w, d].binding})" for d in KV_DTYPES))
        for w in weight_formats],
        "== Stage 1 (generated tok/s, what binds) by weight and KV format =="))
    if chosen is not None:
        (cw, cd), err = chosen
        print(f"chosen under logits rel-L2 <= {_MAX_ERR.value}: weights {cw}, KV {cd} "
              f"({by_format[cw, cd]:,.0f} generated tok/s; measured rel-L2 {err:.4f})")
    common.print_json({
        "model": cfg.name, "hardware": hw.name, "kv_cache_gb": _KV_CACHE_GB.value,
        "prompt_len": p, "gen_len": g, "num_requests": k, "token_budget": budget,
        "tokens_to_saturate": s1.tokens_to_saturate,
        "tokens_to_saturate_approx": s1.tokens_to_saturate_approx, "pme": s1.pme,
        "kv_tokens": s1.kv_tokens, "stage1_processed_tokens_per_s": s1.processed_tokens_per_s,
        "stage1_generated_tokens_per_s": s1.generated_tokens_per_s,
        "stage2_generated_tokens_per_s": s2.generated_tokens_per_s,
        "stage2_processed_tokens_per_s": s2.processed_tokens_per_s,
        "binding": s1.binding, "turning_point_kv_gb": s1.turning_point_kv_bytes / 1e9,
        "overlap_factor": s1.overlap_factor, "stage2_iterations": s2.iterations,
        "kv_dtype": _KV_DTYPE.value or cfg.dtype,
        "stage1_generated_tokens_per_s_by_kv_dtype": by_kv_dtype,
        "weight_dtype": wd or cfg.dtype,
        "stage1_generated_tokens_per_s_by_format": {f"{w}/{d}": v
                                                     for (w, d), v in by_format.items()},
        "stage1_binding_by_format": {f"{w}/{d}": r.binding for (w, d), r in s1_format.items()},
        "chosen_format": None if chosen is None else "/".join(chosen[0]),
        "hosts": hosts, "chunk": chunk,
        "data_parallel_generated_tokens_per_s": dp.generated_tokens_per_s,
        "data_parallel_scaling": dp.scaling, "data_parallel_bound": dp.bound,
        "flags": settings})


if __name__ == "__main__":
    app.run(main)
