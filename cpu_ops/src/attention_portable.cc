// Portable (no ISA flags) instantiation of the page kernel: one float per "vector".
#include <algorithm>
#include <cmath>
#include <cstring>

#include "attention_impl.h"
#include "expert_impl.h"
#include "dtypes.h"

namespace moelens {
namespace {

struct PortableOps {
  static constexpr int kLanes = 1;
  static constexpr bool kHasF16 = true;
  using Vec = float;
  static Vec Zero() { return 0.f; }
  static Vec LoadF(const float* p) { return *p; }
  static Vec Load(kernel::TagF32, const uint8_t* p) {
    float f;
    std::memcpy(&f, p, 4);
    return f;
  }
  static Vec Load(kernel::TagBf16, const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return Bf16ToF32(h);
  }
  static Vec Load(kernel::TagF16, const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return F16ToF32(h);
  }
  static Vec Load(kernel::TagI8, const uint8_t* p) { return float(int8_t(*p)); }
  static Vec Load(kernel::TagF8E4M3, const uint8_t* p) { return F8E4M3ToF32(*p); }
  static Vec Set1(float x) { return x; }
  static Vec Fma(Vec a, Vec b, Vec c) { return a * b + c; }
  static Vec Mul(Vec a, Vec b) { return a * b; }
  static Vec Add(Vec a, Vec b) { return a + b; }
  static Vec Sub(Vec a, Vec b) { return a - b; }
  static Vec Div(Vec a, Vec b) { return a / b; }
  static Vec Exp(Vec x) { return std::exp(x); }
  static void Store(float* p, Vec v) { *p = v; }
  static Vec Max(Vec a, Vec b) { return std::max(a, b); }
  static float Sum(Vec v) { return v; }
  static float MaxAll(Vec v) { return v; }
  static void Prefetch(const void* p) { __builtin_prefetch(p); }
};

}  // namespace

PageFn GetPageFnPortable(KvDtype dtype, int head_dim, int s) {
  return kernel::Select<PortableOps>(dtype, head_dim, s);
}

SiluMulFn GetSiluMulPortable() { return kernel::SiluMul<PortableOps>; }

}  // namespace moelens
