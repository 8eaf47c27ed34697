"""The CPU backend's grouped expert FFN: C++ (own small-group GEMMs + OpenBLAS) through XLA FFI.

`grouped_expert_ffn` has the contract of `moe.expert_ffn` (rows sorted by expert, group sizes,
float32 out) and computes exactly the routed rows: each expert's contiguous rows go through its
gate/up GEMMs, SiLU, and its down GEMM (`cpu_ops/src/expert_ffn.cc`), on the same thread pool
as decode attention. Each work item's GEMM is picked by the group's rows: for up to a few dozen
rows our own AVX2/AVX-512 kernels (the weights read once, in rows, into packed column panels;
decode-sized bf16 groups stream them without packing), above that one single-threaded OpenBLAS
sgemm. The group sizes are read inside the kernel, so no host round trip and no static
capacity is needed.

The GEMM library is OpenBLAS from the `scipy-openblas32` wheel (the build numpy and scipy link
against), opened at import with dlopen; the extension does not link against it. Float32 and
bfloat16 weights (bf16 widened to float32 per column panel; activations rounded to bf16 before
a bf16 down projection, as XLA does). Only the CPU backend has this kernel; `moe.expert_ffn`
picks it under `jax.lax.platform_dependent`, so the same jitted code lowers for other backends.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy_openblas32

from moelens_jax import _cpu_ops, ops

FFI_TARGET = "moelens_expert_ffn"

_cpu_ops.load_blas(os.path.join(scipy_openblas32.get_lib_dir(),
                                scipy_openblas32.get_library(fullname=True)))
jax.ffi.register_ffi_target(FFI_TARGET, _cpu_ops.expert_ffn_ffi_handler(), platform="cpu")


def blas_info() -> str:
    """The OpenBLAS build the expert kernel calls (version, target kernel, threading)."""
    return _cpu_ops.blas_info()


_FMT = {"float32": 0, "bfloat16": 1, "int8": 2, "int4": 3}


def grouped_expert_ffn(w_gate_ehf: jax.Array, w_up_ehf: jax.Array, w_down_efh: jax.Array,
                       x_mh: jax.Array, group_sizes_e: jax.Array,
                       scales: tuple[jax.Array, jax.Array, jax.Array] | None = None,
                       weight_dtype: str | None = None, dtype=None) -> jax.Array:
    """SwiGLU of every expert over its contiguous rows, on the CPU backend only.

    Args:
      w_gate_ehf, w_up_ehf: [E, h, f]; w_down_efh: [E, f, h_out]; float32 or bfloat16 (one
        dtype for all three), or with `weight_dtype` the int8 codes of a quantised layout
        (`model.weights.quantise`; int4: [E, h/2, f] and [E, f/2, h_out], two codes a byte).
      x_mh: [m, h] rows sorted by expert (cast to the weight dtype, or to `dtype` for
        quantised weights, and computed in float32).
      group_sizes_e: [E] rows per expert; rows past their sum are padding and get zeros.
      scales: quantised only: the float32 scales of (w_gate, w_up, w_down), [E, f] / [E, h_out]
        for int8, [E, rows / group, out] for int4.
      weight_dtype: "int8" or "int4" for quantised codes (dequantised inside the GEMMs).
      dtype: quantised only: the model dtype (float32 or bfloat16): x and the activations
        fed to the down projection round to it, as on the float path. The weights are
        code x scale in float32, not rounded to it (unpacking a layer rounds them: a bf16
        model's results differ from the float kernel on unpacked weights by that rounding).

    Returns:
      [m, h_out] float32.
    """
    dt = w_gate_ehf.dtype
    if not (w_up_ehf.dtype == w_down_efh.dtype == dt):
        raise ValueError("grouped_expert_ffn: w_gate, w_up and w_down must share one dtype")
    if weight_dtype is None:
        if dt not in (jnp.float32, jnp.bfloat16):
            raise ValueError("grouped_expert_ffn: weights must be float32 or bfloat16, got "
                             f"{dt}")
        fmt, model_dt = _FMT[jnp.dtype(dt).name], dt
        scales = (jnp.zeros((0,), jnp.float32),) * 3
    else:
        if weight_dtype not in ("int8", "int4") or dt != jnp.int8 or scales is None:
            raise ValueError("grouped_expert_ffn: quantised weights are int8 codes with "
                             f"scales and weight_dtype int8 / int4, got {dt}, {weight_dtype}")
        if dtype is None:
            raise ValueError("grouped_expert_ffn: quantised weights need the model dtype "
                             "(`dtype`), which x and the activations round to")
        model_dt = jnp.dtype(dtype)
        if model_dt not in (jnp.float32, jnp.bfloat16):
            raise ValueError("grouped_expert_ffn: a quantised model must be float32 or "
                             f"bfloat16, got {model_dt}")
        fmt = _FMT[weight_dtype]
        scales = tuple(s.astype(jnp.float32) for s in scales)
    x = x_mh.astype(model_dt).astype(jnp.float32)  # the rounding XLA's `linear` applies
    out = jax.ShapeDtypeStruct((x_mh.shape[0], w_down_efh.shape[-1]), jnp.float32)
    call = jax.ffi.ffi_call(FFI_TARGET, out, vmap_method="sequential")
    return call(x, group_sizes_e.astype(jnp.int32), w_gate_ehf, w_up_ehf, w_down_efh, *scales,
                isa=np.int64(ops.selected_isa_level()), fmt=np.int64(fmt),
                round_bf16=np.int64(model_dt == jnp.bfloat16))


__all__ = ["FFI_TARGET", "blas_info", "grouped_expert_ffn"]
