"""Weight containers and the per-layer contiguous host layout.

Weights are data, the forward pass is functions (see `transformer.py`): `LayerWeights` and
`ModelWeights` are `flax.struct` pytrees, so a tree can hold numpy views (host), device arrays,
or `jax.ShapeDtypeStruct` (abstract, zero memory) and the same functions run on any of them.
Offload is a property of where a tree lives, not hidden module state.

Host layout (what the weight mover streams): each decoder layer lives in ONE contiguous,
64-byte-aligned `uint8` buffer; `HostLayer.weights` is a `LayerWeights` of numpy views into it.
Tensors are packed in `LAYER_FIELDS` order, each at an offset rounded up to `ALIGN` bytes, in the
model's storage dtype. Matrices use the `x @ W` convention (``[in, out]``; HF stores
``[out, in]``); routed experts are stacked on a leading expert axis. Embedding, final norm and
lm_head are separate arrays (`ModelWeights.embed`, `.final_norm`, `.lm_head`), lm_head stored
``[vocab, hidden]`` like the embedding so tied and untied models share one code path.

Quantised layers (`LayerLayout.weight_dtype`): the matrices of `QUANTISED_FIELDS` (attention
projections, routed and shared experts; not the router, norms or biases) are stored as

  * "int8": int8 codes [..., in, out] with a float32 scale per output channel (slot
    "<name>.scale", [..., out]): about half the bytes of bf16;
  * "int4": 4-bit codes in [-7, 7], two per byte along the input axis ([..., in/2, out]: byte
    j holds rows 2j (low nibble) and 2j+1 (high nibble)), with a float32 scale per output
    channel and group of `int4_group(in)` input rows (128 where it divides in; slot
    "<name>.scale", [..., in/group, out]): about a quarter of bf16 plus the scales.

Scales are symmetric: max |w| of the channel (group) / 127 (/ 7). `unpack_packets` dequantises
on the device right after the copy (codes * scale in float32, rounded once to the model dtype),
except where the expert kernel dequantises inside its GEMMs (the CPU backend: the weight mover
asks for `keep_experts_quantised`, and the routed experts arrive as `QuantisedMatrix`);
`HostLayer.weights` holds None for these fields (`dequantised_numpy` gives them on the host,
bit-equal to the device).

Shapes (h hidden, q = n_q*head_dim, kv = n_kv*head_dim, E experts, f expert width, fs shared
expert width, d head_dim):

    attn_norm [h]   wq [h,q]  wk [h,kv]  wv [h,kv]  wo [q,h]
    bq [q] bk [kv] bv [kv]          (qkv_bias only)
    q_norm [d] k_norm [d]           (qk_norm only)
    ffn_norm [h]    router [h,E]
    w_gate [E,h,f]  w_up [E,h,f]  w_down [E,f,h]
    shared_gate [h,fs] shared_up [h,fs] shared_down [fs,h] shared_expert_gate [h,1]
                                    (shared expert only)
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import struct

from moelens_jax.config import ModelConfig

ALIGN = 64  # bytes; every tensor of a layer buffer starts on a cache line / AVX-512 boundary

NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
             "float16": np.dtype(np.float16)}

# Field order in the layer buffer (also the order of LayerWeights' fields).
LAYER_FIELDS = ("attn_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "q_norm", "k_norm",
                "ffn_norm", "router", "w_gate", "w_up", "w_down", "shared_gate", "shared_up",
                "shared_down", "shared_expert_gate")

# Matrices a quantised layout stores in 8 or 4 bits (`WEIGHT_DTYPES`); everything else (norms,
# biases, router, the shared expert's scalar gate) keeps the model dtype.
QUANTISED_FIELDS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "shared_gate",
                    "shared_up", "shared_down")
WEIGHT_DTYPES = ("int8", "int4")  # quantised weight formats (None: the model dtype)
INT4_GROUP = 128  # input rows per int4 scale (or the largest power of two below that divides)
INT4_MIN_GROUP = 32  # fewer rows per scale would spend more bytes on scales than int4 saves

# Fields initialised to ones (norm scales); everything else is N(0, init_std).
NORM_FIELDS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "final_norm")


@struct.dataclass
class LayerWeights:
    """One decoder layer. Optional fields are None when the family lacks them."""

    attn_norm: Any
    wq: Any
    wk: Any
    wv: Any
    wo: Any
    bq: Any
    bk: Any
    bv: Any
    q_norm: Any
    k_norm: Any
    ffn_norm: Any
    router: Any
    w_gate: Any
    w_up: Any
    w_down: Any
    shared_gate: Any
    shared_up: Any
    shared_down: Any
    shared_expert_gate: Any


@struct.dataclass
class ModelWeights:
    embed: Any  # [V, h]
    layers: tuple  # tuple[LayerWeights, ...]
    final_norm: Any  # [h]
    lm_head: Any  # [V, h], or None when tied to `embed`


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of the tensors present in one layer of `cfg`, in buffer order."""
    h, q, kv = cfg.hidden_size, cfg.q_size, cfg.kv_size
    E, f = cfg.num_experts, cfg.intermediate_size
    shapes = {"attn_norm": (h,), "wq": (h, q), "wk": (h, kv), "wv": (h, kv), "wo": (q, h)}
    if cfg.qkv_bias:
        shapes.update(bq=(q,), bk=(kv,), bv=(kv,))
    if cfg.qk_norm:
        shapes.update(q_norm=(cfg.head_dim,), k_norm=(cfg.head_dim,))
    shapes.update(ffn_norm=(h,), router=(h, E), w_gate=(E, h, f), w_up=(E, h, f),
                  w_down=(E, f, h))
    fs = cfg.shared_expert_intermediate_size
    if fs:
        shapes.update(shared_gate=(h, fs), shared_up=(h, fs), shared_down=(fs, h),
                      shared_expert_gate=(h, 1))
    return shapes


@dataclasses.dataclass(frozen=True)
class TensorSlot:
    name: str  # a LayerWeights field, or "<field>.scale" in a quantised layout
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the layer buffer
    nbytes: int
    dtype: str  # storage dtype of this slot


@dataclasses.dataclass(frozen=True)
class LayerLayout:
    """Where each tensor of a layer sits in its contiguous host buffer."""

    dtype: str  # the model dtype (what unpacking yields for every field)
    slots: tuple[TensorSlot, ...]
    nbytes: int  # total buffer size, padding included
    weight_dtype: str | None = None  # "int8" / "int4": QUANTISED_FIELDS stored quantised

    @classmethod
    def for_config(cls, cfg: ModelConfig, dtype: str | None = None,
                   weight_dtype: str | None = None) -> LayerLayout:
        return cls.for_shapes(layer_shapes(cfg), dtype or cfg.dtype, weight_dtype)

    @classmethod
    def for_shapes(cls, shapes: dict[str, tuple[int, ...]], dtype: str,
                   weight_dtype: str | None = None) -> LayerLayout:
        """The layout of tensors `shapes` (in buffer order) in `dtype`, with QUANTISED_FIELDS
        in `weight_dtype` (and their scales) when given."""
        if weight_dtype is not None and weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES} or None, got "
                             f"{weight_dtype!r}")
        slots, offset = [], 0
        for name, shape in shapes.items():
            pairs = ([(name, stored_shape(shape, weight_dtype), weight_dtype),
                      (name + ".scale", scale_shape(shape, weight_dtype), "float32")]
                     if weight_dtype is not None and name in QUANTISED_FIELDS
                     else [(name, shape, dtype)])
            for n, sh, dt in pairs:
                offset = -(-offset // ALIGN) * ALIGN
                nbytes = int(np.prod(sh)) * _np_dtype(dt).itemsize
                slots.append(TensorSlot(n, sh, offset, nbytes, dt))
                offset += nbytes
        return cls(dtype, tuple(slots), -(-offset // ALIGN) * ALIGN, weight_dtype)

    @property
    def quantised(self) -> bool:
        return self.weight_dtype is not None


def _np_dtype(name: str) -> np.dtype:
    return np.dtype(np.int8) if name in WEIGHT_DTYPES else NP_DTYPES[name]


def int4_group(rows: int) -> int:
    """Input rows per int4 scale for a matrix with `rows` input rows: INT4_GROUP, or the
    largest power of two below it that divides `rows`.

    Raises:
      ValueError: no power of two >= INT4_MIN_GROUP divides `rows`.
    """
    g = INT4_GROUP
    while rows % g and g > INT4_MIN_GROUP:
        g //= 2
    if rows % g:
        raise ValueError(f"int4 groups input rows by {INT4_MIN_GROUP}-{INT4_GROUP}; a matrix "
                         f"with {rows} input rows has no such group (use int8)")
    return g


def stored_shape(shape: tuple[int, ...], weight_dtype: str) -> tuple[int, ...]:
    """Shape of the stored codes of a [..., in, out] matrix."""
    if weight_dtype == "int4":
        int4_group(shape[-2])  # (validates the row count: a multiple of 32, so even)
        return shape[:-2] + (shape[-2] // 2, shape[-1])
    return shape


def scale_shape(shape: tuple[int, ...], weight_dtype: str) -> tuple[int, ...]:
    """Shape of the scales of a [..., in, out] matrix: one per output channel (int8), or per
    output channel and group of input rows (int4)."""
    if weight_dtype == "int4":
        return shape[:-2] + (shape[-2] // int4_group(shape[-2]), shape[-1])
    return shape[:-2] + shape[-1:]


def quantise(w: np.ndarray, weight_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantisation of `w` [..., in, out]: (stored codes, float32 scales) as
    `stored_shape` / `scale_shape` give them. Scale = max |w| / 127 over each output channel
    (int8) or / 7 over each group of input rows of each channel (int4), 1 where that is 0;
    codes = round-to-nearest-even(w / scale), so |w - code * scale| <= scale / 2."""
    w = np.asarray(w, dtype=np.float32)
    if weight_dtype == "int8":
        amax = np.abs(w).max(axis=-2)
        scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
        return np.clip(np.rint(w / scale[..., None, :]), -127, 127).astype(np.int8), scale
    if weight_dtype != "int4":
        raise ValueError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    *lead, rows, cols = w.shape
    g = int4_group(rows)  # (validates the row count: a multiple of 32)
    grouped = w.reshape(*lead, rows // g, g, cols)
    amax = np.abs(grouped).max(axis=-2)
    scale = np.where(amax > 0, amax / 7.0, 1.0).astype(np.float32)
    codes = np.clip(np.rint(grouped / scale[..., None, :]), -7, 7).astype(np.int8)
    codes = codes.reshape(*lead, rows // 2, 2, cols)
    packed = (codes[..., 0, :] & 0x0F) | (codes[..., 1, :] << 4)
    return packed.astype(np.int8), scale


def dequantise(xp, stored, scale, dtype, weight_dtype: str = "int8"):
    """The matrix from its codes and scales (`quantise`), computed in float32 and rounded
    once to `dtype`: the same bits in numpy and jax.numpy."""
    if weight_dtype == "int8":
        return (stored.astype(xp.float32) * scale[..., None, :]).astype(dtype)
    lo = xp.right_shift(xp.left_shift(stored, 4), 4)  # arithmetic shifts: sign-extended
    hi = xp.right_shift(stored, 4)
    *lead, half, cols = stored.shape
    codes = xp.stack([lo, hi], axis=-2).reshape(*lead, 2 * half, cols)
    groups = scale.shape[-2]
    w = codes.astype(xp.float32).reshape(*lead, groups, 2 * half // groups, cols)
    return (w * scale[..., None, :]).reshape(*lead, 2 * half, cols).astype(dtype)


# The routed experts' matrices: on a backend whose expert kernel dequantises inside its GEMMs
# (the CPU backend's `ops.experts`), `unpack_packets(..., keep_experts_quantised=True)` hands
# them over as `QuantisedMatrix` (codes + scales) instead of dequantised copies.
EXPERT_FIELDS = ("w_gate", "w_up", "w_down")


@struct.dataclass
class QuantisedMatrix:
    """A stored quantised matrix [..., in, out] (`quantise`): int8 codes ([..., in/2, out] for
    int4) and float32 scales, with the format and the model dtype its values round to."""

    codes: Any
    scale: Any
    weight_dtype: str = struct.field(pytree_node=False)
    dtype: str = struct.field(pytree_node=False)

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantised matrix's shape."""
        *lead, rows, cols = self.codes.shape
        return (*lead, rows * (2 if self.weight_dtype == "int4" else 1), cols)

    def __getitem__(self, i) -> QuantisedMatrix:
        """The matrices at index `i` of the leading axis (one expert: `w[e]`)."""
        return self.replace(codes=self.codes[i], scale=self.scale[i])

    def dequantise(self, xp=jnp):
        """The matrix in the model dtype (`dequantise`: the same bits as unpacking)."""
        return dequantise(xp, self.codes, self.scale, NP_DTYPES[self.dtype], self.weight_dtype)


def _aligned_empty(nbytes: int) -> np.ndarray:
    """A zero-initialised uint8 buffer whose data pointer is ALIGN-byte aligned."""
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]


@dataclasses.dataclass
class HostLayer:
    """One layer's weights in one contiguous host buffer, plus typed views into it."""

    layout: LayerLayout
    buffer: np.ndarray  # uint8 [layout.nbytes], ALIGN-aligned
    weights: LayerWeights  # numpy views into `buffer`

    @classmethod
    def allocate(cls, layout: LayerLayout) -> HostLayer:
        buffer = _aligned_empty(layout.nbytes)
        views: dict[str, Any] = dict.fromkeys(LAYER_FIELDS)
        for s in layout.slots:
            if s.name in views and not (layout.quantised and s.name in QUANTISED_FIELDS):
                views[s.name] = cls._view(buffer, s)
        return cls(layout, buffer, LayerWeights(**views))

    @staticmethod
    def _view(buffer: np.ndarray, s: TensorSlot) -> np.ndarray:
        return buffer[s.offset:s.offset + s.nbytes].view(_np_dtype(s.dtype)).reshape(s.shape)

    def slot(self, name: str) -> np.ndarray:
        """The raw stored array of slot `name` (int8 codes or a scale in a quantised layout)."""
        return self._view(self.buffer, next(s for s in self.layout.slots if s.name == name))

    def quantise(self, weight_dtype: str) -> HostLayer:
        """This (float) layer in a `weight_dtype` layout: the matrices quantised, the rest
        copied."""
        if self.layout.quantised:
            raise ValueError(f"layer is already quantised ({self.layout.weight_dtype})")
        shapes = {s.name: s.shape for s in self.layout.slots}
        out = HostLayer.allocate(LayerLayout.for_shapes(shapes, self.layout.dtype, weight_dtype))
        for name in shapes:
            src = getattr(self.weights, name)
            if name in QUANTISED_FIELDS:
                q, scale = quantise(src, weight_dtype)
                out.slot(name)[...] = q
                out.slot(name + ".scale")[...] = scale
            else:
                getattr(out.weights, name)[...] = src
        return out

    def dequantised_numpy(self) -> LayerWeights:
        """The typed float weights on the host (for a quantised layer: dequantised copies,
        bit-equal to what `unpack_packets` gives on a device)."""
        if not self.layout.quantised:
            return self.weights
        dt = NP_DTYPES[self.layout.dtype]
        return self.weights.replace(**{
            s.name: dequantise(np, self.slot(s.name), self.slot(s.name + ".scale"), dt,
                               self.layout.weight_dtype)
            for s in self.layout.slots if s.name in QUANTISED_FIELDS})


def abstract_weights(cfg: ModelConfig, dtype: str | None = None) -> ModelWeights:
    """`ModelWeights` of `jax.ShapeDtypeStruct` leaves: the full shape, zero memory."""
    dt = NP_DTYPES[dtype or cfg.dtype]
    sds = lambda shape: jax.ShapeDtypeStruct(shape, dt)  # noqa: E731
    layer = dict.fromkeys(LAYER_FIELDS)
    layer.update({k: sds(s) for k, s in layer_shapes(cfg).items()})
    layers = tuple(LayerWeights(**layer) for _ in range(cfg.num_layers))
    V, h = cfg.vocab_size, cfg.hidden_size
    return ModelWeights(embed=sds((V, h)), layers=layers, final_norm=sds((h,)),
                        lm_head=None if cfg.tie_word_embeddings else sds((V, h)))


def weights_nbytes(weights: ModelWeights) -> int:
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(weights))


def _numpy_normal(out: np.ndarray, key: tuple[int, ...], std: float) -> None:
    """Fills `out` with N(0, std) from numpy's stream `key`, in chunks (peak extra memory
    64 MiB, not a full float32 copy)."""
    rng = np.random.default_rng(key)
    flat = out.reshape(-1)
    chunk = 1 << 24
    for i in range(0, flat.size, chunk):
        n = min(chunk, flat.size - i)
        flat[i:i + n] = (rng.standard_normal(n, dtype=np.float32) * std).astype(out.dtype)


def random_init(cfg: ModelConfig, seed: int = 0, dtype: str | None = None,
                init_std: float = 0.02, normal=_numpy_normal
                ) -> tuple[list[HostLayer], dict[str, np.ndarray]]:
    """Random weights (N(0, init_std), norm scales = 1) written straight into host buffers.

    Deterministic for a given (config, seed): every tensor draws from its own stream keyed by
    (seed, layer, field), so changing one shape does not reshuffle the others. `normal(out,
    key, std)` fills one tensor (numpy by default; `experiments.gpu_check` draws on the
    device, where numpy takes half a minute per Mixtral layer).

    Returns:
      (host layers, {"embed", "final_norm", "lm_head"(absent when tied)}).
    """
    dtype = dtype or cfg.dtype
    dt = NP_DTYPES[dtype]
    layout = LayerLayout.for_config(cfg, dtype)

    def fill(out: np.ndarray, name: str, key: tuple[int, ...]) -> None:
        if name in NORM_FIELDS:
            out[...] = 1
        else:
            normal(out, (seed, *key), init_std)

    layers = []
    for li in range(cfg.num_layers):
        layer = HostLayer.allocate(layout)
        for fi, slot in enumerate(layout.slots):
            fill(getattr(layer.weights, slot.name), slot.name, (li, fi))
        layers.append(layer)
    V, h = cfg.vocab_size, cfg.hidden_size
    rest = {"embed": np.empty((V, h), dt), "final_norm": np.empty((h,), dt)}
    if not cfg.tie_word_embeddings:
        rest["lm_head"] = np.empty((V, h), dt)
    for i, (name, arr) in enumerate(rest.items()):
        fill(arr, name, (cfg.num_layers, i))
    return layers, rest


def assemble(host_layers: list[HostLayer], rest: dict[str, np.ndarray]) -> ModelWeights:
    return ModelWeights(embed=rest["embed"], layers=tuple(l.weights for l in host_layers),
                        final_norm=rest["final_norm"], lm_head=rest.get("lm_head"))


def packet_bounds(nbytes: int, packet_bytes: int, cut: int = 0) -> tuple[int, ...]:
    """Start offsets of a layer buffer's packets: one packet [0, cut) when `cut` > 0 (the
    part a weight mover keeps on the device), then packets of `packet_bytes` (the last may be
    shorter) over the rest."""
    if not 0 <= cut < nbytes:
        raise ValueError(f"packet cut {cut} must lie in [0, {nbytes})")
    return ((0,) if cut else ()) + tuple(range(cut, nbytes, packet_bytes))


def packets(buffer: np.ndarray, packet_bytes: int, cut: int = 0) -> tuple[np.ndarray, ...]:
    """A layer's uint8 buffer as consecutive views at `packet_bounds`: the unit of every
    host-to-device weight copy, and what `unpack_packets` reads."""
    bounds = packet_bounds(buffer.nbytes, packet_bytes, cut)
    return tuple(buffer[a:b] for a, b in zip(bounds, bounds[1:] + (buffer.nbytes,),
                                              strict=True))


@functools.partial(jax.jit, static_argnums=(0, 1, 3))
def unpack_packets(layout: LayerLayout, bounds: tuple[int, ...],
                   packets: tuple[jax.Array, ...],
                   keep_experts_quantised: bool = False) -> LayerWeights:
    """Typed `LayerWeights` from a layer's raw uint8 buffer split into packets starting at
    `bounds` (`packet_bounds`), on whatever device they live; a quantised layout's matrices
    come out dequantised to the model dtype, except, with `keep_experts_quantised`, the
    routed experts' (`EXPERT_FIELDS`), which stay `QuantisedMatrix` for an expert kernel that
    dequantises inside its GEMMs."""

    def raw(offset: int, nbytes: int) -> jax.Array:
        pieces = []
        while nbytes > 0:
            i = bisect.bisect_right(bounds, offset) - 1
            o = offset - bounds[i]
            take = min(nbytes, packets[i].shape[0] - o)
            pieces.append(jax.lax.slice(packets[i], (o,), (o + take,)))
            offset, nbytes = offset + take, nbytes - take
        return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)

    stored = {}
    for slot in layout.slots:
        sdt = _np_dtype(slot.dtype)
        flat = raw(slot.offset, slot.nbytes)
        typed = (jax.lax.bitcast_convert_type(flat, jnp.int8) if sdt.itemsize == 1 else
                 jax.lax.bitcast_convert_type(flat.reshape(-1, sdt.itemsize), jnp.dtype(sdt)))
        stored[slot.name] = typed.reshape(slot.shape)
    fields = dict.fromkeys(LAYER_FIELDS)
    for name in fields:
        if name + ".scale" in stored:
            q = QuantisedMatrix(stored[name], stored[name + ".scale"], layout.weight_dtype,
                                layout.dtype)
            fields[name] = (q if keep_experts_quantised and name in EXPERT_FIELDS
                            else q.dequantise())
        elif name in stored:
            fields[name] = stored[name]
    return LayerWeights(**fields)
