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
