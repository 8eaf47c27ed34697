"""Runs an OpenAI-format batch file through the engine (see moelens_jax/batch.py for the
formats, error lines and resume).

    python -m experiments.run_batch --input requests.jsonl --output results.jsonl
    python -m experiments.run_batch --input requests.jsonl --output results.jsonl \\
        --model /data/Mixtral-8x7B-v0.1 --kv_cache_gb 64       # rerun the same line to resume

Data parallel over a Ray cluster (`pip install -e ".[ray]"`; moelens_jax/batch_ray.py): one
engine per replica, one GPU each when the cluster has GPUs.

    python -m experiments.run_batch --ray --replicas 2 --input ... --output ...   # local cluster
    ray start --head                           # on the head host; on each other host:
    ray start --address=HEAD_IP:6379
    python -m experiments.run_batch --ray --ray_address=auto --input ... --output ...
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
_CHUNK = flags.DEFINE_integer("chunk", None, "Requests handed to an engine at once (with "
                              "--ray: lines per block); default: 8 x the sequences the KV "
                              "cache holds at the input's mean request size.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for a preset's random weights.")
_RAY = flags.DEFINE_bool("ray", False, "Run data parallel on a Ray cluster (one engine per "
                         "replica).")
_REPLICAS = flags.DEFINE_integer("replicas", None, "Ray replicas (default: the cluster's GPUs, "
                                 "or 1 without GPUs).")
_RAY_ADDRESS = flags.DEFINE_string("ray_address", None, "Ray cluster to join ('auto': the one "
                                   "`ray start` runs here); default: start a local one.")
_REPLICA_CPUS = flags.DEFINE_float("replica_cpus", None, "Ray CPUs reserved per replica and "
                                   "its CPU attention threads (default: reserve 1, threads = "
                                   "the host's cores: one replica per host).")
_HARDWARE = flags.DEFINE_string("hardware", None, "Hardware preset whose datasheet sets the "
                                "token budget on hosts without a cached calibration.")


def _show(st: batch.BatchStatus) -> None:
    eta = st.eta_s()
    print(f"  {st.skipped + st.done}/{st.total_lines} lines ({st.errors} errors), "
          f"{st.generated_tokens_per_s:.1f} generated tok/s, ETA "
          f"{'?' if eta is None else f'{eta:.0f} s'}", flush=True)


def _run_ray(settings: dict) -> batch.BatchStatus:
    import ray

    from moelens_jax import batch_ray

    ray.init(address=_RAY_ADDRESS.value, logging_level="WARNING", include_dashboard=False)
    try:
        print(common.table([("model", _MODEL.value), ("input", _INPUT.value),
                            ("output", _OUTPUT.value), ("cluster", ray.cluster_resources())],
                           "== run_batch (Ray) card =="), flush=True)
        return batch_ray.run_batch_ray(
            {"path_or_preset": _MODEL.value, "dtype": _DTYPE.value, "seed": _SEED.value},
            _INPUT.value, _OUTPUT.value, settings=settings, replicas=_REPLICAS.value,
            chunk=_CHUNK.value, hardware=_HARDWARE.value,
            replica_cpus=_REPLICA_CPUS.value, on_status=_show)
    finally:
        ray.shutdown()


def main(argv):
    del argv
    flag_values = common.log_flags(__name__)
    settings = dict(kv_cache_bytes=int(_KV_CACHE_GB.value * 1e9), kv_dtype=_KV_DTYPE.value,
                    token_budget=_TOKEN_BUDGET.value)
    if _RAY.value:
        st = _run_ray(settings)
    else:
        model = mj.load_model(_MODEL.value, dtype=_DTYPE.value, seed=_SEED.value)
        config, source = perf.machine_engine_config(model.config, hardware=_HARDWARE.value,
                                                    **settings)
        print(common.table([("model", repr(model)), ("input", _INPUT.value),
                            ("output", _OUTPUT.value),
                            ("token budget", f"{config.token_budget} ({source})")],
                           "== run_batch card =="), flush=True)
        with Engine(model, config) as engine:
            st = batch.run_batch(model, engine, _INPUT.value, _OUTPUT.value,
                                 chunk=_CHUNK.value, on_status=_show)
    common.print_json({"total_lines": st.total_lines, "skipped": st.skipped, "done": st.done,
                       "errors": st.errors, "generated_tokens": st.generated_tokens,
                       "wall_s": st.elapsed_s,
                       "generated_tokens_per_s": st.generated_tokens_per_s,
                       "driver_lines_per_s": (st.total_lines / st.driver_s
                                              if st.driver_s else None),
                       "ray": _RAY.value, "replicas": _REPLICAS.value,
                       "output": _OUTPUT.value, "flags": flag_values})


if __name__ == "__main__":
    app.run(main)
