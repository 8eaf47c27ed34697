"""`Model`: a config plus host-resident weights, with the full-sequence reference forward."""

from __future__ import annotations

import functools

import jax
import numpy as np

from moelens_jax.config import ConfigError, ModelConfig
from moelens_jax.model import transformer
from moelens_jax.model.weights import (
    HostLayer,
    ModelWeights,
    assemble,
    packet_bounds,
    packets,
    unpack_packets,
    weights_nbytes,
)


class TokenError(ValueError):
    """Token ids are malformed or out of the vocabulary."""


def check_tokens(tokens, vocab_size: int, ndim: int = 2) -> np.ndarray:
    """Validates token ids on the host and returns them as an int32 array.

    Raises:
      TokenError: wrong rank, empty, non-integer dtype, or an id outside [0, vocab_size).
    """
    arr = np.asarray(tokens)
    if arr.ndim != ndim:
        raise TokenError(f"tokens must have rank {ndim}, got shape {arr.shape}")
    if arr.size == 0:
        raise TokenError(f"tokens are empty (shape {arr.shape})")
    if not np.issubdtype(arr.dtype, np.integer):
        raise TokenError(f"tokens must be integers, got dtype {arr.dtype}")
    bad = np.argwhere((arr < 0) | (arr >= vocab_size))
    if bad.size:
        pos = tuple(int(i) for i in bad[0])
        raise TokenError(f"token id {int(arr[pos])} at position {pos} is outside the vocabulary "
                         f"[0, {vocab_size}) ({len(bad)} invalid ids in total)")
    return arr.astype(np.int32)


@functools.partial(jax.jit, static_argnums=(0,))
def _forward_jit(cfg: ModelConfig, weights: ModelWeights, tokens):
    return transformer.forward(cfg, weights, tokens)


class Model:
    """A loaded MoE model: `config`, per-layer contiguous host buffers, and `forward`.

    Build one with `moelens_jax.load_model`. `host_layers[i].buffer` is layer i's contiguous
    uint8 host buffer and `weights` the `ModelWeights` pytree of numpy views into those buffers
    (plus embedding, final norm and lm_head arrays).
    """

    def __init__(self, config: ModelConfig, host_layers: list[HostLayer],
                 rest: dict[str, np.ndarray], *, source: str = ""):
        if len(host_layers) != config.num_layers:
            raise ValueError(f"{len(host_layers)} layers for a {config.num_layers}-layer config")
        self.config = config
        self.host_layers = host_layers
        self.weights = assemble(host_layers, rest)
        self.source = source
        self.tokenizer = None  # a `tokenizers.Tokenizer` when the checkpoint ships one
        self._device_weights = None
        self._staged: dict[tuple, list[tuple[jax.Array, ...]]] = {}

    def staged_layers(self, device, packet_bytes: int, cut: int = 0)\
            -> list[tuple[jax.Array, ...]]:
        """Each layer's buffer split into packets (`weights.packets(..., packet_bytes, cut)`)
        in `device`'s pinned host memory: staged once per (device, packet size, cut) and
        shared by every engine and weight mover on this model (calibration and policy
        comparisons build several)."""
        key = (device.platform, device.id, packet_bytes, cut)
        if key not in self._staged:
            self.require_pageable("staging another copy")
            pinned = jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")
            self._staged[key] = [tuple(jax.device_put(p, pinned)
                                       for p in packets(l.buffer, packet_bytes, cut))
                                 for l in self.host_layers]
        return self._staged[key]

    def release_pageable(self) -> int:
        """Frees the pageable layer buffers, leaving a pinned staging as the layers' only host
        copy (an accelerator engine does this unless told to keep both: the weights would
        otherwise sit in host memory twice). Afterwards `forward` unpacks the layers from
        the staging; `host_layers[i].buffer` / `.weights`, another staging and saving are
        unavailable (`require_pageable` says so). Returns the bytes freed.

        Raises:
          ValueError: nothing is staged yet.
        """
        if not self._staged:
            raise ValueError("release_pageable needs a pinned staging first "
                             "(Model.staged_layers); the layers would be lost")
        freed = 0
        for layer in self.host_layers:
            if layer.buffer is not None:
                freed += layer.buffer.nbytes
                layer.buffer, layer.weights = None, None
        self.weights = self.weights.replace(layers=())
        self._device_weights = None
        return freed

    @property
    def pageable(self) -> bool:
        """Whether the layers still have their pageable host buffers (`release_pageable`)."""
        return self.host_layers[0].buffer is not None

    def require_float(self, what: str) -> None:
        """Raises ValueError naming `what` if the layers are stored quantised."""
        if self.weight_dtype is not None:
            raise ValueError(f"{what} needs the float model; this one stores its layers as "
                             f"{self.weight_dtype} (quantise after loading instead)")

    def require_pageable(self, what: str) -> None:
        """Raises ValueError naming `what` if the pageable layer buffers were released."""
        if not self.pageable:
            raise ValueError(f"{what} needs the model's pageable host weights, which were "
                             "released to the pinned staging (an accelerator engine does this; "
                             "pass keep_pageable_weights=True to keep them, or load again)")

    @property
    def host_bytes(self) -> int:
        """Host memory this model holds: the pageable weights (embedding and lm_head only,
        once the layers are released) plus every pinned staging."""
        staged = sum(a.nbytes for layers in self._staged.values() for pk in layers for a in pk)
        return self.weight_bytes + staged

    @property
    def dtype(self) -> str:
        return self.host_layers[0].layout.dtype

    @property
    def weight_dtype(self) -> str | None:
        """How the layers' matrices are stored: None (the model dtype), "int8" or "int4"."""
        return self.host_layers[0].layout.weight_dtype

    def quantised(self, weight_dtype: str) -> Model:
        """A new model whose layers store their matrices in `weight_dtype` ("int8": per output
        channel; "int4": per output channel and 128 input rows; `weights.QUANTISED_FIELDS`),
        quantised from this one's; embedding, lm_head, norms and router stay in the model
        dtype. Layers stream as stored and are dequantised on the device
        (`weights.unpack_packets`; on the CPU backend the routed experts only inside the expert
        kernel's GEMMs, to code x scale in float32, which a bf16 model's unpacking rounds to
        bf16); `forward` computes with the dequantised weights, so it is the oracle of an
        engine on the quantised model (token for token in float32)."""
        self.require_pageable("quantising")
        if self.weight_dtype is not None:
            raise ValueError(f"the model is already quantised ({self.weight_dtype})")
        rest = {"embed": self.weights.embed, "final_norm": self.weights.final_norm}
        if self.weights.lm_head is not None:
            rest["lm_head"] = self.weights.lm_head
        out = Model(self.config, [l.quantise(weight_dtype) for l in self.host_layers], rest,
                    source=self.source)
        out.tokenizer = self.tokenizer
        return out

    @property
    def weight_bytes(self) -> int:
        if self.weight_dtype is None:
            return weights_nbytes(self.weights)
        rest = weights_nbytes(self.weights.replace(layers=()))
        layers = sum(l.layout.nbytes for l in self.host_layers if l.buffer is not None)
        return rest + layers

    def device_weights(self) -> ModelWeights:
        """The whole weight tree on the default device (cached): for the reference path only.

        The engine never does this; it streams layers from `host_layers`.
        """
        if self._device_weights is None:
            layout = self.host_layers[0].layout
            if self.pageable and not layout.quantised:
                self._device_weights = jax.device_put(self.weights)
                return self._device_weights
            # Unpacked on the device (a quantised layout dequantised): from the host buffers,
            # or from the pinned staging once they are released.
            if self.pageable:
                dev = dst = jax.devices()[0]
                bounds, layers = (0,), [(l.buffer,) for l in self.host_layers]
            else:
                (platform, dev_id, packet_bytes, cut), layers = next(iter(self._staged.items()))
                dev = next(d for d in jax.devices(platform) if d.id == dev_id)
                dst = jax.sharding.SingleDeviceSharding(dev, memory_kind="device")
                bounds = packet_bounds(layout.nbytes, packet_bytes, cut)
            typed = tuple(unpack_packets(layout, bounds,
                                         tuple(jax.device_put(p, dst) for p in packets))
                          for packets in layers)
            self._device_weights = jax.device_put(self.weights.replace(layers=typed), dev)
        return self._device_weights

    def forward(self, tokens_bt) -> jax.Array:
        """Full-sequence causal forward: int tokens [B, T] -> float32 logits [B, T, V].

        Raises:
          TokenError: if `tokens_bt` is not a non-empty integer [B, T] array of valid ids.
        """
        if not self.config.runnable:
            raise ConfigError(
                f"family {self.config.family!r} is shape-only (used by the performance model); "
                "it has no forward pass")
        tokens = check_tokens(tokens_bt, self.config.vocab_size)
        return _forward_jit(self.config, self.device_weights(), tokens)

    def encode(self, text: str) -> list[int]:
        """Text -> token ids with the checkpoint's tokenizer.json."""
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer: this model was loaded from "
                             f"{self.source or 'a preset'} without a tokenizer.json")
        return list(self.tokenizer.encode(text).ids)

    def decode(self, tokens: list[int]) -> str:
        if self.tokenizer is None:
            raise ValueError("decoding needs a tokenizer (no tokenizer.json was loaded)")
        return self.tokenizer.decode(list(tokens))

    def __repr__(self) -> str:
        c = self.config
        return (f"Model({c.name or c.family}, layers={c.num_layers}, dtype={self.dtype}, "
                f"params={c.total_params / 1e6:,.1f}M, source={self.source!r})")
