// Grouped SwiGLU expert FFN over rows sorted by expert (the CPU backend's `expert_ffn`):
//   y[r] = (silu(x[r] @ Wg[e]) * (x[r] @ Wu[e])) @ Wd[e]   for every row r of expert e's group
// computing exactly the routed rows (no capacity padding). Each (expert segment x column panel)
// GEMM takes one of three kernels by its rows (expert_ffn.cc): decode-sized groups of bf16
// weights stream the weights once through SmallGemm (widened in registers); groups of up to a
// few dozen rows read the weights row by row into packed column panels (PackedGemm, bf16
// widened while packing); larger groups call OpenBLAS sgemm (blas.h; bf16 widened to float32
// one column panel at a time), one BLAS thread per work item on our pool. The arithmetic is
// float32 with float32 accumulation, and the activations fed to a bf16 down projection are
// rounded to bf16 first (what XLA does).
//
// Quantised weights (int8 per output channel, int4 per output channel and group of input rows;
// the layouts of moelens_jax/model/weights.py) are dequantised inside the GEMMs to code x scale
// in float32 (not rounded to a bf16 model's dtype, which unpacking does): in registers by
// SmallGemm (int8: the column scales applied once to the sums), while PackedGemm packs its
// panels, or (above 48 rows) into the float32 panel of one column block that OpenBLAS reads.
// The codes are what streams from memory; no dequantised copy of a whole expert is made.
//
// Work is cut into row chunks (bounded scratch), and each chunk into two phases with a barrier:
// (expert segment x column panel of f) for gate/up + SiLU, then (expert segment x column panel
// of the output) for the down projection, so a hot expert spreads over every thread too.
#pragma once

#include <cstdint>

#include "cpu_features.h"
#include "thread_pool.h"

namespace moelens {

// How the expert matrices are stored (values match the FFI's `fmt` attribute).
enum class WeightDtype { kF32 = 0, kBf16 = 1, kInt8 = 2, kInt4 = 3 };

struct ExpertFfnArgs {
  const float* x = nullptr;            // [m, h] rows sorted by expert
  const int32_t* group_sizes = nullptr;  // [E]; rows past their sum are padding (output 0)
  // [E, h, f], [E, h, f], [E, f, ho] (int4: [E, h/2, f], [E, h/2, f], [E, f/2, ho], two codes
  // per byte along the input axis, row 2j in the low nibble).
  const void* w_gate = nullptr;
  const void* w_up = nullptr;
  const void* w_down = nullptr;
  WeightDtype dtype = WeightDtype::kF32;
  // Quantised only: float32 scales, int8 [E, f] / [E, f] / [E, ho]; int4 [E, h / gate_group, f]
  // (gate and up) and [E, f / down_group, ho], one per output channel and group of input rows.
  const float* s_gate = nullptr;
  const float* s_up = nullptr;
  const float* s_down = nullptr;
  int64_t gate_group = 0, down_group = 0;  // int4: input rows per scale (even, divides h / f)
  bool round_bf16 = false;  // quantised: a bf16 model (its activations round to bf16)
  int64_t m = 0, h = 0, f = 0, ho = 0, num_experts = 0;
  float* y = nullptr;                  // [m, ho]
};

// Throws std::invalid_argument (bad sizes / group sizes) or std::runtime_error (no BLAS)
// before writing anything.
void ExpertFfn(const ExpertFfnArgs& a, Isa isa, ThreadPool& pool);

}  // namespace moelens
