"""Host-side C++ kernels (built from ``cpu_ops/`` by ``pip install``) and their Python API."""

from __future__ import annotations

import math
import os

import numpy as np

from moelens_jax import _cpu_ops

ISA_ENV = "MOELENS_CPU_ISA"  # force a lower ISA path, e.g. MOELENS_CPU_ISA=avx2
ISA_LEVELS = {"portable": 0, "avx2": 1, "avx512": 2, "avx512_bf16": 3}  # cpu_features.h Isa


def supported_isas() -> list[str]:
    """ISA levels this machine can run, lowest first."""
    return list(_cpu_ops.supported_isas())


def selected_isa(requested: str | None = None) -> str:
    """The ISA the kernels will use: `requested`, else $MOELENS_CPU_ISA, else the best one.

    Raises:
      ValueError: unknown ISA name, or one this machine cannot run.
    """
    supported = supported_isas()
    name = requested or os.environ.get(ISA_ENV) or supported[-1]
    if name not in ISA_LEVELS:
        raise ValueError(f"unknown ISA {name!r}; known: {', '.join(ISA_LEVELS)}")
    if name not in supported:
        raise ValueError(f"ISA {name!r} is not supported by this CPU (supported: "
                         f"{', '.join(supported)})")
    return name


def selected_isa_level() -> int:
    """`selected_isa()` as the integer level the C++ FFI handlers take."""
    return ISA_LEVELS[selected_isa()]


_F32_TINY, _F32_MAX = float(np.finfo(np.float32).tiny), float(np.finfo(np.float32).max)


def checked_scale(scale: float | None) -> float | None:
    """The attention softmax `scale`, checked: None (meaning 1/sqrt(head_dim)) or a float that
    stays finite and positive in float32, the precision the kernel uses.

    Raises:
      ValueError: zero, negative, NaN, infinite, or out of float32's normal range.
    """
    if scale is None:
        return None
    s = float(scale)
    if not (math.isfinite(s) and _F32_TINY <= s <= _F32_MAX):
        raise ValueError(f"attention scale must be a finite positive number (None for "
                         f"1/sqrt(head_dim)), got {scale!r}")
    return s


def cpu_info() -> dict:
    """CPU features seen at run time, the ISA paths available and the one selected."""
    return {"isa": selected_isa(), "supported_isas": supported_isas(),
            "features": dict(_cpu_ops.cpu_features()), "cpu_count": os.cpu_count()}


__all__ = ["ISA_ENV", "ISA_LEVELS", "checked_scale", "cpu_info", "selected_isa",
           "selected_isa_level", "supported_isas"]
