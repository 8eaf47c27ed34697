// AVX2 + FMA + F16C instantiation of the page kernel (compiled with those flags only; called
// only after runtime detection).
#include <immintrin.h>

#include <cstring>
#include <limits>

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
  // Eight int4 codes from the low (hi = 0) or high (hi = 1) nibbles of 8 bytes, sign-extended.
  static Vec LoadI4(const uint8_t* p, int hi) {
    const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    return _mm256_cvtepi32_ps(hi ? _mm256_srai_epi32(v, 4)
                                 : _mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
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
  static float MaxAll(Vec v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    return _mm_cvtss_f32(m);
  }
  static void Prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
};


// ---- int8 K/V with integer dot products ----------------------------------------------------
// Converting int8 to float costs as much as the FMAs that use it, so a float kernel over an
// int8 store runs barely faster than over bf16 although it reads half the bytes. This kernel
// multiplies integers instead: scores dot the 16-bit queries (PageArgs::q16) with K widened to
// 16 bits (vpmaddwd: 16 products per instruction, int32 sums), and the softmax weights, times
// each token's V scale, are rounded to 16 bits per (page, head) for the same product with V.
// Both roundings are relative 2^-16 of a row's maximum, ~256x finer than the int8 codes
// themselves. Valid for head_dim a multiple of 16 and <= kI8MaxHeadDim: each int32 lane then
// sums <= 2048 / 8 products of <= 32767 * 127 (scores) or <= 256 (kMaxPageSize) of them
// (values), below 2^31; lanes are converted to float before they are added together.
constexpr int kI8MaxHeadDim = 2048;
// Row length of the rounded weights: a page's tokens plus the zero partner of an odd last one.
constexpr int kP16Row = kMaxPageSize + 16;

// [sum(a[0]), ..., sum(a[7])] of eight float vectors.
inline __m256 Sum8(const __m256 (&a)[8]) {
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

inline __m256i LoadI8x16(const uint8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// score[i][t0 + u] = q16_scale[i] * k_scale[t0 + u] * (q16[i] . k[t0 + u]) for u < TT.
template <int S, int TT>
inline void ScoreTokensI8(const PageArgs& a, int t0, float (*score)[kMaxPageSize]) {
  static_assert(TT * S <= 8, "one Sum8 reduces the block");
  const int d = a.head_dim;
  __m256i acc[TT * S];
  MOELENS_UNROLL for (int j = 0; j < TT * S; ++j) acc[j] = _mm256_setzero_si256();
  for (int c = 0; c < d; c += 16) {
    __m256i kw[TT];
    MOELENS_UNROLL for (int u = 0; u < TT; ++u) kw[u] = LoadI8x16(a.k + int64_t(t0 + u) * d + c);
    MOELENS_UNROLL for (int i = 0; i < S; ++i) {
      const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q16 + i * d + c));
      MOELENS_UNROLL for (int u = 0; u < TT; ++u)
        acc[u * S + i] = _mm256_add_epi32(acc[u * S + i], _mm256_madd_epi16(qv, kw[u]));
    }
  }
  __m256 f[8];
  MOELENS_UNROLL for (int j = 0; j < 8; ++j)
    f[j] = j < TT * S ? _mm256_cvtepi32_ps(acc[j]) : _mm256_setzero_ps();
  alignas(32) float sums[8];
  _mm256_store_ps(sums, Sum8(f));
  MOELENS_UNROLL for (int u = 0; u < TT; ++u)
    MOELENS_UNROLL for (int i = 0; i < S; ++i)
      score[i][t0 + u] = sums[u * S + i] * (a.q16_scale[i] * a.k_scale[t0 + u]);
}

// acc[i0 + j][c .. c + 16) += pscale[i0 + j] * sum_t p16[i0 + j][t] * v_t[c .. c + 16), j < H.
// Tokens go in pairs: V rows t and t + 1 interleaved as 16-bit pairs meet (p16[t], p16[t + 1]).
template <int H>
inline void AccumulateI8(const PageArgs& a, int c, int i0, const int16_t (*p16)[kP16Row],
                         const float* pscale) {
  const int d = a.head_dim;
  const int ntok = a.ntok;
  __m256i lo[H], hi[H];  // int32 sums for columns c+{0..3, 8..11} and c+{4..7, 12..15}
  MOELENS_UNROLL for (int j = 0; j < H; ++j) lo[j] = hi[j] = _mm256_setzero_si256();
  const uint8_t* v = a.v + c;
  for (int t = 0; t < ntok; t += 2) {
    const __m256i va = LoadI8x16(v + int64_t(t) * d);
    const __m256i vb = t + 1 < ntok ? LoadI8x16(v + int64_t(t + 1) * d) : _mm256_setzero_si256();
    const __m256i il = _mm256_unpacklo_epi16(va, vb), ih = _mm256_unpackhi_epi16(va, vb);
    MOELENS_UNROLL for (int j = 0; j < H; ++j) {
      int32_t pair;  // p16[t], p16[t + 1] (0 past the page's last token)
      std::memcpy(&pair, &p16[i0 + j][t], 4);
      const __m256i w = _mm256_set1_epi32(pair);
      lo[j] = _mm256_add_epi32(lo[j], _mm256_madd_epi16(il, w));
      hi[j] = _mm256_add_epi32(hi[j], _mm256_madd_epi16(ih, w));
    }
  }
  MOELENS_UNROLL for (int j = 0; j < H; ++j) {
    const __m256 sc = _mm256_set1_ps(pscale[i0 + j]);
    float* o = a.acc + int64_t(i0 + j) * d + c;
    const __m256 c0 = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo[j], hi[j], 0x20));
    const __m256 c1 = _mm256_cvtepi32_ps(_mm256_permute2x128_si256(lo[j], hi[j], 0x31));
    _mm256_storeu_ps(o, _mm256_fmadd_ps(c0, sc, _mm256_loadu_ps(o)));
    _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(c1, sc, _mm256_loadu_ps(o + 8)));
  }
}

// Rounds p[i][t] * v_scale[t] (t < ntok) to 16 bits per head: p16 * pscale. False (nothing
// usable written) when a product is not finite, so the caller keeps float semantics.
template <int S>
inline bool QuantiseWeights(const PageArgs& a, const float (*p)[kMaxPageSize],
                            int16_t (*p16)[kP16Row], float* pscale) {
  const int ntok = a.ntok;
  for (int i = 0; i < S; ++i) {
    alignas(32) float pf[kMaxPageSize];
    __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
    int u = 0;
    for (; u + 8 <= ntok; u += 8) {
      const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(&p[i][u]), _mm256_loadu_ps(a.v_scale + u));
      _mm256_store_ps(pf + u, x);
      mx = _mm256_max_ps(mx, x);
      sum = _mm256_add_ps(sum, x);  // NaN and infinity survive a sum, not always a max
    }
    float m = Avx2Ops::MaxAll(mx);
    float total = Avx2Ops::Sum(sum);
    for (; u < ntok; ++u) {
      pf[u] = p[i][u] * a.v_scale[u];
      m = std::max(m, pf[u]);
      total += pf[u];
    }
    const float inv = m > 0.f ? 32767.f / m : 0.f;
    // A non-finite weight, or a page whose largest weight is so small (< ~1e-34: every score
    // ~80 below the running max) that 32767 / m overflows: the float path keeps the semantics.
    if (!std::isfinite(total) || !(inv <= std::numeric_limits<float>::max())) return false;
    pscale[i] = m / 32767.f;
    const __m256 iv = _mm256_set1_ps(inv);
    u = 0;
    for (; u + 16 <= ntok; u += 16) {
      const __m256i x0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(pf + u), iv));
      const __m256i x1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(pf + u + 8), iv));
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(x0, x1), 0xD8);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(&p16[i][u]), packed);
    }
    for (; u < ntok; ++u) p16[i][u] = int16_t(std::min(32767.f, std::nearbyint(pf[u] * inv)));
    p16[i][ntok] = 0;  // the pair partner of an odd last token
  }
  return true;
}

// The page kernel for an int8 store (see above); the state update is the float kernel's.
template <int S>
void ProcessPageI8(const PageArgs& a) {
  if (a.q16 == nullptr || a.k_scale == nullptr || a.v_scale == nullptr) {  // not from a store
    kernel::ProcessPage<Avx2Ops, kernel::TagI8, S>(a);
    return;
  }
  constexpr int TT = kernel::kTokStep<S>;
  const int d = a.head_dim;
  const int ntok = a.ntok;
  alignas(64) float score[S][kMaxPageSize];
  kernel::PrefetchRow<Avx2Ops>(reinterpret_cast<const uint8_t*>(a.v_scale), 4 * ntok);
  int t = 0;
  for (; t + TT <= ntok; t += TT) {
    for (int u = 0; u < TT; ++u) kernel::PrefetchRow<Avx2Ops>(a.v + int64_t(t + u) * d, d);
    ScoreTokensI8<S, TT>(a, t, score);
  }
  for (; t < ntok; ++t) {
    kernel::PrefetchRow<Avx2Ops>(a.v + int64_t(t) * d, d);
    ScoreTokensI8<S, 1>(a, t, score);
  }
  if (a.next != nullptr) kernel::PrefetchRow<Avx2Ops>(a.next, a.next_bytes);

  kernel::UpdateSoftmax<Avx2Ops, S>(a, score);

  alignas(32) int16_t p16[S][kP16Row];
  float pscale[S];
  if (!QuantiseWeights<S>(a, score, p16, pscale)) {
    kernel::AccumulatePage<Avx2Ops, kernel::TagI8, S>(a, score);
    return;
  }
  constexpr int H = S < 4 ? S : 4;  // heads per pass: 2 H int32 accumulators in registers
  for (int c = 0; c < d; c += 16) {
    int i0 = 0;
    for (; i0 + H <= S; i0 += H) AccumulateI8<H>(a, c, i0, p16, pscale);
    if constexpr (S % H != 0) AccumulateI8<S % H>(a, c, i0, p16, pscale);
  }
}

PageFn ForGroupI8(int s) {
  switch (s) {
    case 1: return &ProcessPageI8<1>;
    case 2: return &ProcessPageI8<2>;
    case 3: return &ProcessPageI8<3>;
    case 4: return &ProcessPageI8<4>;
    case 5: return &ProcessPageI8<5>;
    case 6: return &ProcessPageI8<6>;
    case 7: return &ProcessPageI8<7>;
    case 8: return &ProcessPageI8<8>;
  }
  return nullptr;
}

}  // namespace

PageFn GetPageFnAvx2(KvDtype dtype, int head_dim, int s) {
  if (dtype == KvDtype::kI8 && head_dim % 16 == 0 && head_dim <= kI8MaxHeadDim) {
    return ForGroupI8(s);
  }
  return kernel::Select<Avx2Ops>(dtype, head_dim, s);
}

SiluMulFn GetSiluMulAvx2() { return kernel::SiluMul<Avx2Ops>; }
SmallGemmFn GetSmallGemmAvx2() { return kernel::SmallGemm<Avx2Ops>; }
PackedGemmFn GetPackedGemmAvx2() { return kernel::PackedGemm<Avx2Ops>; }

}  // namespace moelens
