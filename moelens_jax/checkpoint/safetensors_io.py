"""Memory-mapped reading of .safetensors files, bfloat16 included.

The `safetensors` library validates each file (header JSON, offsets covering the file exactly);
tensors are then served as numpy views of one `np.memmap` per file. We map the bytes ourselves
because safetensors' numpy backend cannot represent bfloat16 (ml_dtypes can): a view costs no
memory until it is read, so converting a checkpoint touches each source byte once and peak host
memory stays at ~1x the converted weights.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

SUPPORTED_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                    "BF16": np.dtype(ml_dtypes.bfloat16)}


class CheckpointError(ValueError):
    """A checkpoint is missing, malformed, or does not match its config."""


class SafetensorsFile:
    """One validated, memory-mapped .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        try:
            with safe_open(path, framework="numpy") as f:
                names = set(f.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from e
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        header.pop("__metadata__", None)
        if set(header) != names:  # cannot happen for a file safetensors accepted; be safe
            raise CheckpointError(f"{path}: header disagrees with safetensors' view")
        self._base = 8 + header_len
        self._entries = header
        size = os.path.getsize(path)
        self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size > self._base else None

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, name: str) -> tuple[str, tuple[int, ...]]:
        e = self._entries[name]
        return e["dtype"], tuple(e["shape"])

    def get(self, name: str) -> np.ndarray:
        """A read-only numpy view of tensor `name` (no copy)."""
        dtype_name, shape = self.info(name)
        if dtype_name not in SUPPORTED_DTYPES:
            raise CheckpointError(
                f"{self.path}: tensor {name!r} has unsupported dtype {dtype_name} "
                f"(supported: {', '.join(SUPPORTED_DTYPES)})")
        start, end = self._entries[name]["data_offsets"]
        dt = SUPPORTED_DTYPES[dtype_name]
        if end - start != int(np.prod(shape)) * dt.itemsize:
            raise CheckpointError(f"{self.path}: tensor {name!r} byte size does not match its "
                                  f"shape {list(shape)} and dtype {dtype_name}")
        if end == start:
            return np.empty(shape, dt)
        return self._mmap[self._base + start:self._base + end].view(dt).reshape(shape)


_DTYPE_TO_ST = {dt: name for name, dt in SUPPORTED_DTYPES.items()}


def write_safetensors(path: str, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes a .safetensors file (bfloat16 included, which safetensors' numpy backend lacks).

    Tensors are written one by one (peak extra memory: one tensor), in name order.
    """
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        t = tensors[name]
        if t.dtype not in _DTYPE_TO_ST:
            raise CheckpointError(f"cannot write tensor {name!r} of dtype {t.dtype}")
        header[name] = {"dtype": _DTYPE_TO_ST[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(np.ascontiguousarray(tensors[name]).tobytes())
