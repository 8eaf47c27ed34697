"""Batch jobs over many machines: the input as a Ray dataset, one engine per replica.

The same job as `moelens_jax.batch.run_batch` (same input and output formats, error lines,
resume by custom_id, config hash), data parallel: a Ray Data pipeline reads the input in
blocks, an actor pool of `replicas` `EngineReplica`s (each loads the model once and holds an
`Engine`; one accelerator each when the cluster has them) serves the blocks, and this process
appends each returned line to the output and flushes it. Replicas share nothing but the input
and output files, so throughput scales with the replicas until one process's reading and writing
of lines binds (`experiments.run_batch --ray` reports that rate, `driver_lines_per_s`).

Where work runs:
  - this process (the driver) reads the input (twice when it sizes the blocks itself: request
    sizes, then the scan): it numbers the lines, skips those already in the output, marks
    repeated ids, and cuts the rest into blocks of `chunk` lines to serve (byte ranges; a long
    run of done lines ends a block). It never holds the prompts;
  - the read tasks run on the driver's node (a `ray.io/node-id` label selector), so the input
    file need not be on a shared filesystem; they ship each block's lines to the replicas;
  - each replica parses its lines (the model's vocabulary and tokenizer judge them), picks its
    own `EngineConfig` (the token budget from the performance model: this host's cached
    calibration, else the `hardware` preset's datasheet, else the default), and runs them.

Resume: the output file is the checkpoint, as in the single-process job; a run of either kind
resumes the other's output when the model and engine settings hash the same. Ray is an
optional dependency (`pip install -e ".[ray]"`); this module imports it only when called.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable

import numpy as np

from moelens_jax import batch
from moelens_jax.batch import BatchError, BatchStatus


def scan(input_path: str, done: set[str], chunk: int) -> tuple[list[dict], int, int]:
    """The blocks of lines still to serve: dicts with the byte range (`start`, `end`), the
    number of its first line, and the line numbers in it to `skip` (already in the output) or
    mark `dup` (a repeated custom_id). Returns (blocks, non-blank lines, skipped lines)."""
    blocks: list[dict] = []
    seen: set[str] = set()
    total = skipped = 0
    pos = 0
    block = None
    with open(input_path, "rb") as f:
        for n, raw in enumerate(f, 1):  # lines end at b"\n" only, as in batch.read_lines
            start, pos = pos, pos + len(raw)
            if not raw.strip():
                continue
            total += 1
            cid = _custom_id(raw)
            dup = cid is not None and cid in seen
            if cid is not None and not dup:
                seen.add(cid)
            key = cid if cid is not None and not dup else f"line:{n}"
            if key in done:
                skipped += 1
                if block is not None:  # inside a block: read past, but not served
                    block["skip"].append(n)
                    block["end"] = pos
                    if len(block["skip"]) >= chunk:  # a long done run: end the block here
                        blocks.append(block)
                        block = None
                continue
            if block is None:  # blocks open at a line to serve
                block = {"start": start, "end": pos, "first_line": n, "skip": [], "dup": [],
                         "lines": 0}
            block["end"] = pos
            if dup:
                block["dup"].append(n)
            block["lines"] += 1
            if block["lines"] == chunk:
                blocks.append(block)
                block = None
    if block is not None:
        blocks.append(block)
    return blocks, total, skipped


def _custom_id(raw: bytes) -> str | None:
    """The line's custom_id as `parse_line` would take it, or None."""
    try:
        obj = json.loads(batch.decode_line(raw))
    except json.JSONDecodeError:
        return None
    cid = obj.get("custom_id") if isinstance(obj, dict) else None
    return cid if isinstance(cid, str) and cid else None


def read_block(block: dict, path: str) -> list[dict]:
    """The lines of one block to serve: {"line", "text", "dup"} (a Ray Data read task)."""
    with open(path, "rb") as f:
        f.seek(block["start"])
        data = f.read(block["end"] - block["start"])
    skip, dup = set(block["skip"]), set(block["dup"])
    return [{"line": n, "text": batch.decode_line(raw), "dup": n in dup}
            for n, raw in batch.read_lines(io.BytesIO(data), block["first_line"])
            if n not in skip]


def _default_chunk(model_spec: dict, settings: dict, input_path: str, done: int,
                   replicas: int) -> int:
    """`batch.default_chunk` from the model's config (no weights loaded), the input's request
    sizes and the lines left (about: `done` of them are already in the output);
    `batch.CHUNK_MIN` when the shape or the KV size is unknown here."""
    from moelens_jax.config import ConfigError, resolve_config

    try:
        cfg = resolve_config(model_spec["path_or_preset"])
    except (ConfigError, OSError, ValueError):
        return batch.CHUNK_MIN
    kv_bytes = settings.get("kv_cache_bytes")
    if not kv_bytes:
        return batch.CHUNK_MIN
    kv_dtype = settings.get("kv_dtype") or model_spec.get("dtype")
    lines, tokens_per_request = batch.input_sizes(input_path)
    return batch.default_chunk(cfg, kv_bytes, kv_dtype, tokens_per_request,
                               max(lines - done, 1), replicas)


class EngineReplica:
    """One model and one `Engine`, serving batches of input lines (a Ray Data actor)."""

    def __init__(self, model_spec: dict, settings: dict, hardware: str | None = None,
                 threads: int | None = None):
        import moelens_jax as mj
        from moelens_jax import _cpu_ops, perf
        from moelens_jax.runtime import Engine

        if threads:  # the CPU attention / expert pool, to the CPUs Ray reserved for it
            _cpu_ops.set_num_threads(threads)
        self.model = mj.load_model(**model_spec)
        config, self.budget_source = perf.machine_engine_config(
            self.model.config, hardware=hardware, **settings)
        self.engine = Engine(self.model, config)
        self.config = batch.config_hash(self.model, self.engine)

    def __call__(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = []
        for n, text, dup in zip(rows["line"], rows["text"], rows["dup"], strict=True):
            item = batch.parse_line(str(text), int(n), self.model)
            items.append(batch.duplicate_item(int(n), item.custom_id) if dup else item)
        recs: list[dict] = []
        batch.serve(self.model, self.engine, items, self.config, recs.append)
        return {"record": np.array([json.dumps(r) for r in recs], dtype=object),
                "error": np.array([r["error"] is not None for r in recs], dtype=bool),
                "tokens": np.array([batch.completion_tokens(r) for r in recs], dtype=np.int64),
                "config": np.array([self.config] * len(recs), dtype=object)}


def run_batch_ray(model_spec: dict, input_path: str, output_path: str, *,
                  settings: dict | None = None, replicas: int | None = None,
                  chunk: int | None = None, hardware: str | None = None,
                  replica_cpus: float | None = None, replica_gpus: float | None = None,
                  on_status: Callable[[BatchStatus], None] | None = None) -> BatchStatus:
    """Runs every input line not yet in `output_path` on `replicas` engines of a Ray cluster
    (the one `ray.init()` connects to; a local one when none is running) and returns the
    status.

    Args:
      model_spec: keyword arguments of `moelens_jax.load_model` (each replica loads it).
      settings: `EngineConfig` fields for every replica (kv_cache_bytes, kv_dtype, token_budget
        to fix the budget, ...).
      replicas: engines to run; default: the cluster's GPUs, or 1 when it has none.
      chunk: lines per block, which is what a replica hands its engine at once (default:
        `batch.default_chunk` for the model's shape and `settings`' KV cache).
      hardware: a `perf` hardware preset for replicas on hosts without a cached calibration.
      replica_cpus: Ray CPUs reserved per replica, and then also the threads of its CPU
        attention and expert pool (default: reserve 1, and the pool keeps one thread per core
        of its host: right for one replica per host; with several replicas on a host, give
        each its share of the cores).
      replica_gpus: Ray GPUs per replica (default: 1 when the cluster has GPUs, else 0).

    Raises:
      BatchError: the output holds lines of another configuration (nothing is written), or a
        broken line before its last.
    """
    import ray
    import ray.data

    if not ray.is_initialized():
        ray.init(logging_level="WARNING", include_dashboard=False)
    t0 = time.perf_counter()
    done, found = batch.read_done(output_path)
    gpus = ray.cluster_resources().get("GPU", 0)
    replica_gpus = (1.0 if gpus else 0.0) if replica_gpus is None else replica_gpus
    replicas = replicas or max(1, int(gpus))
    chunk = chunk or _default_chunk(model_spec, settings or {}, input_path, len(done),
                                    replicas)
    blocks, total, skipped = scan(input_path, done, chunk)
    status = BatchStatus(total_lines=total, skipped=skipped,
                         driver_s=time.perf_counter() - t0)
    if not blocks:
        batch.Output(output_path, status, on_status, t0=t0).close()  # (the status file)
        return status
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the status line and file report progress
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}  # the driver's node
    ds = (ray.data.from_items(blocks, override_num_blocks=len(blocks))
          .flat_map(read_block, fn_kwargs={"path": input_path}, num_cpus=0,
                    label_selector=here)
          .map_batches(EngineReplica, batch_size=chunk, batch_format="numpy",
                       fn_constructor_kwargs={"model_spec": model_spec,
                                              "settings": settings or {},
                                              "hardware": hardware,
                                              "threads": int(replica_cpus or 0)},
                       # one block at a time per replica: blocks go to the replica free
                       # first (what perf.predict_data_parallel assumes)
                       compute=ray.data.ActorPoolStrategy(size=replicas,
                                                          max_tasks_in_flight_per_actor=1),
                       num_cpus=replica_cpus or 1.0, num_gpus=replica_gpus))
    out = None
    try:
        for part in ds.iter_batches(batch_size=None, batch_format="numpy"):
            t1 = time.perf_counter()
            for config in set(part["config"]):
                batch.check_config(output_path, found, config)
                found = config  # every replica must hash the same as the first
            if out is None:
                out = batch.Output(output_path, status, on_status, t0=t0)
            for line, err, tokens in zip(part["record"], part["error"], part["tokens"],
                                         strict=True):
                out.write(str(line), bool(err), int(tokens))
            out.report()
            status.driver_s += time.perf_counter() - t1
    finally:
        if out is not None:
            out.close()
    if out is None:
        raise BatchError("the replicas returned no lines")  # cannot happen with blocks left
    return status
