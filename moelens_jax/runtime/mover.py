"""The weight mover: streams each layer's contiguous host buffer to the device on its own thread.

Each decoder layer lives in one contiguous host buffer (`Model.host_layers[i].buffer`); the
mover copies it in packets of `packet_bytes` (64 MiB by default) into a device window of
`depth` layers (double buffering at 2) while earlier layers compute, and unpacks the packets on
the device into typed weights (slices + bitcasts, jitted). Embedding, final norm and lm_head
stay resident. Packets matter on an accelerator: host-to-device copies share one queue, and a
whole-layer copy (2.9 GB for Mixtral 8x7B, ~60 ms at PCIe 4) would hold back the engine's small
latency-critical copies (a group's q/k/v to the host, attention outputs back); each packet is
waited for before the next is issued, so those copies queue behind one packet at most.

A mover can keep the first `kept_bytes` of every layer on the device for the whole run and
stream only the rest (MoE-Lightning's partial residency r_w: attention and router come first
in a layer's buffer, then the experts).

For research on small machines the mover takes a link-bandwidth cap (`h2d_limit_gb_per_s`,
enforced as a token bucket after each packet) so a CPU box can be put in the regime of a GPU
behind PCIe. Where the backend offers a `pinned_host` memory kind and the device is not the
CPU itself, the packets are staged there once per model (`Model.staged_layers`, shared by
every mover on the model) so every transfer starts from pinned memory.

On the CPU backend the "device" is host memory, so by default (`resident=None`: a CPU device
and no cap) nothing streams: every layer's typed weights are zero-copy views of its host buffer,
made once, and `get` returns them. Streaming there would only spend a core and memory bandwidth
re-copying every layer each iteration (measured on a 2-core AVX2 box: 12-34 ms per 91 MB
small-mixtral layer, on the cores the GEMMs need). Give a cap (or `resident=False`) to emulate a
PCIe link: then each layer is copied and unpacked like on an accelerator.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import jax
import numpy as np

from moelens_jax.model.model import Model
from moelens_jax.model.weights import (
    EXPERT_FIELDS,
    LayerLayout,
    LayerWeights,
    packet_bounds,
    packets,
    unpack_packets,
)

PACKET_BYTES = 64 << 20  # bytes per host-to-device weight copy


def streamed_layers_held(depth: int, num_layers: int) -> int:
    """Layers a streaming mover holds on the device at its peak: the window of `depth`, plus
    the layer in flight (its packets until they are unpacked), at most every layer."""
    return min(depth + 1, num_layers)


def typed_layer_bytes(model, fused_experts: bool = False) -> int | None:
    """Bytes of one layer unpacked in the model dtype when its stored layout is quantised
    (else None: stored and unpacked sizes agree); with `fused_experts`
    (`experts_stay_quantised`) the routed experts stay at their stored size."""
    stored = model.host_layers[0].layout
    if not stored.quantised:
        return None
    typed = LayerLayout.for_config(model.config, model.dtype)
    if not fused_experts:
        return typed.nbytes

    def experts(layout):
        return sum(s.nbytes for s in layout.slots if s.name.split(".")[0] in EXPERT_FIELDS)

    return typed.nbytes - experts(typed) + experts(stored)


def layer_window_bytes(layer_bytes: int, num_layers: int, depth: int, kept_bytes: int = 0,
                       typed_bytes: int | None = None) -> int:
    """Device bytes a streaming mover holds at its peak: the kept prefix of every layer and
    the streamed rest of `streamed_layers_held(depth, num_layers)` layers. For a quantised
    layout (`typed_bytes`: the layer as unpacked, `typed_layer_bytes`) the window holds the
    dequantised layers, and the layer in flight its stored packets as well."""
    held = streamed_layers_held(depth, num_layers)
    if typed_bytes is None:
        return num_layers * kept_bytes + held * (layer_bytes - kept_bytes)
    return num_layers * kept_bytes + held * typed_bytes + (layer_bytes - kept_bytes)


def unpack_layer(layout: LayerLayout, buf_u8: jax.Array) -> LayerWeights:
    """Typed `LayerWeights` from a layer's whole raw uint8 buffer."""
    return unpack_packets(layout, (0,), (buf_u8,))


def experts_stay_quantised(device) -> bool:
    """Whether a quantised layer's routed experts reach `device`'s forward as codes + scales
    (`weights.QuantisedMatrix`), dequantised inside the expert GEMMs, rather than dequantised
    when the layer is unpacked: where the expert kernel does that, the CPU backend's."""
    return device.platform == "cpu"


class WeightMover:
    """Keeps a window of `depth` layers on the device, prefetching on a background thread.

    Args:
      model: its `host_layers` are the source buffers.
      depth: layers resident on the device at once (>= 1; 2 = double buffering).
      h2d_limit_gb_per_s: optional cap on the achieved host-to-device rate (GB = 1e9 bytes).
      device: target device (default: the default device).
      resident: keep every layer on the device as zero-copy views instead of streaming; only
        possible where the device is the host CPU. Default: there, when no cap is given.
      packet_bytes: bytes per host-to-device copy.
      pinned: stage the packets in pinned host memory (`Model.staged_layers`). Default: where
        the device is not the CPU and offers it.
      kept_bytes: bytes at the start of every layer's buffer (attention, router, then the
        experts, in `LAYER_FIELDS` order) placed on the device once and kept for the whole
        run; only the rest streams each pass (MoE-Lightning's partial weight residency r_w).
    """

    def __init__(self, model: Model, depth: int = 2, h2d_limit_gb_per_s: float | None = None,
                 device=None, resident: bool | None = None, packet_bytes: int = PACKET_BYTES,
                 pinned: bool | None = None, kept_bytes: int = 0):
        if depth < 1:
            raise ValueError(f"device_weight_layers must be >= 1, got {depth}")
        if h2d_limit_gb_per_s is not None and h2d_limit_gb_per_s <= 0:
            raise ValueError("h2d_limit_gb_per_s must be positive")
        if packet_bytes < 1:
            raise ValueError(f"packet_bytes must be >= 1, got {packet_bytes}")
        self.model = model
        self.num_layers = len(model.host_layers)
        self.depth = min(depth, self.num_layers)
        self.limit = h2d_limit_gb_per_s
        self.device = device or jax.devices()[0]
        self.layout = model.host_layers[0].layout
        self.layer_bytes = self.layout.nbytes
        if not 0 <= kept_bytes < self.layer_bytes:
            raise ValueError(f"kept_bytes must lie in [0, {self.layer_bytes}) (one layer), "
                             f"got {kept_bytes}")
        on_host = self.device.platform == "cpu"
        self.fused_experts = experts_stay_quantised(self.device)
        if resident and not on_host:
            raise ValueError(f"resident weights need the CPU device, not {self.device}")
        if resident and self.layout.quantised:
            raise ValueError("a quantised model's layers are dequantised as they stream; they "
                             "cannot be used in place (resident)")
        self.resident = ((on_host and h2d_limit_gb_per_s is None and not self.layout.quantised)
                         if resident is None else resident)
        if not model.pageable and (self.resident or pinned is False):
            model.require_pageable("a weight mover without pinned staging")
        if self.resident:
            self.depth = self.num_layers
            self._resident = [jax.tree.map(lambda a: jax.device_put(a, self.device), l.weights)
                              for l in model.host_layers]
        kinds = {m.kind for m in self.device.addressable_memories()}
        if pinned is None:
            pinned = (not on_host and "pinned_host" in kinds) or not model.pageable
        self.pinned, self.packet_bytes = pinned, packet_bytes
        self.kept_bytes = 0 if self.resident else kept_bytes
        self.bounds = packet_bounds(self.layer_bytes, packet_bytes, self.kept_bytes)
        if pinned:
            self._src = model.staged_layers(self.device, packet_bytes, self.kept_bytes)
            self._dst = jax.sharding.SingleDeviceSharding(self.device, memory_kind="device")
        else:
            self._src = [packets(l.buffer, packet_bytes, self.kept_bytes)
                         for l in model.host_layers]
            self._dst = self.device
        # The kept prefix of every layer: placed once (a load, not part of any pass).
        self._kept = [(jax.device_put(src[0], self._dst),) if self.kept_bytes else ()
                      for src in self._src]
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="weight-mover")
        self._window: dict[int, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self._next_free = 0.0  # token bucket: earliest time the link is free again
        self.bytes_moved = 0
        self.transfers = 0  # host-to-device copies issued (packets)
        self.copy_s = 0.0  # time spent copying
        self.unpack_s = 0.0  # time spent unpacking (and dequantising) the copied layers
        self.link_s = 0.0  # time the (possibly capped) link was busy: copy + throttle

    def _copy(self, layer: int, after=None) -> LayerWeights:
        if after is not None:  # the slot's previous layer is still in use until `after` is ready
            jax.block_until_ready(after)
        copied = list(self._kept[layer])
        streamed = self._src[layer][len(copied):]
        for src in streamed:  # one packet in flight at a time (module docstring)
            t0 = time.perf_counter()
            buf = jax.device_put(src, self._dst)
            buf.block_until_ready()
            t1 = time.perf_counter()
            end = t1
            if self.limit:
                start = max(t0, self._next_free)
                end = max(t1, start + src.nbytes / (self.limit * 1e9))
                self._next_free = end
                if end > t1:
                    time.sleep(end - t1)
            copied.append(buf)
            with self._lock:
                self.bytes_moved += src.nbytes
                self.transfers += 1
                self.copy_s += t1 - t0
                self.link_s += end - t0
        t0 = time.perf_counter()
        weights = jax.block_until_ready(unpack_packets(self.layout, self.bounds, tuple(copied),
                                                       self.fused_experts))
        with self._lock:
            self.unpack_s += time.perf_counter() - t0
        return weights

    def prefetch(self, layer: int, after=None) -> None:
        """Starts copying `layer` (mod num_layers) unless it is resident or in flight; with
        `after` (arrays), the copy first waits until they are computed (the buffer it
        replaces is in use until then)."""
        layer %= self.num_layers
        if self.resident:
            return
        if layer not in self._window:
            self._window[layer] = self._pool.submit(self._copy, layer, after)

    def get(self, layer: int, prefetch: bool = True) -> LayerWeights:
        """Layer `layer`'s device weights. Drops layers outside the window [layer, layer+depth)
        and, with `prefetch`, starts copying the next depth-1 layers (wrapping); without it
        the caller starts them later with `prefetch_ahead`."""
        if self.resident:
            return self._resident[layer % self.num_layers]
        ahead = [(layer + i) % self.num_layers for i in range(self.depth)]
        for stale in [l for l in self._window if l not in ahead]:
            del self._window[stale]  # outside the window: free its device buffer
        self.prefetch(layer)
        if prefetch:
            self.prefetch_ahead(layer)
        return self._window[layer].result()

    def prefetch_ahead(self, layer: int, after=None) -> None:
        """Prefetches layers layer+1 .. layer+depth-1 (see `prefetch` for `after`)."""
        for i in range(1, self.depth):
            self.prefetch(layer + i, after)

    @property
    def h2d_gb_per_s(self) -> float | None:
        """Achieved host-to-device rate over the link's busy time (throttling included)."""
        return self.bytes_moved / self.link_s / 1e9 if self.link_s else None

    def device_bytes(self) -> int:
        """Device bytes of the layers at peak: every layer when resident, else the kept
        prefix of every layer and the rest of `streamed_layers_held` layers."""
        if self.resident:
            return self.num_layers * self.layer_bytes
        return layer_window_bytes(self.layer_bytes, self.num_layers, self.depth,
                                  self.kept_bytes,
                                  typed_layer_bytes(self.model, self.fused_experts))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._window.clear()

    def __del__(self):
        try:
            self._pool.shutdown(wait=False)
        except Exception:  # interpreter shutdown
            pass


def resident_bytes(model: Model) -> int:
    """Device bytes of the always-resident weights (embedding, final norm, lm_head)."""
    w = model.weights
    arrays = [w.embed, w.final_norm] + ([] if w.lm_head is None else [w.lm_head])
    return int(sum(np.asarray(a).nbytes for a in arrays))
