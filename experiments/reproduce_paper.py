"""Regenerates the MoE-Lens paper's tables and figures: predicted where we lack the hardware,
measured where this machine can run it. Each artefact is a PNG plus rows in DIR/results.json,
and DIR/REPORT.md says which numbers are measured here and which are predicted.

    python -m experiments.reproduce_paper --out paper_out            # ~20 min on 2 cores
    python -m experiments.reproduce_paper --out /tmp/p --reduced     # CI-sized, ~2 min

Artefacts:
  table2       tokens and KV size to saturate A40 / L40 / A100 with Mixtral 8x7B (exact)
  fig3a        maximum GPU utilisation over a (prompt, generation) grid, A40, 100 GB KV
  fig3b        throughput bound vs KV capacity (p=100, g=128) with the turning point
  headline     predicted MoE-Lens vs MoE-Lightning, Mixtral 8x7B / 8x22B / DBRX, A40 (24 GB
               usable, PCIe 19.5 GB/s), 70 and 210 GB KV, MTBench g=32..256 and RAG;
               MoE-Lightning as its own planner plans it (`perf.lightning_planner`, the
               artifact's fallback constants) and, for comparison, at the largest batch
               the KV allows
  measured     compare_policies on this machine (both policies on the same engine)
  accuracy     validate_model's predicted-vs-measured scatter
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np
from absl import app, flags

import moelens_jax as mj
from experiments import common, model_validation, policy_comparison
from moelens_jax import perf
from moelens_jax.config import get_preset
from moelens_jax.perf import lightning_planner
from moelens_jax.runtime import EngineConfig

_OUT = flags.DEFINE_string("out", "paper_out", "Output directory.")
_REDUCED = flags.DEFINE_bool("reduced", False, "Shrink every grid and run (CI smoke mode).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for the measured runs.")

PAPER_HEADLINE = {"mean_speedup": 4.6, "max_speedup": 25.5}
MTBENCH_P, RAG = 98, (926, 128)


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def table2(out):
    cfg = get_preset("mixtral-8x7b")
    rows = []
    for gpu, tflops in (("a40", 150), ("l40", 181), ("a100", 312)):
        t256, kv256 = perf.paper_table2(cfg, tflops, 32, 256)
        _, kv512 = perf.paper_table2(cfg, tflops, 32, 512)
        rows.append({"gpu": gpu, "tflops": tflops, "link_gb_per_s": 32,
                     "tokens_to_saturate": t256, "kv_gb_seq256": kv256, "kv_gb_seq512": kv512,
                     "units": "paper: tokens = C*1024/B*Ne/Nk, GB = 1000*2^20 B"})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 1.6), dpi=110)
    ax.axis("off")
    ax.table(cellText=[[r["gpu"], f"{r['tokens_to_saturate']:,.0f}", f"{r['kv_gb_seq256']:.0f}",
                        f"{r['kv_gb_seq512']:.0f}"] for r in rows],
             colLabels=["GPU", "tokens", "KV GB @256", "KV GB @512"], loc="center")
    ax.set_title("Table 2: saturating the GPU with Mixtral 8x7B", fontsize=9)
    fig.savefig(os.path.join(out, "table2.png"), bbox_inches="tight")
    return rows


def fig3a(out, reduced):
    cfg, hw = get_preset("mixtral-8x7b"), perf.get_hardware("a40")
    ps = [32, 128, 512] if reduced else [32, 64, 128, 256, 512, 1024, 2048]
    gs = [32, 128, 512] if reduced else [16, 32, 64, 128, 256, 512, 1024]
    util = np.zeros((len(ps), len(gs)))
    rows = []
    for i, p in enumerate(ps):
        for j, g in enumerate(gs):
            r = perf.stage1(cfg, hw, perf.Workload.fixed(p, g), 100e9)
            util[i, j] = r.processed_tokens_per_s / r.bound_gpu_tokens_per_s
            rows.append({"prompt_len": p, "gen_len": g, "gpu_utilisation": util[i, j],
                         "binding": r.binding})
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 4), dpi=110)
    im = ax.imshow(util, origin="lower", cmap="viridis", vmin=0, vmax=1)
    ax.set(xticks=range(len(gs)), xticklabels=gs, yticks=range(len(ps)), yticklabels=ps,
           xlabel="generation length", ylabel="prompt length",
           title="Fig. 3(a): max GPU utilisation, A40, 100 GB KV")
    for i in range(len(ps)):
        for j in range(len(gs)):
            ax.text(j, i, f"{util[i, j]:.2f}", ha="center", va="center", fontsize=6, color="w")
    fig.colorbar(im)
    fig.savefig(os.path.join(out, "fig3a.png"), bbox_inches="tight")
    return rows


def fig3b(out, reduced):
    cfg, hw = get_preset("mixtral-8x7b"), perf.get_hardware("a40")
    w = perf.Workload.fixed(100, 128)
    kvs = np.geomspace(10e9, 2000e9, 8 if reduced else 40)
    res = [perf.stage1(cfg, hw, w, kv) for kv in kvs]
    tp = res[0].turning_point_kv_bytes
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    ax.plot(kvs / 1e9, [r.processed_tokens_per_s for r in res], label="T_max (processed)")
    ax.axvline(tp / 1e9, ls="--", c="k", lw=1, label=f"turning point {tp / 1e9:.0f} GB")
    ax.set(xscale="log", xlabel="KV cache (GB)", ylabel="tokens/s",
           title="Fig. 3(b): bound vs KV capacity (p=100, g=128), A40")
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(out, "fig3b.png"), bbox_inches="tight")
    return {"turning_point_kv_gb": tp / 1e9,
            "points": [{"kv_gb": kv / 1e9, "processed_tokens_per_s": r.processed_tokens_per_s,
                        "binding": r.binding} for kv, r in zip(kvs, res, strict=True)]}


def headline(out, reduced):
    hw = dataclasses.replace(perf.get_hardware("a40"), device_memory_bytes=24e9)
    models = ["mixtral-8x7b"] if reduced else ["mixtral-8x7b", "mixtral-8x22b", "dbrx"]
    settings = [(MTBENCH_P, 32), RAG] if reduced else [(MTBENCH_P, g) for g in
                                                       (32, 64, 128, 256)] + [RAG]
    rows = []
    for name in models:
        cfg = get_preset(name)
        for kv in ((70e9,) if reduced else (70e9, 210e9)):
            for p, g in settings:
                w = perf.Workload.fixed(p, g)
                k = max(64, int((1 if reduced else 3) * perf.stage1(cfg, hw, w, kv).kv_tokens
                                / (p + g / 2)))
                wk = perf.Workload.fixed(p, g, k)
                lens_cfg = perf.engine_config(cfg, hw, kv_cache_bytes=kv)
                budget = lens_cfg.token_budget
                lens = perf.predict(cfg, hw, wk, lens_cfg)
                # MoE-Lightning as it plans itself: its published planner on the artifact's
                # constants for a GPU it has no entry for (a 24 GiB GPU), given the host
                # memory MoE-Lens uses in this setting (weights + KV), its plan (N, mu, r_w) run
                # by Stage 2 with KV for exactly its N reserved sequences.
                lhw = lightning_planner.LightningHardware.artifact(
                    "a40", cpu_memory_bytes=cfg.total_weight_bytes + kv)
                plan = lightning_planner.plan(cfg, lhw, p, g)
                # (+16: each sequence's last page is partly empty at the default page size)
                kv_plan = int(plan.batch_size * (p + g + 16) * cfg.kv_bytes_per_token())
                faithful = perf.predict(cfg, hw, wk, EngineConfig(
                    kv_cache_bytes=kv_plan, policy="moe-lightning", max_batch=plan.batch_size,
                    micro_batch=plan.micro_batch, token_budget=1 << 22,
                    resident_weight_fraction=plan.resident_weight_fraction(cfg)))
                # The KV-bound baseline: the largest static batch MoE-Lens's KV budget holds
                # reserved, with the plan's weight residency (so the factor between the two
                # baselines is the planner's N and mu alone).
                light = perf.predict(cfg, hw, wk, EngineConfig(
                    kv_cache_bytes=kv, policy="moe-lightning", token_budget=1 << 22,
                    resident_weight_fraction=plan.resident_weight_fraction(cfg)))
                rows.append({"model": name, "kv_gb": kv / 1e9, "prompt_len": p, "gen_len": g,
                             "num_requests": k,
                             "planner_batch_size": plan.batch_size,
                             "planner_micro_batch": plan.micro_batch,
                             "planner_weights_on_gpu": plan.weights_on_gpu,
                             "planner_generated_tokens_per_s": plan.generated_tokens_per_s,
                             "moe_lightning_planned_generated_tokens_per_s":
                                 faithful.generated_tokens_per_s,
                             "speedup_vs_planned": lens.generated_tokens_per_s
                             / faithful.generated_tokens_per_s,
                             "moe_lens_generated_tokens_per_s": lens.generated_tokens_per_s,
                             "moe_lightning_generated_tokens_per_s":
                                 light.generated_tokens_per_s,
                             "speedup": lens.generated_tokens_per_s
                             / light.generated_tokens_per_s,
                             "moe_lens_token_budget": budget})
    sp = np.array([r["speedup"] for r in rows])
    sp_planned = np.array([r["speedup_vs_planned"] for r in rows])
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 0.5 * len(rows)), 3.5), dpi=110)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, sp_planned, 0.4, label="vs its own planner's plan")
    ax.bar(x + 0.2, sp, 0.4, label="vs largest N the KV allows")
    ax.set_xticks(x)
    ax.set_xticklabels([f"{r['model'].replace('mixtral-', 'mx')} {r['kv_gb']:.0f}G "
                        f"p{r['prompt_len']} g{r['gen_len']}" for r in rows], rotation=90,
                       fontsize=6)
    ax.axhline(PAPER_HEADLINE["mean_speedup"], ls="--", c="k", lw=1, label="paper mean 4.6x")
    ax.set(ylabel="predicted speedup", title="MoE-Lens vs MoE-Lightning (predicted, A40)")
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(out, "headline.png"), bbox_inches="tight")
    return {"rows": rows, "mean_speedup": float(sp_planned.mean()),
            "max_speedup": float(sp_planned.max()),
            "mean_speedup_kv_bound_baseline": float(sp.mean()),
            "max_speedup_kv_bound_baseline": float(sp.max()), "paper": PAPER_HEADLINE,
            "lightning_hardware": "artifact fallback (24 GiB GPU), host = weights + KV"}


def measured(out, reduced, seed):
    if reduced:
        model = mj.load_model("tiny-mixtral", seed=seed)
        cmp = policy_comparison.compare(model, ["mtbench"], 8, seed=seed,
                                       scales={"mtbench": (0.25, 16)})
        val = model_validation.validate(["tiny-qwen3-moe"], model_validation.QUICK_GRID, seed,
                                      os.path.join(out, "accuracy.png"))
    else:
        model = mj.load_model(mj.config.DEFAULT_PRESET, seed=seed)
        cmp = policy_comparison.compare(model, list(policy_comparison.SCALES), 48, seed=seed)
        val = model_validation.validate(["small-mixtral", "tiny-qwen3-moe"], model_validation.GRID,
                                      seed, os.path.join(out, "accuracy.png"))
    plt = _plt()
    rows = cmp["workloads"]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=110)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["moe_lens_generated_tokens_per_s"] for r in rows], 0.4, label="MoE-Lens")
    ax.bar(x + 0.2, [r["moe_lightning_generated_tokens_per_s"] for r in rows], 0.4,
           label="MoE-Lightning")
    ax.set_xticks(x)
    ax.set_xticklabels([r["workload"] for r in rows], rotation=30, fontsize=7)
    ax.set(ylabel="generated tok/s (this machine)", title="Measured: both policies, one engine")
    ax.legend(fontsize=8)
    fig.savefig(os.path.join(out, "measured.png"), bbox_inches="tight")
    return cmp, val


def _headline_factors(rows) -> list[str]:
    """The predicted speedup over MoE-Lightning's own plan, split into two factors per row
    (their product is the speedup): what the planner's choice of N and mu costs it against the
    largest batch MoE-Lens's KV budget holds with KV reserved for prompt + generation, and what
    MoE-Lens's scheduling gains over that batch (continuous admission, KV paged as tokens
    arrive, no reservation)."""
    plan = np.array([r["moe_lightning_generated_tokens_per_s"]
                     / r["moe_lightning_planned_generated_tokens_per_s"] for r in rows])
    sched = np.array([r["speedup"] for r in rows])
    lines = ["Where the predicted speedup over MoE-Lightning's own plan comes from (geometric "
             "means over the headline rows; the two factors multiply to the speedup):", "",
             "| factor | geo. mean | max |", "|---|---|---|",
             f"| its planner's N and mu (its limits: 80 % of the host, prompt-sized GPU "
             f"activations) vs the largest batch MoE-Lens's KV budget holds when reserved | "
             f"{np.exp(np.log(plan).mean()):.2f}x | {plan.max():.2f}x |",
             f"| MoE-Lens scheduling vs that batch (continuous admission, paged KV, no "
             f"reservation) | {np.exp(np.log(sched).mean()):.2f}x | {sched.max():.2f}x |", ""]
    by_model = {}
    for r, f in zip(rows, plan, strict=True):
        by_model.setdefault(r["model"], []).append(f)
    lines += ["Planner factor by model: " + ", ".join(
        f"{m} {np.exp(np.log(v).mean()):.2f}x" for m, v in by_model.items()) + ".", ""]
    return lines


def _difference_terms(h, c) -> list[str]:
    """The REPORT paragraph on the remaining difference from the paper's 4.6x / 25.5x, term
    by term, from the numbers of this run."""
    rows = h["rows"]
    sched = np.exp(np.log([r["speedup"] for r in rows]).mean())
    plan = np.exp(np.log([r["moe_lightning_generated_tokens_per_s"]
                          / r["moe_lightning_planned_generated_tokens_per_s"]
                          for r in rows]).mean())
    rw = np.mean([r["planner_weights_on_gpu"] for r in rows])
    return [
        "**The remaining difference from the paper's 4.6x mean / 25.5x max, term by term.**",
        f"(1) *KV reservation, static batches and prefill passes* (MoE-Lens's scheduling "
        f"against the largest batch its KV budget holds reserved for prompt + generation, "
        f"prefilled in its own passes): {sched:.2f}x predicted (geometric mean); measured "
        f"here, where it is the only term in play, {c['mean_speedup']:.2f}x (predicted "
        f"{c['mean_predicted_speedup']:.2f}x for the same runs). "
        f"(2) *Planner under-use*: its 80 % host limit, after the experts and their pinned "
        f"double buffer, leaves less KV than MoE-Lens gets, and its GPU limit sizes "
        f"micro-batch activations by the prompt: {plan:.2f}x predicted. This term is set by "
        f"the host memory we assume (weights + KV; the paper does not give its host size per "
        f"setting): with a host of this size the 8x22B and DBRX plans fit only a few "
        f"sequences, which is why our predicted mean exceeds the paper's measured 4.6x. "
        f"(3) *Weight residency*: the plans keep r_w = {rw:.3f} of the experts on the GPU on "
        f"average; Stage 2 streams only the rest for MoE-Lightning (both baselines), so this "
        f"term is in its favour. "
        "(4) *Pipeline bubbles*: Stage 2 charges both systems a perfect overlap of link, GPU "
        "and CPU at datasheet rates with no fixed costs, so the micro-batch count costs "
        "nothing in the prediction; CGOPipe's ramp-up and drain per layer and its "
        "mu-sized GEMMs below the GPU's roof would only raise the speedup. Measured here, "
        "MoE-Lightning's micro-batches run through the engine's serial executor (each "
        "group's stages dispatched on their own), and the model charges each group's fixed "
        "costs. "
        "(5) *Kernel speed*: both systems are predicted on our kernels; the paper measured "
        "MoE-Lightning's own implementation, whose kernel efficiency is not modelled here.",
        ""]


def report(out, results) -> str:
    h, c, v = results["headline"], results["measured"], results["accuracy"]
    lines = [
        "# Reproducing MoE-Lens", "",
        f"Generated by `python -m experiments.reproduce_paper` (reduced={results['reduced']}, "
        f"seed={results['seed']}) on {results['machine']['cpu']} "
        f"({results['machine']['cpu_count']} CPUs, jax {results['machine']['jax']}).", "",
        "**Predicted** (performance model; no A40/L40/A100 here): Table 2 (`table2.png`, exact "
        "paper arithmetic), Fig. 3(a) (`fig3a.png`), Fig. 3(b) (`fig3b.png`), and the headline "
        "comparison (`headline.png`).", "",
        "**Measured on this machine**: both policies on the same engine (`measured.png`) and "
        "the model's accuracy (`accuracy.png`).", "",
        "| | mean speedup | max speedup |", "|---|---|---|",
        f"| paper (measured, A40) | {PAPER_HEADLINE['mean_speedup']}x | "
        f"{PAPER_HEADLINE['max_speedup']}x |",
        f"| ours, predicted for A40, vs MoE-Lightning's own plan (its planner) | "
        f"{h['mean_speedup']:.2f}x | {h['max_speedup']:.2f}x |",
        f"| ours, predicted for A40, vs the largest batch the KV allows | "
        f"{h['mean_speedup_kv_bound_baseline']:.2f}x | {h['max_speedup_kv_bound_baseline']:.2f}x |",
        f"| ours, measured here (scaled workloads) | {c['mean_speedup']:.2f}x | "
        f"{c['max_speedup']:.2f}x |", "",
        *_headline_factors(h["rows"]),
        *_difference_terms(h, c),
        f"Stage-2 accuracy here: mean {v['mean_accuracy']:.3f}, min {v['min_accuracy']:.3f} "
        f"over {v['n_configs']} configurations.", "",
        f"Fig. 3(b) turning point: {results['fig3b']['turning_point_kv_gb']:.0f} GB of KV.", ""]
    text = "\n".join(lines)
    with open(os.path.join(out, "REPORT.md"), "w") as f:
        f.write(text)
    return text


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    out = _OUT.value
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    results = {"reduced": _REDUCED.value, "seed": _SEED.value, "flags": settings,
               "machine": common.machine_fingerprint(),
               "hardware_fingerprint": perf.fingerprint()}
    results["table2"] = table2(out)
    results["fig3a"] = fig3a(out, _REDUCED.value)
    results["fig3b"] = fig3b(out, _REDUCED.value)
    results["headline"] = headline(out, _REDUCED.value)
    results["measured"], results["accuracy"] = measured(out, _REDUCED.value, _SEED.value)
    results["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(common._clean(results), f, indent=1, sort_keys=True)
    print(report(out, results))
    common.print_json({"out": out, "wall_s": results["wall_s"],
                       "artefacts": sorted(os.listdir(out)),
                       "predicted_mean_speedup": results["headline"]["mean_speedup"],
                       "predicted_max_speedup": results["headline"]["max_speedup"],
                       "measured_mean_speedup": results["measured"]["mean_speedup"],
                       "model_mean_accuracy": results["accuracy"]["mean_accuracy"]})


if __name__ == "__main__":
    app.run(main)
