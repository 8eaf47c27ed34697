"""The main job: offline batch generation on a model and workload, reporting throughput.

Until the MoE-Lens engine lands, this runs the *reference* path: greedy decoding by full
recompute (`moelens_jax.reference.greedy_generate`, no KV cache) on the whole batch. The JSON
says so (`mode: "reference-recompute"`); it is a correctness baseline, not the fast path.

    python -m experiments.run_throughput                     # embedded small-mixtral, random
    python -m experiments.run_throughput --model /path/to/hf_checkpoint --num_requests 4
"""

from __future__ import annotations

import time

from absl import app, flags

import moelens_jax as mj
from experiments import common
from moelens_jax import reference, workloads

_MODEL = flags.DEFINE_string("model", mj.config.DEFAULT_PRESET, "Preset name or checkpoint folder.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weight dtype (default: the checkpoint's / preset's).")
_NUM_REQUESTS = flags.DEFINE_integer("num_requests", 8, "Requests in the batch.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 98, "Mean prompt length (log-normal).")
_GEN_LEN = flags.DEFINE_integer("gen_len", 32, "Tokens generated per request.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for random weights and the workload.")


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    t0 = time.perf_counter()
    model = mj.load_model(_MODEL.value, dtype=_DTYPE.value, seed=_SEED.value, progress=True)
    load_s = time.perf_counter() - t0
    cfg = model.config
    reqs = workloads.synthetic(_NUM_REQUESTS.value, _PROMPT_LEN.value, _GEN_LEN.value,
                               cfg.vocab_size, seed=_SEED.value)
    prompt_tokens = sum(len(r.prompt) for r in reqs)
    print(common.table([
        ("model", f"{cfg.name or model.source} ({cfg.family}, {model.dtype})"),
        ("parameters", f"{cfg.total_params / 1e6:,.1f} M ({cfg.active_params_per_token / 1e6:,.1f}"
                       " M active per token)"),
        ("weight bytes", f"{model.weight_bytes / 2**20:,.1f} MiB "
                         f"({cfg.weight_bytes_per_layer / 2**20:,.2f} MiB per layer)"),
        ("KV bytes per token", f"{cfg.kv_bytes_per_token():,} B"),
        ("requests", f"{len(reqs)} (prompt tokens {prompt_tokens}, generation {_GEN_LEN.value})"),
        ("mode", "reference-recompute (no KV cache; engine not yet implemented)"),
    ], "== run_throughput card =="), flush=True)

    # Warm-up compiles the one padded shape used for the whole run.
    reference.greedy_generate(model, [r.prompt for r in reqs], 1)
    t0 = time.perf_counter()
    outs = reference.greedy_generate(model, [r.prompt for r in reqs],
                                     [r.max_new_tokens for r in reqs])
    gen_s = time.perf_counter() - t0
    generated = sum(len(o) for o in outs)
    result = {
        "mode": "reference-recompute",
        "model": cfg.name or model.source,
        "dtype": model.dtype,
        "num_requests": len(reqs),
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "wall_s": gen_s,
        "load_s": load_s,
        "generated_tokens_per_s": generated / gen_s,
        "processed_tokens_per_s": (generated + prompt_tokens) / gen_s,
        "flags": settings,
        "machine": common.machine_fingerprint(),
    }
    print(common.table([(k, f"{result[k]:.3f}" if isinstance(result[k], float) else result[k])
                        for k in ("num_requests", "prompt_tokens", "generated_tokens", "wall_s",
                                  "generated_tokens_per_s", "processed_tokens_per_s")],
                       "== results =="))
    common.print_json(result)


if __name__ == "__main__":
    app.run(main)
