// The expert FFN's elementwise stage, written once over the ISA `Ops` trait of
// attention_impl.h and compiled per ISA (attention_{portable,avx2,avx512}.cc instantiate it):
//   a[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i]
// optionally rounded to bfloat16 (round to nearest even) and widened back, so a bf16 model's
// down projection sees exactly the bf16 activations XLA would feed it.
#pragma once

#include <cstdint>
#include <cstring>

#include "attention_impl.h"
#include "dtypes.h"

namespace moelens {

// a[0, n) = silu(g) * u; g/u/a may alias (a == g is the engine's in-place use).
using SiluMulFn = void (*)(const float* g, const float* u, float* a, int64_t n, bool round_bf16);

SiluMulFn GetSiluMulPortable();
SiluMulFn GetSiluMulAvx2();
SiluMulFn GetSiluMulAvx512();

namespace kernel {

inline float RoundToBf16(float x) { return Bf16ToF32(F32ToBf16(x)); }

template <class Ops>
void SiluMul(const float* g, const float* u, float* a, int64_t n, bool round_bf16) {
  constexpr int VL = Ops::kLanes;
  const auto one = Ops::Set1(1.f);
  const auto zero = Ops::Zero();
  int64_t i = 0;
  for (; i + VL <= n; i += VL) {
    const auto gv = Ops::LoadF(g + i);
    const auto e = Ops::Exp(Ops::Sub(zero, gv));
    Ops::Store(a + i, Ops::Mul(Ops::Div(gv, Ops::Add(one, e)), Ops::LoadF(u + i)));
  }
  for (; i < n; ++i) {
    const float gv = g[i];
    a[i] = gv / (1.f + std::exp(-gv)) * u[i];
  }
  if (round_bf16) {
    for (int64_t j = 0; j < n; ++j) a[j] = RoundToBf16(a[j]);
  }
}

}  // namespace kernel
}  // namespace moelens
