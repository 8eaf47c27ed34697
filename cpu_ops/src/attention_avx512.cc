// AVX-512 (F + BW + VL, F16C) instantiation of the page kernel. bf16 -> f32 is a 16-bit shift
// here as on AVX2; the AVX512-BF16 dot-product instructions are not used because they would
// round q (and p) to bf16, breaking the float32-accumulation contract.
#include <immintrin.h>

#include "attention_impl.h"
#include "expert_impl.h"

namespace moelens {
namespace {

struct Avx512Ops {
  static constexpr int kLanes = 16;
  static constexpr bool kHasF16 = true;
  using Vec = __m512;
  static Vec Zero() { return _mm512_setzero_ps(); }
  static Vec LoadF(const float* p) { return _mm512_loadu_ps(p); }
  static Vec Load(kernel::TagF32, const uint8_t* p) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
  }
  static Vec Load(kernel::TagBf16, const uint8_t* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static Vec Load(kernel::TagF16, const uint8_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static Vec Set1(float x) { return _mm512_set1_ps(x); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
  static Vec Mul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
  static Vec Add(Vec a, Vec b) { return _mm512_add_ps(a, b); }
  static Vec Sub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
  static Vec Div(Vec a, Vec b) { return _mm512_div_ps(a, b); }
  static Vec Min(Vec a, Vec b) { return _mm512_min_ps(a, b); }
  static Vec Max(Vec a, Vec b) { return _mm512_max_ps(a, b); }
  static Vec Round(Vec x) {
    return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static Vec Pow2(Vec n) {
    const auto e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static Vec Exp(Vec x) { return kernel::CephesExp<Avx512Ops>(x); }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

}  // namespace

PageFn GetPageFnAvx512(KvDtype dtype, int head_dim, int s) {
  return kernel::Select<Avx512Ops>(dtype, head_dim, s);
}

SiluMulFn GetSiluMulAvx512() { return kernel::SiluMul<Avx512Ops>; }
SmallGemmFn GetSmallGemmAvx512() { return kernel::SmallGemm<Avx512Ops>; }

}  // namespace moelens
