"""Both scheduling policies on one engine: the measurement behind `compare_policies` and
`reproduce_paper` (see experiments/compare_policies.py for the setup and its numbers).

MoE-Lightning runs the plan its own planner (`perf.lightning_planner`) makes for an emulated
GPU: this machine's calibrated GEMM rate and memory bandwidth, the capped link, and a device
memory holding what the planner keeps there at r_w = 0 (every layer's attention weights, a
double buffer of one layer's experts) plus the activation memory MoE-Lens's own token budget
needs (`runtime.memory`), so both systems get the same activation allowance. Its host is
emulated the same way: one on which its 80 % limit holds the layers, its double buffer and
exactly the KV budget MoE-Lens gets. (At this scale the weights dwarf the KV budget, so "the
same host" would leave the planner no KV at all; its under-use of a real host is a paper-scale
effect, predicted in `reproduce_paper`'s headline, not measured here.) The engine runs its
(N, mu) in micro-batches, keeping the plan's share of every layer on the device
(`resident_weight_fraction`: the attention weights; r_w of the experts).

r_w is capped at 0 here (`MAX_WEIGHTS_ON_GPU`). The spare device memory the planner fills with
experts is about one to two layers' worth at paper scale too, but Mixtral 8x7B spreads it over
30 streamed layers (r_w = 0.05 in its worked example) and a 4-layer model over 2 (r_w
0.5-0.8, measured with the cap lifted): a model this shallow cannot scale residency down. The
predicted headline keeps the planner's r_w.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from experiments import common
from moelens_jax import perf, workloads
from moelens_jax.perf import lightning_planner
from moelens_jax.runtime import Engine, EngineConfig, memory

# (scale of every length, generation length before scaling): ~10-50 passes per policy.
SCALES = {"mtbench": (0.25, 32), "rag": (0.125, 128), "helm_reasoning": (0.125, 50),
          "helm_summarization": (0.0625, 64), "aime": (0.25, 128)}
BATCHES = 6

A40_FLOP_PER_BYTE = 150e12 / 19.5e9
# MoE-Lightning prefills a whole batch in one pass over the layers (all micro-batches).
LIGHTNING_PREFILL_BUDGET = 1 << 20
MAX_WEIGHTS_ON_GPU = 0.0  # r_w cap of the emulated plan (module docstring)


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


def emulated_lightning_hardware(model, hw_local: perf.HardwareSpec, link_bytes_per_s: float,
                                lens_config: EngineConfig, workload: perf.Workload)\
        -> lightning_planner.LightningHardware:
    """The planner's inputs for this machine in the link-capped regime (module docstring)."""
    cfg = model.config
    act = memory.stage_activation_bytes(cfg, memory.max_iteration_rows(
        lens_config.token_budget), model.dtype)
    return lightning_planner.LightningHardware(
        name="emulated", gpu_memory=lightning_planner.device_memory_for(cfg, act),
        cpu_memory=lightning_planner.host_memory_for(
            cfg, workload.mean_prompt, round(workload.mean_gen), lens_config.kv_cache_bytes),
        ctog_bandwidth=link_bytes_per_s, gpu_bandwidth=hw_local.host_memory_bandwidth,
        cpu_bandwidth=hw_local.cpu_attn_bytes_per_s, gpu_flops=hw_local.gemm_flops,
        cpu_flops=hw_local.gemm_flops)


def lightning_config(cfg, plan: lightning_planner.LightningPlan, kv_bytes: int,
                     link_gb_per_s: float) -> EngineConfig:
    """MoE-Lightning's plan as an engine config: its static batch N of mu-sized micro-batches,
    prefilled in one pass, its share of every layer kept on the device."""
    return EngineConfig(kv_cache_bytes=kv_bytes, h2d_limit_gb_per_s=link_gb_per_s,
                        policy="moe-lightning", max_batch=plan.batch_size,
                        micro_batch=plan.micro_batch, token_budget=LIGHTNING_PREFILL_BUDGET,
                        resident_weight_fraction=plan.resident_weight_fraction(cfg))


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
        # MoE-Lens: n_real from the model; MoE-Lightning: its planner's plan (docstring).
        lens_cfg = perf.engine_config(cfg, hw, costs, kv_cache_bytes=kv_bytes,
                                      h2d_limit_gb_per_s=cap / 1e9)
        lhw = emulated_lightning_hardware(model, hw_local, cap, lens_cfg, w)
        plan = lightning_planner.plan(cfg, lhw, w.mean_prompt, round(w.mean_gen),
                                      max_weights_on_gpu=MAX_WEIGHTS_ON_GPU)
        light_cfg = lightning_config(cfg, plan, kv_bytes, cap / 1e9)
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
            "moe_lens_token_budget": budget, "lightning_batch_size": plan.batch_size,
            "lightning_micro_batch": plan.micro_batch,
            "lightning_weights_on_gpu": plan.weights_on_gpu,
            "lightning_resident_weight_fraction": light_cfg.resident_weight_fraction,
            "lightning_planner_generated_tokens_per_s": plan.generated_tokens_per_s,
            "lightning_planner_terms_s": plan.terms,
            "identical_requests": sum(a == b for a, b in zip(lens_tok, light_tok, strict=True)),
            "moe_lens": lens, "moe_lightning": light, "wall_s": time.perf_counter() - t0}
        rows.append(row)
        print(f"{name:>18} p={w.mean_prompt:6.1f} g={w.mean_gen:5.1f} kv={kv_tokens:>6}: "
              f"MoE-Lens {row['moe_lens_generated_tokens_per_s']:7.1f}  MoE-Lightning "
              f"{row['moe_lightning_generated_tokens_per_s']:7.1f} tok/s (N={plan.batch_size}, "
              f"mu={plan.micro_batch}, r_w={plan.weights_on_gpu:.2f})  speedup "
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
