"""Runs an OpenAI-format batch file through the engine (see moelens_jax/batch.py for the
formats, error lines and resume).

    python -m experiments.run_batch --input requests.jsonl --output results.jsonl
    python -m experiments.run_batch --input requests.jsonl --output results.jsonl \\
        --model /data/Mixtral-8x7B-v0.1 --kv_cache_gb 64       # rerun the same line to resume
"""

from __future__ import annotations

from absl import app, flags

import moelens_jax as mj
from experiments import common
from moelens_jax import batch, perf
from moelens_jax.runtime import Engine

_INPUT = flags.DEFINE_string("input", None, "Input JSONL (OpenAI batch format).", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output JSONL (appended; resumed).",
                              required=True)
_MODEL = flags.DEFINE_string("model", mj.config.DEFAULT_PRESET, "Preset or checkpoint folder.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Weight dtype (default: the checkpoint's / preset's).")
_KV_CACHE_GB = flags.DEFINE_float("kv_cache_gb", 0.25, "Host KV cache size in GB (1e9 bytes).")
_KV_DTYPE = flags.DEFINE_string("kv_dtype", None, "KV storage dtype (default: the model's).")
_TOKEN_BUDGET = flags.DEFINE_integer("token_budget", None, "Tokens per iteration (default: "
                                     "the performance model's, from a cached calibration).")
_CHUNK = flags.DEFINE_integer("chunk", batch.CHUNK, "Requests handed to the engine at once.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for a preset's random weights.")


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    model = mj.load_model(_MODEL.value, dtype=_DTYPE.value, seed=_SEED.value)
    overrides = dict(kv_cache_bytes=int(_KV_CACHE_GB.value * 1e9), kv_dtype=_KV_DTYPE.value)
    if _TOKEN_BUDGET.value:
        overrides["token_budget"] = _TOKEN_BUDGET.value
    cal = perf.cached(model.config)
    config = (perf.engine_config(model.config, cal.hardware, cal.costs, **overrides)
              if cal is not None else mj.EngineConfig(**overrides))
    print(common.table([("model", repr(model)), ("input", _INPUT.value),
                        ("output", _OUTPUT.value), ("token budget", config.token_budget)],
                       "== run_batch card =="), flush=True)

    def show(st: batch.BatchStatus) -> None:
        eta = st.eta_s()
        print(f"  {st.skipped + st.done}/{st.total_lines} lines ({st.errors} errors), "
              f"{st.generated_tokens_per_s:.1f} generated tok/s, ETA "
              f"{'?' if eta is None else f'{eta:.0f} s'}", flush=True)

    with Engine(model, config) as engine:
        st = batch.run_batch(model, engine, _INPUT.value, _OUTPUT.value, chunk=_CHUNK.value,
                             on_status=show)
    common.print_json({"total_lines": st.total_lines, "skipped": st.skipped, "done": st.done,
                       "errors": st.errors, "generated_tokens": st.generated_tokens,
                       "wall_s": st.elapsed_s,
                       "generated_tokens_per_s": st.generated_tokens_per_s,
                       "output": _OUTPUT.value, "flags": settings})


if __name__ == "__main__":
    app.run(main)
