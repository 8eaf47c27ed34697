// Grouped SwiGLU expert FFN over rows sorted by expert (the CPU backend's `expert_ffn`):
//   y[r] = (silu(x[r] @ Wg[e]) * (x[r] @ Wu[e])) @ Wd[e]   for every row r of expert e's group
// computing exactly the routed rows (no capacity padding). GEMMs are OpenBLAS sgemm calls
// (blas.h), one BLAS thread per work item on our pool; bf16 weights are widened to float32 one
// column panel at a time (decode-sized groups of bf16 weights instead stream the weights once
// through SmallGemm, widening in registers), so the arithmetic is float32 with float32
// accumulation, and the activations fed to a bf16 down projection are rounded to bf16 first
// (what XLA does).
//
// Work is cut into row chunks (bounded scratch), and each chunk into two phases with a barrier:
// (expert segment x column panel of f) for gate/up + SiLU, then (expert segment x column panel
// of the output) for the down projection, so a hot expert spreads over every thread too.
#pragma once

#include <cstdint>

#include "cpu_features.h"
#include "thread_pool.h"

namespace moelens {

enum class WeightDtype { kF32 = 0, kBf16 = 1 };

struct ExpertFfnArgs {
  const float* x = nullptr;            // [m, h] rows sorted by expert
  const int32_t* group_sizes = nullptr;  // [E]; rows past their sum are padding (output 0)
  const void* w_gate = nullptr;        // [E, h, f]
  const void* w_up = nullptr;          // [E, h, f]
  const void* w_down = nullptr;        // [E, f, ho]
  WeightDtype dtype = WeightDtype::kF32;
  int64_t m = 0, h = 0, f = 0, ho = 0, num_experts = 0;
  float* y = nullptr;                  // [m, ho]
};

// Throws std::invalid_argument (bad sizes / group sizes) or std::runtime_error (no BLAS)
// before writing anything.
void ExpertFfn(const ExpertFfnArgs& a, Isa isa, ThreadPool& pool);

}  // namespace moelens
