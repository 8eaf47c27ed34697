// AVX2 + FMA + F16C instantiation of the page kernel (compiled with those flags only; called
// only after runtime detection).
#include <immintrin.h>

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
//
// A page's scores live token-major, score[t * Sp + i] with the group padded to Sp in {1, 2, 4,
// 8} heads, so one vector holds 8 / Sp tokens of every head and lane l belongs to head l % Sp:
// the softmax and the rounding of its weights run on whole vectors, with every head's max and
// sum folded out of the lanes at once (a head-major page of 16 tokens spent more time in
// per-head horizontal reductions, and in reloading scores stored one float at a time, than in
// its dot products).
constexpr int kI8MaxHeadDim = 2048;

template <int S>
constexpr int kSp = S == 1 ? 1 : (S == 2 ? 2 : (S <= 4 ? 4 : 8));

// [sum(a[0]), ..., sum(a[7])] of eight float vectors.
inline __m256 Sum8(const __m256 (&a)[8]) {
  const __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                       _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

// Every lane l of the result combines (op) the lanes of v that belong to head l % Sp.
template <int Sp, class Op>
inline __m256 FoldHeads(__m256 v, Op op) {
  if constexpr (Sp <= 4) v = op(v, _mm256_permute2f128_ps(v, v, 1));
  if constexpr (Sp <= 2) v = op(v, _mm256_permute_ps(v, 0x4E));
  if constexpr (Sp == 1) v = op(v, _mm256_permute_ps(v, 0xB1));
  return v;
}
template <int Sp>
inline __m256 HeadMax(__m256 v) {
  return FoldHeads<Sp>(v, [](__m256 x, __m256 y) { return _mm256_max_ps(x, y); });
}
template <int Sp>
inline __m256 HeadSum(__m256 v) {
  return FoldHeads<Sp>(v, [](__m256 x, __m256 y) { return _mm256_add_ps(x, y); });
}

// Lane l = x[l / Sp] for the M tokens x[0 .. M) (M <= 8 / Sp, all of them read), 0 in the
// lanes after M * Sp.
template <int Sp, int M>
inline __m256 TokenLanes(const float* x) {
  static_assert(M * Sp <= 8 && (M == 1 || M == 2 || M == 4 || M == 8));
  if constexpr (Sp == 8) {
    return _mm256_set1_ps(x[0]);
  } else {
    __m256 v;
    if constexpr (M == 8) {
      v = _mm256_loadu_ps(x);
    } else {
      __m128 lo;
      if constexpr (M == 1) lo = _mm_load_ss(x);
      if constexpr (M == 2)  // (through __m128i, which may alias floats)
        lo = _mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(x)));
      if constexpr (M == 4) lo = _mm_loadu_ps(x);
      v = _mm256_insertf128_ps(_mm256_setzero_ps(), lo, 0);
    }
    // Lanes past M * Sp take lane M of v, which is 0 when M < 8.
    const auto at = [](int l) { return l < M * Sp ? l / Sp : M % 8; };
    return _mm256_permutevar8x32_ps(v, _mm256_setr_epi32(at(0), at(1), at(2), at(3), at(4),
                                                          at(5), at(6), at(7)));
  }
}

// Lane l = x[l % Sp] for heads l % Sp < S, else `pad`.
template <int S>
inline __m256 HeadLanes(const float* x, float pad) {
  constexpr int Sp = kSp<S>;
  alignas(32) float buf[8];
  for (int l = 0; l < 8; ++l) buf[l] = l % Sp < S ? x[l % Sp] : pad;
  return _mm256_load_ps(buf);
}

inline __m256i LoadI8x16(const uint8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// score[(t0 + u) * Sp + i] = q16_scale[i] * k_scale[t0 + u] * (q16[i] . k[t0 + u]) for u < TT,
// i < S (qscale = HeadLanes(q16_scale)); the vector store also writes the 8 - TT * Sp floats
// after them, which the next tokens overwrite (score has 8 floats of slack).
template <int S, int TT>
inline void ScoreTokensI8(const PageArgs& a, int t0, __m256 qscale, float* score) {
  constexpr int Sp = kSp<S>;
  static_assert(TT * Sp <= 8, "one Sum8 reduces the block");
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
  MOELENS_UNROLL for (int j = 0; j < 8; ++j) f[j] = _mm256_setzero_ps();
  MOELENS_UNROLL for (int u = 0; u < TT; ++u)
    MOELENS_UNROLL for (int i = 0; i < S; ++i) f[u * Sp + i] = _mm256_cvtepi32_ps(acc[u * S + i]);
  const __m256 kscale = TokenLanes<Sp, TT>(a.k_scale + t0);
  _mm256_storeu_ps(score + t0 * Sp, _mm256_mul_ps(Sum8(f), _mm256_mul_ps(qscale, kscale)));
}

// acc[i0 + j][c .. c + 16) += pscale[i0 + j] * sum_t w(t, i0 + j) * v_t[c .. c + 16), j < H,
// where pairs[t / 2][i] holds the 16-bit weights of tokens t, t + 1 (0 past the page's last
// token) of head i: V rows t and t + 1 interleaved as 16-bit pairs meet them in one vpmaddwd.
template <int H>
inline void AccumulateI8(const PageArgs& a, int c, int i0, const int32_t (*pairs)[8],
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
      const __m256i w = _mm256_set1_epi32(pairs[t / 2][i0 + j]);
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

// The online-softmax update of the float kernel (kernel::UpdateSoftmax) on token-major scores:
// on return score holds the page's unnormalised weights exp(score - m_new), 0 in the lanes past
// its last token.
template <int S>
inline void SoftmaxTokenMajor(const PageArgs& a, float* score) {
  constexpr int Sp = kSp<S>;
  const int nv = (a.ntok * Sp + 7) / 8;
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  // Lanes past the last token: -inf for the max, 0 for the weights.
  const __m256 tail = _mm256_castsi256_ps(_mm256_cmpgt_epi32(
      _mm256_set1_epi32(a.ntok * Sp - (nv - 1) * 8), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
  __m256 mx = ninf;
  for (int v = 0; v + 1 < nv; ++v) mx = _mm256_max_ps(mx, _mm256_loadu_ps(score + 8 * v));
  const __m256 last = _mm256_blendv_ps(ninf, _mm256_loadu_ps(score + 8 * (nv - 1)), tail);
  mx = HeadMax<Sp>(_mm256_max_ps(mx, last));
  const __m256 m_old = HeadLanes<S>(a.m, 0.f);
  const __m256 m_new = _mm256_max_ps(mx, m_old);  // a NaN score leaves m as it was, as in float
  // exp(-inf) = 0 on the first page (as the clamped exp's ~1e-38: l and acc are still 0).
  const __m256 corr = _mm256_blendv_ps(Avx2Ops::Exp(_mm256_sub_ps(m_old, m_new)),
                                       _mm256_set1_ps(1.f),
                                       _mm256_cmp_ps(m_old, m_new, _CMP_EQ_OQ));
  __m256 sum = _mm256_setzero_ps();
  for (int v = 0; v < nv; ++v) {
    __m256 e = Avx2Ops::Exp(_mm256_sub_ps(_mm256_loadu_ps(score + 8 * v), m_new));
    if (v + 1 == nv) e = _mm256_and_ps(e, tail);
    _mm256_storeu_ps(score + 8 * v, e);
    sum = _mm256_add_ps(sum, e);
  }
  sum = HeadSum<Sp>(sum);
  alignas(32) float mn[8], cr[8], sm[8];
  _mm256_store_ps(mn, m_new);
  _mm256_store_ps(cr, corr);
  _mm256_store_ps(sm, sum);
  for (int i = 0; i < S; ++i) {
    a.l[i] = a.l[i] * cr[i] + sm[i];
    a.m[i] = mn[i];
    if (cr[i] != 1.f) {
      const __m256 cv = _mm256_set1_ps(cr[i]);
      float* row = a.acc + i * a.head_dim;
      for (int c = 0; c < a.head_dim; c += 8)
        _mm256_storeu_ps(row + c, _mm256_mul_ps(_mm256_loadu_ps(row + c), cv));
    }
  }
}

// Rounds the weights p (token-major, from SoftmaxTokenMajor) times each token's V scale to 16
// bits per head, w * pscale[i], into token pairs for AccumulateI8. False (nothing usable
// written) when a product is not finite, or so small that its head's 32767 / max overflows
// (every score ~80 below the running max): the float path keeps the semantics then.
template <int S>
inline bool QuantiseWeights(const PageArgs& a, const float* p, int32_t (*pairs)[8],
                            float* pscale) {
  constexpr int Sp = kSp<S>;
  constexpr int N = 8 / Sp;  // tokens per vector
  const int ntok = a.ntok;
  const int nv = (ntok * Sp + 7) / 8;
  alignas(32) float pf[kMaxPageSize * Sp + 8];
  alignas(32) int32_t w[kMaxPageSize * Sp + 8];
  __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
  for (int v = 0; v < nv; ++v) {
    const float* vs = a.v_scale + v * N;
    const int n = std::min(N, ntok - v * N);
    alignas(32) float tail[N] = {};  // the page's last tokens: never read past them
    if (n < N) {
      std::copy_n(vs, n, tail);
      vs = tail;
    }
    const __m256 x = _mm256_mul_ps(_mm256_loadu_ps(p + 8 * v), TokenLanes<Sp, N>(vs));
    _mm256_store_ps(pf + 8 * v, x);
    mx = _mm256_max_ps(mx, x);
    sum = _mm256_add_ps(sum, x);  // NaN and infinity survive a sum, not always a max
  }
  mx = HeadMax<Sp>(mx);
  sum = HeadSum<Sp>(sum);
  const __m256 inv = _mm256_div_ps(_mm256_set1_ps(32767.f), mx);  // inf for a max of 0
  // Finite sum and 32767 / max (a head whose weights are all 0 gets scale 0 and zero weights).
  const __m256 ok = _mm256_and_ps(
      _mm256_cmp_ps(_mm256_sub_ps(sum, sum), _mm256_setzero_ps(), _CMP_EQ_OQ),
      _mm256_or_ps(_mm256_cmp_ps(mx, _mm256_setzero_ps(), _CMP_EQ_OQ),
                   _mm256_cmp_ps(inv, _mm256_set1_ps(std::numeric_limits<float>::max()),
                                 _CMP_LE_OQ)));
  constexpr int kHeads = (1 << S) - 1;
  if ((_mm256_movemask_ps(ok) & kHeads) != kHeads) return false;
  const __m256 iv = _mm256_and_ps(inv, _mm256_cmp_ps(mx, _mm256_setzero_ps(), _CMP_NEQ_OQ));
  alignas(32) float m[8];
  _mm256_store_ps(m, mx);
  for (int i = 0; i < S; ++i) pscale[i] = m[i] / 32767.f;
  for (int v = 0; v < nv; ++v) {
    const __m256i x = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(pf + 8 * v), iv));
    _mm256_store_si256(reinterpret_cast<__m256i*>(w + 8 * v), _mm256_min_epi32(
        x, _mm256_set1_epi32(32767)));
  }
  for (int t = 0; t < ntok; t += 2) {
    const int32_t* w0 = w + t * Sp;
    const int32_t* w1 = t + 1 < ntok ? w0 + Sp : nullptr;
    for (int i = 0; i < S; ++i)
      pairs[t / 2][i] = (w0[i] & 0xffff) | (w1 != nullptr ? int32_t(uint32_t(w1[i]) << 16) : 0);
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
  constexpr int Sp = kSp<S>;
  constexpr int TT = kernel::kTokStep<S>;
  const int d = a.head_dim;
  const int ntok = a.ntok;
  alignas(64) float score[kMaxPageSize * Sp + 8];
  kernel::PrefetchRow<Avx2Ops>(reinterpret_cast<const uint8_t*>(a.v_scale), 4 * ntok);
  const __m256 qscale = HeadLanes<S>(a.q16_scale, 0.f);
  int t = 0;
  for (; t + TT <= ntok; t += TT) {
    for (int u = 0; u < TT; ++u) kernel::PrefetchRow<Avx2Ops>(a.v + int64_t(t + u) * d, d);
    ScoreTokensI8<S, TT>(a, t, qscale, score);
  }
  for (; t < ntok; ++t) {
    kernel::PrefetchRow<Avx2Ops>(a.v + int64_t(t) * d, d);
    ScoreTokensI8<S, 1>(a, t, qscale, score);
  }
  if (a.next != nullptr) kernel::PrefetchRow<Avx2Ops>(a.next, a.next_bytes);

  SoftmaxTokenMajor<S>(a, score);

  alignas(32) int32_t pairs[kMaxPageSize / 2 + 1][8];
  float pscale[S];
  if (!QuantiseWeights<S>(a, score, pairs, pscale)) {
    alignas(64) float p[S][kMaxPageSize];  // the float path's head-major weights
    for (int i = 0; i < S; ++i)
      for (int u = 0; u < ntok; ++u) p[i][u] = score[u * Sp + i];
    kernel::AccumulatePage<Avx2Ops, kernel::TagI8, S>(a, p);
    return;
  }
  constexpr int H = S < 4 ? S : 4;  // heads per pass: 2 H int32 accumulators in registers
  for (int c = 0; c < d; c += 16) {
    int i0 = 0;
    for (; i0 + H <= S; i0 += H) AccumulateI8<H>(a, c, i0, pairs, pscale);
    if constexpr (S % H != 0) AccumulateI8<S % H>(a, c, i0, pairs, pscale);
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
