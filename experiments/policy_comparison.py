"""Both scheduling policies on one engine: the measurement behind `compare_policies` and
`reproduce_paper` (see experiments/compare_policies.py for the setup and its numbers)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from experiments import common
from moelens_jax import perf, workloads
from moelens_jax.runtime import Engine, EngineConfig

# (scale of every length, generation length before scaling): ~10-50 passes per policy.
SCALES = {"mtbench": (0.25, 32), "rag": (0.125, 128), "helm_reasoning": (0.125, 50),
          "helm_summarization": (0.0625, 64), "aime": (0.25, 128)}
BATCHES = 6

A40_FLOP_PER_BYTE = 150e12 / 19.5e9
# MoE-Lightning prefills a whole batch in one pass over the layers (all micro-batches).
LIGHTNING_PREFILL_BUDGET = 1 << 20


def run_policy(model, reqs, config: EngineConfig):
    """One timed run after an uncapped warm-up of the same requests (it compiles every shape;
    compiled stages are shared by engines of one config)."""
    with Engine(model, config, h2d_limit_gb_per_s=None) as warm:
        warm.generate(reqs)
    with Engine(model, config) as eng:
        res = eng.generate(reqs)
    st = eng.stats
    return [r.tokens for r in res], {
        "generated_tokens_per_s": st.generated_tokens / st.wall_s, "wall_s": st.wall_s,
        "iterations": st.iterations, "preemptions": st.preemptions,
        "kv_peak_fraction": st.kv_peak_fraction,
        "mean_tokens_per_iteration": st.mean_tokens_per_iteration}


def compare(model, workload_names, num_requests, flop_per_byte=128.0, kv_tokens_flag=None,
            seed=0, scales=None) -> dict:
    """Runs both policies on each workload; prints the card and table, returns the JSON dict."""
    scales = scales or SCALES
    cfg = model.config
    cal = perf.calibrate(model)
    hw_local = cal.hardware
    cap = hw_local.gemm_flops / flop_per_byte
    hw = dataclasses.replace(hw_local, h2d_bytes_per_s=cap)
    costs = cal.costs.with_link(cap)
    print(common.table([
        ("model", f"{cfg.name} ({model.dtype}, "
                  f"{cfg.num_layers * cfg.weight_bytes_per_layer / 1e6:.0f} MB per pass)"),
        ("GEMM rate", f"{hw_local.gemm_flops / 1e9:.1f} GFLOP/s (calibrated engine line)"),
        ("link cap", f"{cap / 1e6:.1f} MB/s = GEMM / {flop_per_byte:.0f} FLOP per byte "
                     f"(A40 behind PCIe: {A40_FLOP_PER_BYTE:.0f}; A40-matching cap here: "
                     f"{hw_local.gemm_flops / A40_FLOP_PER_BYTE / 1e6:.1f} MB/s)"),
        ("pass time", f"{cfg.num_layers * cfg.weight_bytes_per_layer / cap:.2f} s"),
    ], "== compare_policies card =="), flush=True)
    rows = []
    for name in workload_names:
        scale, gen = scales.get(name, (1.0, None))
        reqs = workloads.make(name, num_requests, cfg.vocab_size, seed=seed, gen_len=gen,
                              scale=scale)
        w = perf.Workload.from_requests(reqs)
        s1 = perf.stage1(cfg, hw, w, 1e15)
        # Capacity-bound as in the paper: below MoE-Lens's saturation need, and small enough
        # that the batch needs ~BATCHES static batches (a batch holding every request would
        # make both policies one and the same schedule).
        total = sum(w.prompt_lens) + sum(w.gen_lens)
        kv_tokens = kv_tokens_flag or max(
            min(int(0.5 * s1.tokens_to_saturate / s1.pme), total // BATCHES),
            2 * max(p + g for p, g in zip(w.prompt_lens, w.gen_lens, strict=True)))
        kv_bytes = kv_tokens * cfg.kv_bytes_per_token()
        lp = perf.lightning_policy(cfg, hw, w, kv_bytes)
        # MoE-Lens: n_real from the model; MoE-Lightning: its static batch, prefilled at once.
        lens_cfg = perf.engine_config(cfg, hw, costs, kv_cache_bytes=kv_bytes,
                                      h2d_limit_gb_per_s=cap / 1e9)
        light_cfg = EngineConfig(kv_cache_bytes=kv_bytes, h2d_limit_gb_per_s=cap / 1e9,
                                 policy="moe-lightning", max_batch=lp.batch_size,
                                 token_budget=LIGHTNING_PREFILL_BUDGET)
        budget = lens_cfg.token_budget
        t0 = time.perf_counter()
        lens_tok, lens = run_policy(model, reqs, lens_cfg)
        light_tok, light = run_policy(model, reqs, light_cfg)
        p_lens = perf.predict(cfg, costs, w, lens_cfg)
        p_light = perf.predict(cfg, costs, w, light_cfg)
        row = {
            "workload": name, "scale": scale, "num_requests": len(reqs),
            "prompt_mean": w.mean_prompt, "gen_len": w.mean_gen, "kv_tokens": kv_tokens,
            "moe_lens_generated_tokens_per_s": lens["generated_tokens_per_s"],
            "moe_lightning_generated_tokens_per_s": light["generated_tokens_per_s"],
            "speedup": lens["generated_tokens_per_s"] / light["generated_tokens_per_s"],
            "predicted_speedup": p_lens.generated_tokens_per_s / p_light.generated_tokens_per_s,
            "predicted_moe_lens_generated_tokens_per_s": p_lens.generated_tokens_per_s,
            "predicted_moe_lightning_generated_tokens_per_s": p_light.generated_tokens_per_s,
            "moe_lens_token_budget": budget, "lightning_batch_size": lp.batch_size,
            "lightning_micro_batch": lp.micro_batch,
            "lightning_hrm_generated_tokens_per_s": lp.hrm_generated_tokens_per_s,
            "identical_requests": sum(a == b for a, b in zip(lens_tok, light_tok, strict=True)),
            "moe_lens": lens, "moe_lightning": light, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name:>18} p={w.mean_prompt:6.1f} g={w.mean_gen:5.1f} kv={kv_tokens:>6}: "
              f"MoE-Lens {row['moe_lens_generated_tokens_per_s']:7.1f}  MoE-Lightning "
              f"{row['moe_lightning_generated_tokens_per_s']:7.1f} tok/s  speedup "
              f"{row['speedup']:.2f}x (predicted {row['predicted_speedup']:.2f}x)  identical "
              f"tokens {row['identical_requests']}/{len(reqs)}", flush=True)
    sp = np.array([r["speedup"] for r in rows])
    print(common.table([("mean speedup", f"{sp.mean():.2f}x"), ("max speedup",
                                                                 f"{sp.max():.2f}x")],
                       "== results =="))
    return {"mean_speedup": float(sp.mean()), "max_speedup": float(sp.max()),
            "mean_predicted_speedup": float(np.mean([r["predicted_speedup"] for r in rows])),
            "workloads": rows, "link_cap_bytes_per_s": cap, "flop_per_byte": flop_per_byte,
            "a40_flop_per_byte": A40_FLOP_PER_BYTE, "hardware": dataclasses.asdict(hw),
            "model": cfg.name, "config": dataclasses.asdict(cfg), "seed": seed}
