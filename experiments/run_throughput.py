"""The main job: offline batch generation on a model and workload, reporting throughput.

Runs the MoE-Lens engine (`moelens_jax.runtime.Engine`: resource-aware scheduler, paged host
KV cache, CPU decode attention) on a seeded synthetic workload. `--mode reference` instead runs
greedy decoding by full recompute (no KV cache), the correctness oracle.

    python -m experiments.run_throughput                     # embedded small-mixtral, random
    python -m experiments.run_throughput --model /path/to/hf_checkpoint --num_requests 4
"""

from __future__ import annotations

import json
import time

from absl import app, flags

import moelens_jax as mj
from experiments import common
from moelens_jax import perf, reference, workloads
from moelens_jax.kv import KV_DTYPES
from moelens_jax.model.weights import WEIGHT_DTYPES
from moelens_jax.runtime import Engine
from moelens_jax.runtime.results_io import generate_resumable

_MODEL = flags.DEFINE_string("model", mj.config.DEFAULT_PRESET, "Preset name or checkpoint folder.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weight dtype (default: the checkpoint's / preset's).")
_WORKLOAD = flags.DEFINE_enum("workload", "mtbench", ["mtbench"],
                              "Synthetic workload (log-normal prompt lengths; see workloads.py).")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 32, "Requests in the batch.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 98, "Mean prompt length (log-normal).")
_GEN_LEN = flags.DEFINE_integer("gen_len", 32, "Tokens generated per request.")
_KV_CACHE_GB = flags.DEFINE_float("kv_cache_gb", 0.25, "Host KV cache size in GB (1e9 bytes).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_WEIGHT_DTYPE = flags.DEFINE_enum("weight_dtype", None, list(WEIGHT_DTYPES),
                                  "Store and stream the layers' matrices quantised (int8 per "
                                  "output channel, int4 per channel and 128 rows; dequantised "
                                  "on the device); default: the model dtype.")
_KV_DTYPE = flags.DEFINE_enum("kv_dtype", None, list(KV_DTYPES),
                              "KV cache storage dtype (default: the model's); int8 and "
                              "float8_e4m3fn keep a float32 scale per token and kv head.")
_TOKEN_BUDGET = flags.DEFINE_integer(
    "token_budget", None, "Tokens per iteration (n_real); default: the performance model's "
    "choice when this machine has a cached calibration (experiments.calibrate), else 512.")
_PIPELINE = flags.DEFINE_enum("pipeline", "auto", ["auto", "serial", "vslpipe"],
                              "Executor: auto = serial on a CPU-only backend, else vslpipe.")
_PREDICT = flags.DEFINE_bool("predict", False, "Also predict this run with the performance "
                             "model (calibrates this machine once, ~1 min, then cached).")
_DEVICE_LAYERS = flags.DEFINE_integer("device_weight_layers", 2,
                                      "Decoder layers resident on the device (2 = double buffer).")
_H2D_LIMIT = flags.DEFINE_float("h2d_limit_gb_per_s", None,
                                "Cap the host->device weight stream (GB/s), e.g. 19.5 for PCIe.")
_DEVICE_MEMORY_GB = flags.DEFINE_float("device_memory_gb", None,
                                       "Device-memory cap for weights (GB); error if exceeded.")
_POLICY = flags.DEFINE_enum("policy", "moe-lens", ["moe-lens"], "Scheduling policy.")
_MODE = flags.DEFINE_enum("mode", "engine", ["engine", "reference"],
                          "engine: the MoE-Lens engine; reference: full-recompute oracle.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for random weights and the workload.")
_OUT = flags.DEFINE_string("out", None, "Append each finished request to this JSONL file; a "
                           "rerun skips requests already in it (resume after interruption).")
_TRACE_OUT = flags.DEFINE_string("trace_out", None, "Write a Chrome/Perfetto trace JSON here.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar (stderr).")


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    t0 = time.perf_counter()
    model = mj.load_model(_MODEL.value, dtype=_DTYPE.value, seed=_SEED.value, progress=True)
    float_model = model  # what --predict calibrates (costs are per byte and per token)
    if _WEIGHT_DTYPE.value:
        model = model.quantised(_WEIGHT_DTYPE.value)
    load_s = time.perf_counter() - t0
    cfg = model.config
    reqs = workloads.synthetic(_NUM_REQUESTS.value, _PROMPT_LEN.value, _GEN_LEN.value,
                               cfg.vocab_size, seed=_SEED.value)
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    kv_bytes = int(_KV_CACHE_GB.value * 1e9)
    kv_per_token = cfg.kv_bytes_per_token()
    print(common.table([
        ("model", f"{cfg.name or model.source} ({cfg.family}, {model.dtype})"),
        ("parameters", f"{cfg.total_params / 1e6:,.1f} M ({cfg.active_params_per_token / 1e6:,.1f}"
                       " M active per token)"),
        ("weight bytes", f"{model.weight_bytes / 2**20:,.1f} MiB ("
                         f"{perf.layer_bytes(cfg, _WEIGHT_DTYPE.value) / 2**20:,.2f} MiB per "
                         f"layer, matrices as {_WEIGHT_DTYPE.value or model.dtype})"),
        ("KV bytes per token", f"{kv_per_token:,} B"),
        ("KV cache", f"{kv_bytes / 1e9:.3f} GB = {kv_bytes // kv_per_token:,} tokens "
                     f"(pages of {_PAGE_SIZE.value})"),
        ("requests", f"{len(reqs)} {_WORKLOAD.value} (prompt tokens {prompt_tokens}, "
                     f"generation {_GEN_LEN.value})"),
        ("mode", _MODE.value),
    ], "== run_throughput card =="), flush=True)

    result = {"model": cfg.name or model.source, "dtype": model.dtype,
              "weight_dtype": _WEIGHT_DTYPE.value or model.dtype, "load_s": load_s}
    if _MODE.value == "reference":
        reference.greedy_generate(model, [r.prompt for r in reqs], 1)  # compile
        t0 = time.perf_counter()
        outs = reference.greedy_generate(model, [r.prompt for r in reqs],
                                         [r.max_new_tokens for r in reqs])
        wall = time.perf_counter() - t0
        generated = sum(len(o) for o in outs)
        result.update(mode="reference-recompute", iterations=max(r.max_new_tokens for r in reqs),
                      preemptions=0, kv_peak_fraction=None, mean_tokens_per_iteration=None,
                      h2d_gb_per_s=None)  # the reference keeps the whole model on the device
    else:
        dev_mem = None if _DEVICE_MEMORY_GB.value is None else int(_DEVICE_MEMORY_GB.value * 1e9)
        config, budget_source = perf.machine_engine_config(
            cfg, token_budget=_TOKEN_BUDGET.value, kv_cache_bytes=kv_bytes,
            kv_dtype=_KV_DTYPE.value, weight_dtype=_WEIGHT_DTYPE.value,
            page_size=_PAGE_SIZE.value, policy=_POLICY.value,
            device_weight_layers=_DEVICE_LAYERS.value, h2d_limit_gb_per_s=_H2D_LIMIT.value,
            device_memory_bytes=dev_mem, pipeline=_PIPELINE.value,
            record_stages=bool(_TRACE_OUT.value))
        engine = Engine(model, config)
        compile_s = engine.warmup(reqs)  # compiles every shape the run uses, apart from it
        result["compile_s"] = compile_s
        if _OUT.value:
            records, todo = generate_resumable(engine, reqs, _OUT.value,
                                               progress=_PROGRESS.value)
            rejected = [r for r in records.values() if r["finish_reason"] == "rejected"]
            result.update(out=_OUT.value, computed_requests=len(todo),
                          skipped_requests=len(reqs) - len(todo))
            if not todo:
                engine.stats.wall_s = float("nan")
            prompt_tokens = sum(len(reqs[i].prompt) for i in todo)  # this run's work only
        else:
            res = engine.generate(reqs, progress=_PROGRESS.value)
            rejected = [r.error for r in res if r.finish_reason == "rejected"]
        st = engine.stats
        wall = st.wall_s
        generated = st.generated_tokens
        if _TRACE_OUT.value:
            with open(_TRACE_OUT.value, "w") as f:
                json.dump(st.chrome_trace(), f)
            result["trace_out"] = _TRACE_OUT.value
        result.update(mode=engine.mode, iterations=st.iterations, preemptions=st.preemptions,
                      kv_peak_fraction=st.kv_peak_fraction,
                      mean_tokens_per_iteration=st.mean_tokens_per_iteration,
                      rejected=len(rejected), kv_pages=engine.kv_pages,
                      processed_tokens_incl_recompute=st.processed_tokens,
                      h2d_gb_per_s=st.h2d_gb_per_s, h2d_bytes=st.h2d_bytes,
                      weight_unpack_s=engine.mover.unpack_s,
                      device_weight_bytes=engine.device_weight_bytes,
                      token_budget=engine.config.token_budget,
                      token_budget_source=budget_source,
                      stage_seconds=st.stage_seconds())
        if _PREDICT.value:
            costs = perf.calibrate(float_model).costs
            if _H2D_LIMIT.value is not None:
                costs = costs.with_link(_H2D_LIMIT.value * 1e9)
            pred = perf.predict(cfg, costs, perf.Workload.from_requests(reqs), engine.config)
            measured = st.generated_tokens / st.wall_s
            result.update(predicted_generated_tokens_per_s=pred.generated_tokens_per_s,
                          prediction_accuracy=1 - abs(pred.generated_tokens_per_s - measured)
                          / measured)
        if _H2D_LIMIT.value is not None:
            result["h2d_limit_gb_per_s"] = _H2D_LIMIT.value
        if dev_mem is not None:
            result["device_memory_bytes"] = dev_mem
    result.setdefault("compile_s", None)
    result.update(
        num_requests=len(reqs), prompt_tokens=prompt_tokens, generated_tokens=generated,
        wall_s=wall, generated_tokens_per_s=generated / wall,
        processed_tokens_per_s=(generated + prompt_tokens) / wall,
        flags=settings, machine=common.machine_fingerprint())
    print(common.table([(k, f"{result[k]:.3f}" if isinstance(result[k], float) else result[k])
                        for k in ("mode", "num_requests", "prompt_tokens", "generated_tokens",
                                  "iterations", "preemptions", "kv_peak_fraction",
                                  "h2d_gb_per_s", "compile_s", "wall_s",
                                  "generated_tokens_per_s", "processed_tokens_per_s")]
                       + [(k, f"{result[k]:.3f}") for k in ("predicted_generated_tokens_per_s",
                                                            "prediction_accuracy")
                          if k in result],
                       "== results =="))
    common.print_json(result)


if __name__ == "__main__":
    app.run(main)
