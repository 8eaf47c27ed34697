// AVX2 + FMA + F16C instantiation of the page kernel (compiled with those flags only; called
// only after runtime detection).
#include <immintrin.h>

#include "attention_impl.h"

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
  static Vec Set1(float x) { return _mm256_set1_ps(x); }
  static Vec Fma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
  static Vec Mul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
  static Vec Add(Vec a, Vec b) { return _mm256_add_ps(a, b); }
  static Vec Sub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
  // Cephes-style expf: range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial,
  // 2^n through the exponent bits. Relative error ~1e-7 over [-87.3, 88.3] (inputs clamped).
  static Vec Exp(Vec x) {
    x = _mm256_min_ps(_mm256_max_ps(x, Set1(-87.3f)), Set1(88.3f));
    const Vec t = Fma(x, Set1(1.44269504088896341f), Set1(0.f));
    const Vec n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Vec r = Fma(n, Set1(-0.693359375f), x);
    r = Fma(n, Set1(2.12194440e-4f), r);
    Vec y = Set1(1.9875691500e-4f);
    y = Fma(y, r, Set1(1.3981999507e-3f));
    y = Fma(y, r, Set1(8.3334519073e-3f));
    y = Fma(y, r, Set1(4.1665795894e-2f));
    y = Fma(y, r, Set1(1.6666665459e-1f));
    y = Fma(y, r, Set1(5.0000001201e-1f));
    y = Fma(y, Mul(r, r), Add(r, Set1(1.f)));
    const auto ni = _mm256_cvtps_epi32(n);
    return Mul(y, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23)));
  }
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

}  // namespace moelens
