"""Peer systems for the benchmarks: HF transformers in-process, vLLM CPU in its own venv.

What `experiments.bench_peers` measures against, kept out of the entry point so each piece
reads whole: the GEMM work a run implies, a measured dense-GEMM ceiling, and one runner per peer.
Each runner takes the same HF folder and requests, does one untimed warm-up of the whole
workload, then `repeats` timed runs, and returns the greedy tokens and the timed seconds.

vLLM pins its own torch and transformers, so it runs in a separate interpreter
(`experiments/vllm_driver.py`, which imports neither jax nor moelens_jax), talking through JSON
files. Its CPU placement is set through environment variables before vLLM is imported: every
allowed core to the model (vLLM reserves one for its front end by default) and the
tcmalloc preload its CPU guide recommends, when the library is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from typing import NamedTuple

import numpy as np

from moelens_jax.config import ModelConfig
from moelens_jax.runtime import Request

VLLM_DRIVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vllm_driver.py")
TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"


class PeerRun(NamedTuple):
    tokens: list[list[int]]  # greedy tokens per request, request order
    walls_s: list[float]  # one per timed repeat
    info: dict  # what the peer reports about itself (versions, limits)


class GemmWork(NamedTuple):
    unpadded_flops: int  # each prompt once, one token per decode step (engine, vLLM)
    padded_flops: int  # one batch left-padded to the longest prompt (HF generate)


def gemm_work(cfg: ModelConfig, reqs: list[Request]) -> GemmWork:
    """GEMM FLOPs of the workload: layers on every processed token, logits on the last token per
    step only. Every request generates `reqs[0].max_new_tokens` tokens."""
    gen = reqs[0].max_new_tokens
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    max_prompt = max(len(r.prompt) for r in reqs)
    layer_flops = cfg.flops_per_token_per_layer * cfg.num_layers
    head_flops = cfg.lm_head_flops_per_row * gen * len(reqs)
    return GemmWork(layer_flops * (prompt_tokens + len(reqs) * (gen - 1)) + head_flops,
                    layer_flops * len(reqs) * (max_prompt + gen - 1) + head_flops)


def measure_gemm_roof(m: int = 1024, k: int = 1024, n: int = 4096, repeats: int = 7) -> float:
    """Median GFLOP/s of a jitted float32 `jnp.dot` (m x k) @ (k x n): the dense XLA GEMM rate
    this machine reaches, the ceiling for GEMM-bound inference here."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (k, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()  # compile
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dot(a, b).block_until_ready()
        walls.append(time.perf_counter() - t0)
    return 2 * m * k * n / float(np.median(walls)) / 1e9


def run_hf(folder: str, reqs: list[Request], dtype: str, repeats: int = 1) -> PeerRun:
    """HF transformers `generate` on CPU: one left-padded batch, greedy, KV cache on."""
    import torch
    import transformers

    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype)).eval()
    width = max(len(r.prompt) for r in reqs)
    ids = torch.zeros((len(reqs), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(reqs):  # left padding, as HF generate expects for decoder-only models
        ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
        mask[i, width - len(r.prompt):] = 1
    gen = reqs[0].max_new_tokens

    def go():
        with torch.no_grad():
            return hf.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                               max_new_tokens=gen, min_new_tokens=gen, eos_token_id=None,
                               pad_token_id=0)

    go()  # warm-up
    walls, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = go()
        walls.append(time.perf_counter() - t0)
    tokens = [out[i, width:].tolist() for i in range(len(reqs))]
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}
    return PeerRun(tokens, walls, info)


def vllm_env() -> dict[str, str]:
    """The environment vLLM's CPU backend runs under: the model gets every allowed core."""
    cores = sorted(os.sched_getaffinity(0))
    contiguous = cores == list(range(cores[0], cores[-1] + 1))
    env = {**os.environ, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_OMP_THREADS_BIND": (f"{cores[0]}-{cores[-1]}" if contiguous
                                         else ",".join(map(str, cores))),
           "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
    if os.path.exists(TCMALLOC):
        env["LD_PRELOAD"] = ":".join(p for p in (TCMALLOC, os.environ.get("LD_PRELOAD")) if p)
    return env


def run_vllm(python: str, folder: str, reqs: list[Request], dtype: str, *, kv_cache_bytes: int,
             max_num_batched_tokens: int, repeats: int = 1, seed: int = 0) -> PeerRun:
    """vLLM CPU (`LLM.generate` on token ids, prefix cache off) in a subprocess run by `python`.

    Raises:
      RuntimeError: vLLM failed; the message carries the tail of its log.
    """
    with tempfile.TemporaryDirectory() as tmp:
        job, out, log = (os.path.join(tmp, f) for f in ("job.json", "out.json", "vllm.log"))
        with open(job, "w") as f:
            json.dump({"folder": folder, "dtype": dtype, "gen_len": reqs[0].max_new_tokens,
                       "prompts": [list(r.prompt) for r in reqs], "repeats": repeats,
                       "kv_cache_bytes": kv_cache_bytes, "seed": seed,
                       "max_num_batched_tokens": max_num_batched_tokens}, f)
        with open(log, "w") as f:
            proc = subprocess.run([python, VLLM_DRIVER, job, out], stdout=f,
                                  stderr=subprocess.STDOUT, env=vllm_env())
        if proc.returncode != 0:
            with open(log) as f:
                raise RuntimeError(f"vLLM ({python}) exited with {proc.returncode}:\n"
                                   f"{f.read()[-3000:]}")
        with open(out) as f:
            res = json.load(f)
    tokens, walls = res.pop("tokens"), res.pop("walls_s")
    return PeerRun(tokens, walls, res)
