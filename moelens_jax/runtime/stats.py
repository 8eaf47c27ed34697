"""What a run measured: per-iteration records (typed), run totals, per-stage times and the
Chrome/Perfetto trace."""

from __future__ import annotations

import contextlib
import dataclasses
import time

from moelens_jax.runtime.layout import IterationShape

STAGES = ("GA", "C", "GB", "IO")


@dataclasses.dataclass(frozen=True)
class IterationRecord:
    """One iteration as it ran: its layout (`shape`, the same value Stage 2 charges), wall
    seconds per stage summed over layers and groups (io_s: waiting for the weight stream), the
    activation bytes its host stages moved between device and host arrays (K, V and decode
    queries out, attention outputs in; what `perf.activation_bytes` charges, which a test ties
    to these counts), and the scheduler's bookkeeping."""

    start_s: float
    wall_s: float
    shape: IterationShape
    ga_s: float
    c_s: float
    gb_s: float
    io_s: float
    pages_used: int
    pages_free: int
    preempted: tuple[int, ...] = ()
    finished: tuple[int, ...] = ()
    act_d2h_bytes: int = 0
    act_h2d_bytes: int = 0

    @property
    def rest_s(self) -> float:
        """Wall time outside the device and host stages (embedding, lm_head, sampling,
        scheduling)."""
        return self.wall_s - self.ga_s - self.gb_s - self.c_s

    def as_dict(self) -> dict:
        """Flat JSON-ready form (the shape's totals instead of its groups)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "shape"}
        s = self.shape
        d.update(prefill_tokens=s.prefill_tokens, decode_tokens=s.decode_tokens,
                 prefill_seqs=s.prefill_seqs, padded_rows=s.padded_rows,
                 tile_pairs=s.tile_pairs, attended_keys=s.attended_keys,
                 logit_rows=s.logit_rows, kv_tokens_read=s.kv_tokens_read,
                 groups=len(s.groups), preempted=list(self.preempted),
                 finished=list(self.finished))
        return d


@dataclasses.dataclass
class RunStats:
    iterations: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    processed_tokens: int = 0  # tokens run through the layers (recomputation included)
    wall_s: float = 0.0
    kv_peak_pages: int = 0
    kv_pages: int = 0
    h2d_bytes: int = 0  # weight bytes streamed host -> device in this run
    host_weight_bytes: int = 0  # host memory of the model's weights (pageable + pinned staging)
    h2d_gb_per_s: float | None = None  # achieved over the link's busy time (engine lifetime)
    mode: str = "serial"  # the pipeline that ran ("serial" or "vslpipe")
    per_iteration: list[IterationRecord] = dataclasses.field(default_factory=list)
    # (stage, layer, group, start_s, dur_s) per stage interval when the engine records them.
    stage_events: list[tuple] = dataclasses.field(default_factory=list)

    def stage_seconds(self) -> dict[str, float]:
        """Total wall seconds per stage over the run (GA, C, GB, IO)."""
        return {k: sum(getattr(it, f"{k.lower()}_s") for it in self.per_iteration)
                for k in STAGES}

    @property
    def kv_peak_fraction(self) -> float:
        return self.kv_peak_pages / max(self.kv_pages, 1)

    @property
    def mean_tokens_per_iteration(self) -> float:
        return self.processed_tokens / max(self.iterations, 1)

    def chrome_trace(self) -> dict:
        """The run as a Chrome/Perfetto trace (open in ui.perfetto.dev or chrome://tracing):
        one slice per iteration plus counters for tokens and KV pages, and, when the engine
        recorded stages, one slice per stage interval on a track per stage and group."""
        tracks = {}
        events = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": 0,
                   "args": {"name": f"iterations ({self.mode})"}}]
        for stage, layer, group, start, dur in self.stage_events:
            key = (stage, group if stage != "IO" else 0)
            if key not in tracks:
                tracks[key] = len(tracks) + 1
                label = stage if stage == "IO" else f"{stage} group {group}"
                events.append({"name": "thread_name", "ph": "M", "pid": 0,
                               "tid": tracks[key], "args": {"name": label}})
            events.append({"name": f"{stage} L{layer}", "ph": "X", "ts": start * 1e6,
                           "dur": dur * 1e6, "pid": 0, "tid": tracks[key],
                           "args": {"layer": layer, "group": group}})
        for i, rec in enumerate(self.per_iteration):
            it = rec.as_dict()
            ts = it["start_s"] * 1e6
            events.append({"name": f"iteration {i}", "ph": "X", "ts": ts,
                           "dur": it["wall_s"] * 1e6, "pid": 0, "tid": 0,
                           "args": {k: v for k, v in it.items()
                                    if k not in ("start_s", "wall_s")}})
            events.append({"name": "tokens", "ph": "C", "ts": ts, "pid": 0,
                           "args": {"prefill": it["prefill_tokens"],
                                    "decode": it["decode_tokens"]}})
            events.append({"name": "kv_pages", "ph": "C", "ts": ts, "pid": 0,
                           "args": {"used": it["pages_used"], "free": it["pages_free"]}})
        return {"traceEvents": events, "displayTimeUnit": "ms"}


class StageClock:
    """Wall time per stage (GA, C, GB, IO) for one iteration, summed, and the activation bytes
    moved; with `keep`, also every interval as (stage, layer, group, start_s, dur_s) for the
    trace."""

    def __init__(self, t0: float, keep: bool):
        self.t0, self.keep = t0, keep
        self.sums = dict.fromkeys(STAGES, 0.0)
        self.events: list[tuple] = []
        self.d2h_bytes = self.h2d_bytes = 0

    def moved(self, d2h: int = 0, h2d: int = 0) -> None:
        """Counts activation bytes moved device -> host and host -> device."""
        self.d2h_bytes += int(d2h)
        self.h2d_bytes += int(h2d)

    @contextlib.contextmanager
    def __call__(self, stage: str, layer: int, group: int):
        start = time.perf_counter()
        try:
            yield
        finally:
            end = time.perf_counter()
            self.sums[stage] += end - start
            if self.keep:
                self.events.append((stage, layer, group, start - self.t0, end - start))
