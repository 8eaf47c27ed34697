// AVX-512 (F + BW + VL, F16C) instantiation of the page kernel. bf16 -> f32 is a 16-bit shift
// here as on AVX2; the AVX512-BF16 dot-product instructions are not used because they would
// round q (and p) to bf16, breaking the float32-accumulation contract.
#include <immintrin.h>

#include "attention_impl.h"

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
  // Cephes-style expf: range reduction x = n ln2 + r, |r| <= ln2/2, degree-6 polynomial,
  // 2^n through the exponent bits. Relative error ~1e-7 over [-87.3, 88.3] (inputs clamped).
  static Vec Exp(Vec x) {
    x = _mm512_min_ps(_mm512_max_ps(x, Set1(-87.3f)), Set1(88.3f));
    const Vec t = Fma(x, Set1(1.44269504088896341f), Set1(0.f));
    const Vec n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    Vec r = Fma(n, Set1(-0.693359375f), x);
    r = Fma(n, Set1(2.12194440e-4f), r);
    Vec y = Set1(1.9875691500e-4f);
    y = Fma(y, r, Set1(1.3981999507e-3f));
    y = Fma(y, r, Set1(8.3334519073e-3f));
    y = Fma(y, r, Set1(4.1665795894e-2f));
    y = Fma(y, r, Set1(1.6666665459e-1f));
    y = Fma(y, r, Set1(5.0000001201e-1f));
    y = Fma(y, Mul(r, r), Add(r, Set1(1.f)));
    const auto ni = _mm512_cvtps_epi32(n);
    return Mul(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(ni, _mm512_set1_epi32(127)), 23)));
  }
  static void Store(float* p, Vec v) { _mm512_storeu_ps(p, v); }
  static float Sum(Vec v) { return _mm512_reduce_add_ps(v); }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

}  // namespace

PageFn GetPageFnAvx512(KvDtype dtype, int head_dim, int s) {
  return kernel::Select<Avx512Ops>(dtype, head_dim, s);
}

}  // namespace moelens
