// AVX-512 (F + BW + VL, F16C) instantiation of the page kernel. bf16 -> f32 is a 16-bit shift
// here as on AVX2; the AVX512-BF16 dot-product instructions are not used because they would
// round q (and p) to bf16, breaking the float32-accumulation contract.
#include <immintrin.h>

#include "attention_impl.h"
#include "dtypes.h"
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
  static Vec Load(kernel::TagI8, const uint8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
  }
  // e4m3 -> float16 bits, as in attention_avx2.cc (the value times 2^-8).
  static Vec Load(kernel::TagF8E4M3, const uint8_t* p) {
    const __m256i w = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    const __m256i h =
        _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x7f)), 7),
                        _mm256_slli_epi16(_mm256_and_si256(w, _mm256_set1_epi16(0x80)), 8));
    return _mm512_mul_ps(_mm512_cvtph_ps(h), _mm512_set1_ps(256.f));
  }
  // Sixteen int4 codes from the low (hi = 0) or high (hi = 1) nibbles of 16 bytes.
  static Vec LoadI4(const uint8_t* p, int hi) {
    const __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm512_cvtepi32_ps(hi ? _mm512_srai_epi32(v, 4)
                                 : _mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28));
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
  static float MaxAll(Vec v) { return _mm512_reduce_max_ps(v); }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};

}  // namespace

PageFn GetPageFnAvx512(KvDtype dtype, int head_dim, int s) {
  return kernel::Select<Avx512Ops>(dtype, head_dim, s);
}

SiluMulFn GetSiluMulAvx512() { return kernel::SiluMul<Avx512Ops>; }
SmallGemmFn GetSmallGemmAvx512() { return kernel::SmallGemm<Avx512Ops>; }
PackedGemmFn GetPackedGemmAvx512() { return kernel::PackedGemm<Avx512Ops>; }

}  // namespace moelens
