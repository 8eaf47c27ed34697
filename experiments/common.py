"""Helpers shared by the experiment entry points: flag logging, tables, the final JSON line."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time

from absl import flags, logging


def log_flags(module_name: str) -> dict:
    """Logs every flag defined by `module_name` and returns them as a dict."""
    values = {f.name: f.value for f in flags.FLAGS.get_key_flags_for_module(module_name)}
    for k, v in sorted(values.items()):
        logging.info("flag %s = %r", k, v)
    return values


def machine_fingerprint() -> dict:
    import jax

    from moelens_jax import ops
    info = ops.cpu_info()
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": info["cpu_count"],
            "isa": info["isa"], "jax": jax.__version__, "backend": jax.default_backend(),
            "devices": [str(d) for d in jax.devices()]}


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Seconds of each of `repeats` calls of `fn` (its result waited for with
    `jax.block_until_ready`), after `warmup` untimed calls (compilation)."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def median_time(fn, repeats: int, warmup: int = 1) -> float:
    """Median of `timed`."""
    return float(statistics.median(timed(fn, repeats, warmup)))


def table(rows: list[tuple[str, object]], title: str = "") -> str:
    width = max(len(k) for k, _ in rows)
    lines = [title] if title else []
    lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def print_json(result: dict) -> None:
    """Prints `result` as ONE JSON line (non-finite floats -> null); must be the last output."""
    print(json.dumps(_clean(result), sort_keys=True), flush=True)
