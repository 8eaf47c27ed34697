// AVX2 + FMA + F16C instantiation of the page kernel (compiled with those flags only; called
// only after runtime detection).
#include <immintrin.h>

#include "attention_impl.h"
#include "dtypes.h"
#include "expert_impl.h"

namespace moelens {
namespace {

struct Avx2Ops {
  static constexpr int kLanes = 8;
  static constexpr bool kHasF16 = true;
  using Vec = __m256;
  static Vec Zero() { return _mm256_setzero_ps(); }
  static Vec LoadF(const float* p) { return _mm256_loadu_ps(p); }
  static Vec Load(kernel::TagF32, const uint8_t* p) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
  }
  static Vec Load(kernel::TagBf16, const uint8_t* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static Vec Load(kernel::TagF16, const uint8_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static Vec Load(kernel::TagI8, const uint8_t* p) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
  }
  // e4m3 -> float16 bits (sign to bit 15, exponent and mantissa to bits 7..13) is the value
  // times 2^-8, subnormals included (the two biases differ by 8); F16C widens it. A NaN code
  // becomes a finite number, but only a NaN row stores NaN codes, and its scale is NaN.
  static Vec Load(kernel::TagF8E4M3, const uint8_t* p) {
    const __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    const __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x7f)), 7),
                                   _mm_slli_epi16(_mm_and_si128(w, _mm_set1_epi16(0x80)), 8));
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.f));
  }
  static Vec Set1(float x) { return _mm256_set1_ps(x); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec Sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  static Vec Div(Vec a, Vec b) { return _mm256_div_ps(a, b); }
  static Vec Min(Vec a, Vec b) { return _mm256_min_ps(a, b); }
  static Vec Max(Vec a, Vec b) { return _mm256_max_ps(a, b); }
  static Vec Round(Vec x) {
    return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  }
  static Vec Pow2(Vec n) {
    const auto e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static Vec Exp(Vec x) { return kernel::CephesExp<Avx2Ops>(x); }
  static void Store(float* p, Vec v) { _mm256_storeu_ps(p, v); }
  static float Sum(Vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

}  // namespace

PageFn GetPageFnAvx2(KvDtype dtype, int head_dim, int s) {
  return kernel::Select<Avx2Ops>(dtype, head_dim, s);
}

SiluMulFn GetSiluMulAvx2() { return kernel::SiluMul<Avx2Ops>; }
SmallGemmFn GetSmallGemmAvx2() { return kernel::SmallGemm<Avx2Ops>; }

}  // namespace moelens
