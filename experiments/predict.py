"""Stage 1 (upper bound) and Stage 2 (simulated scheduler) predictions for a model on hardware.

    python -m experiments.predict --model mixtral-8x7b --hardware a40 --kv_cache_gb 70 \
        --prompt_len 98 --gen_len 32
    python -m experiments.predict --hardware local     # calibrates this machine (cached)
"""

from __future__ import annotations

from absl import app, flags

import moelens_jax as mj
from experiments import common
from moelens_jax import perf

_MODEL = flags.DEFINE_string("model", "mixtral-8x7b", "Preset name or checkpoint folder.")
_HARDWARE = flags.DEFINE_string("hardware", "a40",
                                f"One of {', '.join(perf.PRESETS)}, or 'local' (calibrate).")
_KV_CACHE_GB = flags.DEFINE_float("kv_cache_gb", 70.0, "Host KV cache (GB = 1e9 bytes).")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 98, "Prompt length.")
_GEN_LEN = flags.DEFINE_integer("gen_len", 32, "Generation length.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", None,
                                     "Requests for Stage 2 (default: 4x what fits in the KV).")
_PAGE_SIZE = flags.DEFINE_integer("page_size", 16, "Tokens per KV page.")
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", None,
                                     "Tokens per iteration (default: tokens to saturate).")


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    if _HARDWARE.value == "local":
        model = mj.load_model(_MODEL.value)
        cal = perf.calibrate(model)
        cfg, hw, costs = model.config, cal.hardware, cal.costs
    else:
        cfg, hw = mj.config.resolve_config(_MODEL.value), perf.get_hardware(_HARDWARE.value)
        costs = perf.EngineCosts.from_hardware(cfg, hw)
    kv = _KV_CACHE_GB.value * 1e9
    p, g = _PROMPT_LEN.value, _GEN_LEN.value
    s1 = perf.stage1(cfg, hw, perf.Workload.fixed(p, g), kv)
    overrides = {"token_budget": _TOKEN_BUDGET.value} if _TOKEN_BUDGET.value else {}
    config = perf.engine_config(cfg, hw, costs, kv_cache_bytes=int(kv),
                                page_size=_PAGE_SIZE.value, **overrides)
    budget = config.token_budget
    k = _NUM_REQUESTS.value or max(8, int(4 * s1.kv_tokens / (p + g)))
    s2 = perf.predict(cfg, costs, perf.Workload.fixed(p, g, k), config)
    print(common.table([
        ("model", f"{cfg.name} ({cfg.total_params / 1e9:.1f} B params, "
                  f"{cfg.num_layers * cfg.weight_bytes_per_layer / 1e9:.1f} GB streamed/pass)"),
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
    ], "== predict =="))
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
        "flags": settings})


if __name__ == "__main__":
    app.run(main)
