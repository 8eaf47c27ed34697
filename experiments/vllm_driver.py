"""vLLM's side of `experiments.bench_peers`, run by vLLM's own interpreter in a subprocess.

Standalone on purpose: vLLM lives in its own virtual environment (it pins its own torch and
transformers), so this script imports only vLLM and the standard library, never moelens_jax
or jax. It reads a job file, builds `vllm.LLM` on the HF folder (no tokenizer: prompts are
token ids; prefix caching off so the warm-up cannot speed up the timed run), runs one untimed
warm-up generate of the whole workload (compilation, allocator) and then `repeats` timed
generates, and writes the greedy tokens per request and the timed seconds.

    /work/vllm-venv/bin/python experiments/vllm_driver.py JOB.json OUT.json

JOB.json: {"folder": str, "dtype": "float32" | "bfloat16", "prompts": [[int, ...], ...],
           "gen_len": int, "kv_cache_bytes": int, "max_num_batched_tokens": int,
           "repeats": int, "seed": int}
OUT.json: {"tokens": [[int, ...], ...], "walls_s": [float, ...], "vllm": str,
           "max_num_seqs": int, "max_num_batched_tokens": int, "max_model_len": int}

The caller sets the CPU placement through vLLM's environment variables (e.g.
VLLM_CPU_NUM_OF_RESERVED_CPU=0 and VLLM_CPU_OMP_THREADS_BIND=0-1 to give the model every core);
they must be set before vLLM is imported, hence a subprocess.
"""

import json
import sys
import time


def run(job: dict) -> dict:
    import vllm

    prompts = job["prompts"]
    gen = job["gen_len"]
    llm = vllm.LLM(
        model=job["folder"], dtype=job["dtype"], skip_tokenizer_init=True,
        enable_prefix_caching=False, seed=job.get("seed", 0),
        max_model_len=max(len(p) for p in prompts) + gen,
        kv_cache_memory_bytes=job["kv_cache_bytes"],
        max_num_batched_tokens=job["max_num_batched_tokens"])
    params = vllm.SamplingParams(temperature=0.0, max_tokens=gen, min_tokens=gen,
                                 ignore_eos=True, detokenize=False)
    inputs = [{"prompt_token_ids": list(p)} for p in prompts]

    def go():
        outs = llm.generate(inputs, params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]  # outputs keep the input order

    go()  # warm-up
    walls, tokens = [], None
    for _ in range(job.get("repeats", 1)):
        t0 = time.perf_counter()
        tokens = go()
        walls.append(time.perf_counter() - t0)
    sched = llm.llm_engine.vllm_config.scheduler_config
    return {"tokens": tokens, "walls_s": walls, "vllm": vllm.__version__,
            "max_num_seqs": sched.max_num_seqs,
            "max_num_batched_tokens": sched.max_num_batched_tokens,
            "max_model_len": llm.llm_engine.vllm_config.model_config.max_model_len}


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        raise SystemExit(f"usage: {argv[0]} JOB.json OUT.json")
    with open(argv[1]) as f:
        job = json.load(f)
    result = run(job)
    with open(argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vllm.LLM spawns worker processes that re-import this module
    main(sys.argv)
