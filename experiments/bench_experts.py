"""Benchmark: the grouped expert FFN against a dense GEMM doing the same routed-row FLOPs.

The ceiling for an expert FFN over m routed rows is a dense SwiGLU over m rows with one
expert's weights (three GEMMs, jitted XLA): the same FLOPs with no grouping at all. For every
case (expert shape x router skew x routed-row count) this times, interleaved in one run, the
dense roof and each expert path over the same rows, and reports medians:

* ``grouped`` — `moe.expert_ffn`'s default (the C++ kernel on the CPU backend: its own GEMMs
  for groups of up to 48 rows, OpenBLAS above);
* ``blocked`` — the accelerators' pure-XLA path (run here on the CPU backend for comparison);
* ``capacity`` — the old CPU path (E x capacity rows), with `--with_capacity`.

With `--weight_dtype int8|int4` the experts are stored quantised (`weights.quantise`) and
``grouped`` reads the codes, dequantising inside its GEMMs; ``grouped_float`` then runs the same
kernel on the dequantised weights (in `--dtype`), and JSON `quantised_speedup_vs_float` (median
and minimum over cases with >= 512 rows of grouped_float time / grouped time) says what reading
8 or 4 bits per weight instead of 16 or 32 buys. The dense roof keeps `--dtype` weights, and the
attainable time counts the stored bytes (codes and scales).

Router skews: ``uniform`` (every row picks an expert uniformly), ``zipf`` (expert e with
probability proportional to 1 / (e + 1)^1.2), ``hot`` (one expert receives every token, i.e.
1/k of the rows, the most a top-k router can send it; the rest uniform). Group sizes are drawn
once per case (seeded) and the rows sorted by expert, as `moe.dispatch` leaves them.

JSON: `expert_roof_fraction` (grouped, minimum over cases with >= 512 routed rows: dense time /
grouped time) and `routed_row_overhead` (grouped, maximum of rows computed / rows routed). The
dense GEMM reads one expert's weights; a grouped call must read every expert that received rows,
so with few rows per expert the weight stream, not the GEMM, bounds it. Each case therefore also
reports the attainable time max(dense time, bytes of the used experts' weights / the machine's
streaming-read bandwidth, measured in the same run), and JSON `expert_attainable_fraction` is
the minimum of attainable / grouped time over cases with >= 512 rows.

    python -m experiments.bench_experts
    python -m experiments.bench_experts --rows 512,4096 --shapes small-mixtral --repeats 3
    python -m experiments.bench_experts --dtype bfloat16 --weight_dtype int8
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from moelens_jax.model import moe
from moelens_jax.model.weights import QuantisedMatrix, quantise
from moelens_jax.ops import experts
from moelens_jax.perf.calibrate import measure_host_bandwidth

# (name, experts E, top-k, hidden h, expert width f): small-mixtral (Mixtral's ratios at 1/8
# width) and a many-expert shape (Qwen3-30B-A3B's E and k, at 1/4 of its width).
SHAPES = {"small-mixtral": (8, 2, 512, 1792), "many-experts": (128, 8, 512, 192)}
SKEWS = ("uniform", "zipf", "hot")

_SHAPES = flags.DEFINE_list("shapes", list(SHAPES), f"Expert shapes from {list(SHAPES)}.")
_ROWS = flags.DEFINE_list("rows", ["64", "512", "2048", "8192"], "Routed-row counts m.")
_SKEWS = flags.DEFINE_list("skews", list(SKEWS), f"Router skews from {list(SKEWS)}.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weight dtype.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed repeats per path (median reported).")
_WITH_CAPACITY = flags.DEFINE_bool("with_capacity", False, "Also time the capacity path.")
_SKIP_BLOCKED = flags.DEFINE_bool("skip_blocked", False, "Skip the accelerator path.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for weights, rows and group sizes.")
_WEIGHT_DTYPE = flags.DEFINE_enum("weight_dtype", None, ["int8", "int4"],
                                  "Store the experts quantised (the kernel reads the codes).")


def group_sizes(skew: str, m: int, num_experts: int, k: int, rng) -> np.ndarray:
    """Rows per expert for m routed rows under `skew` (sums to m)."""
    if skew == "uniform":
        p = np.full(num_experts, 1.0 / num_experts)
    elif skew == "zipf":
        p = 1.0 / np.arange(1, num_experts + 1) ** 1.2
        p /= p.sum()
    elif skew == "hot":
        hot = m // k
        rest = rng.multinomial(m - hot, np.full(num_experts - 1, 1.0 / (num_experts - 1)))
        return np.concatenate([[hot], rest]).astype(np.int32)
    else:
        raise ValueError(f"unknown skew {skew!r}")
    return rng.multinomial(m, p).astype(np.int32)


def stored_bytes(w) -> int:
    """Bytes of one expert's three matrices as stored (codes + scales when quantised)."""
    return sum((a.codes.nbytes + a.scale.nbytes if isinstance(a, QuantisedMatrix) else a.nbytes)
               // a.shape[0] for a in w)


def run_case(name: str, w: list, x, gs: np.ndarray, fns: dict,
             stream_gb_per_s: float, wq: list | None = None) -> dict:
    """Times the dense roof and each path on one case, interleaved; medians. `w`: the experts
    in the model dtype; `wq`: the same experts stored quantised (then what the paths read)."""
    E = w[0].shape[0]
    m = x.shape[0]
    g = jnp.asarray(gs)
    stored = wq or w
    paths = {"grouped": functools.partial(fns["grouped"], *stored, x, g)}
    computed = {"grouped": m}
    if wq:
        paths["grouped_float"] = functools.partial(fns["grouped"], *w, x, g)
        computed["grouped_float"] = m
    if not _SKIP_BLOCKED.value:
        paths["blocked"] = functools.partial(fns["blocked"], *stored, x, g)
        computed["blocked"] = moe.blocked_rows_computed(gs, moe.block_rows(m, E))
    if _WITH_CAPACITY.value:
        cap = moe.capacity_bucket(int(gs.max()))
        cfn = jax.jit(functools.partial(moe.expert_ffn, impl="capacity", capacity=cap))
        paths["capacity"] = functools.partial(cfn, *w, x, g)
        computed["capacity"] = E * cap
    dense = functools.partial(fns["dense"], x, w[0][0], w[1][0], w[2][0])
    t_dense, t_path = [], {p: [] for p in paths}
    for _ in range(_REPEATS.value):  # interleaved: each ratio compares moments-apart times
        t_dense += common.timed(dense, 1)
        for p, fn in paths.items():
            t_path[p] += common.timed(fn, 1)
    flops = 6 * w[0].shape[1] * w[0].shape[2] * m
    td = float(np.median(t_dense))
    weight_bytes = int((gs > 0).sum()) * stored_bytes(stored)
    t_stream = weight_bytes / (stream_gb_per_s * 1e9)
    case = {"shape": name, "rows": m, "max_group": int(gs.max()),
            "dense_gflop_per_s": flops / td / 1e9, "weight_bytes": weight_bytes,
            "attainable_s": max(td, t_stream)}
    for p in paths:
        tp = float(np.median(t_path[p]))
        case[p] = {"seconds": tp, "gflop_per_s": flops / tp / 1e9, "roof_fraction": td / tp,
                   "attainable_fraction": max(td, t_stream) / tp, "row_overhead": computed[p] / m}
    return case


def main(argv):
    del argv
    settings = common.log_flags(__name__)
    dt = jnp.dtype(_DTYPE.value)
    rows = [int(r) for r in _ROWS.value]
    wdt = _WEIGHT_DTYPE.value
    card = [("machine", common.machine_fingerprint()), ("BLAS", experts.blas_info()),
            ("dtype", _DTYPE.value + (f", experts stored {wdt}" if wdt else "")),
            ("routed rows", rows), ("skews", _SKEWS.value)]
    for name in _SHAPES.value:
        E, k, h, f = SHAPES[name]
        per_weight = {"int8": 1, "int4": 0.5}.get(wdt, dt.itemsize)
        card.append((name, f"E={E} top-{k} h={h} f={f}: {6 * h * f / 1e6:.2f} MFLOP per "
                           f"routed row, expert weights {3 * E * h * f * per_weight / 2**20:.0f}"
                           " MiB (codes)"))
    stream = measure_host_bandwidth(1 << 30) / 1e9
    card.append(("ceiling", "dense SwiGLU over the same m rows with one expert's weights "
                            "(jitted XLA), timed interleaved with each path; attainable: "
                            "also >= used experts' weight bytes / streaming read"))
    card.append(("streaming read", f"{stream:.1f} GB/s (C++ probe, same threads)"))
    print(common.table(card, "== bench_experts card =="), flush=True)

    rng = np.random.default_rng(_SEED.value)
    fns = {"grouped": jax.jit(functools.partial(moe.expert_ffn, impl="grouped")),
           "blocked": jax.jit(functools.partial(moe.expert_ffn, impl="blocked")),
           "dense": jax.jit(moe._swiglu)}
    cases = []
    for name in _SHAPES.value:
        E, k, h, f = SHAPES[name]
        w32 = [rng.standard_normal(s).astype(np.float32) * 0.05
               for s in ((E, h, f), (E, h, f), (E, f, h))]
        wq = None
        if wdt:
            wq = [QuantisedMatrix(*map(jnp.asarray, quantise(a, wdt)), wdt, dt.name)
                  for a in w32]
            w = [q.dequantise() for q in wq]
        else:
            w = [jnp.asarray(a, dt) for a in w32]
        for m in rows:
            x = jnp.asarray(rng.standard_normal((m, h)).astype(np.float32))
            for skew in _SKEWS.value:
                case = run_case(name, w, x, group_sizes(skew, m, E, k, rng), fns, stream, wq)
                case["skew"] = skew
                cases.append(case)
                paths = [p for p in ("grouped", "grouped_float", "blocked", "capacity")
                         if p in case]
                print(common.table([(
                    f"{name} m={m:<5} {skew:<7}",
                    f"dense {case['dense_gflop_per_s']:6.1f} GF/s | " + " | ".join(
                        f"{p} {case[p]['gflop_per_s']:6.1f} GF/s "
                        f"({case[p]['roof_fraction']:.2f} roof, "
                        f"{case[p]['attainable_fraction']:.2f} att, "
                        f"{case[p]['row_overhead']:.2f}x rows)" for p in paths))]), flush=True)

    big = [c for c in cases if c["rows"] >= 512]
    result = {
        "expert_roof_fraction": min((c["grouped"]["roof_fraction"] for c in big), default=None),
        "routed_row_overhead": max(c["grouped"]["row_overhead"] for c in cases),
        "expert_attainable_fraction": min((c["grouped"]["attainable_fraction"] for c in big),
                                          default=None),
        "stream_read_gb_per_s": stream,
        "blocked_roof_fraction": (min(c["blocked"]["roof_fraction"] for c in big)
                                  if big and "blocked" in big[0] else None),
        "blocked_row_overhead": (max(c["blocked"]["row_overhead"] for c in big)
                                 if big and "blocked" in big[0] else None),
        "quantised_speedup_vs_float": ({
            "median": float(np.median(speedups)), "min": float(min(speedups))}
            if (speedups := [c["grouped_float"]["seconds"] / c["grouped"]["seconds"]
                             for c in big if "grouped_float" in c]) else None),
        "cases": cases, "flags": settings, "machine": common.machine_fingerprint(),
        "blas": experts.blas_info(),
    }
    print(common.table([
        ("grouped roof fraction", f"{result['expert_roof_fraction']} (min, >= 512 rows)"),
        ("grouped row overhead", f"{result['routed_row_overhead']} (max)"),
        ("grouped attainable", f"{result['expert_attainable_fraction']} (min, >= 512 rows)"),
        ("blocked roof fraction", f"{result['blocked_roof_fraction']} (min, >= 512 rows)"),
        ("blocked row overhead", f"{result['blocked_row_overhead']} (max, >= 512 rows)"),
        ("quantised / float time", f"{result['quantised_speedup_vs_float']} "
                                   "(grouped_float / grouped, >= 512 rows)"),
    ], "== summary =="))
    common.print_json(result)


if __name__ == "__main__":
    app.run(main)
