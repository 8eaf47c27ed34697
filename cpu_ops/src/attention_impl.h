// The decode-attention page kernel, written once over a small vector-ops trait `Ops` and
// compiled per ISA (attention_{portable,avx2,avx512}.cc include this header with their own
// Ops and compiler flags). Pure compute on raw pointers; all validation happened upstream.
//
// Ops provides: kLanes; kHasF16; Vec; Zero(); LoadF(const float*); Load(Tag, const uint8_t*)
// converting the storage type to float32 lanes (the 8-bit formats to their unscaled code
// values: the kernel applies each token's scale to its score and its softmax weight);
// Set1(float); Fma(a, b, c) = a*b + c;
// Mul/Add/Sub/Min/Max(a, b); Round (to nearest integer), Pow2 (2^n for integral n); Exp(Vec)
// (float32-accurate, usually CephesExp); Store(float*, Vec); Sum(Vec) (horizontal add);
// MaxAll(Vec) (horizontal max); Prefetch(const void*).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "attention.h"

// Fully unrolls a loop over a compile-time register block, so the block's array of vectors is
// kept in registers. Without it GCC keeps arrays of more than a few vectors on the stack and
// stores every accumulator on every step (measured on AVX2: a 6x2 FMA block ran at half speed).
#define MOELENS_UNROLL _Pragma("GCC unroll 16")

namespace moelens {
namespace kernel {

// Cephes-style expf for any Ops: range reduction x = n ln2 + r (|r| <= ln2/2), a degree-6
// polynomial, 2^n from the exponent bits (Ops::Round, Ops::Pow2). Relative error ~1e-7 on
// [-87.3, 88.3]; inputs are clamped to that range, and a NaN stays NaN (x86 min/max return
// their second operand when either is NaN, so x goes second).
template <class Ops>
inline typename Ops::Vec CephesExp(typename Ops::Vec x) {
  using Vec = typename Ops::Vec;
  x = Ops::Min(Ops::Set1(88.3f), Ops::Max(Ops::Set1(-87.3f), x));
  const Vec n = Ops::Round(Ops::Mul(x, Ops::Set1(1.44269504088896341f)));
  Vec r = Ops::Fma(n, Ops::Set1(-0.693359375f), x);
  r = Ops::Fma(n, Ops::Set1(2.12194440e-4f), r);
  Vec y = Ops::Set1(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f,
                  5.0000001201e-1f}) {
    y = Ops::Fma(y, r, Ops::Set1(c));
  }
  y = Ops::Fma(y, Ops::Mul(r, r), Ops::Add(r, Ops::Set1(1.f)));
  return Ops::Mul(y, Ops::Pow2(n));
}

struct TagBf16 {};
struct TagF16 {};
struct TagF32 {};
struct TagI8 {};
struct TagF8E4M3 {};

// Independent FMA chains: K rows (tokens) per step and V column blocks per step are chosen so
// about 8 accumulators are live (enough to hide FMA latency, few enough for 16 registers).
template <int S>
constexpr int kTokStep = S >= 5 ? 1 : (S >= 3 ? 2 : 4);

template <class Ops>
inline void PrefetchRow(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) Ops::Prefetch(p + off);
}

// scores[i][t] = q_i . k_t for tokens [t0, t0 + TT) of one page block.
template <class Ops, class Tag, int S, int TT>
inline void ScoreTokens(const float* q, const uint8_t* kb, int d, int64_t elem, int t0,
                        float (*score)[kMaxPageSize]) {
  constexpr int VL = Ops::kLanes;
  using Vec = typename Ops::Vec;
  Vec acc[TT][S];
  MOELENS_UNROLL for (int u = 0; u < TT; ++u)
    MOELENS_UNROLL for (int i = 0; i < S; ++i) acc[u][i] = Ops::Zero();
  for (int c = 0; c < d; c += VL) {
    Vec kv[TT];
    MOELENS_UNROLL for (int u = 0; u < TT; ++u) kv[u] = Ops::Load(Tag{}, kb + (int64_t(t0 + u) * d + c) * elem);
    MOELENS_UNROLL for (int i = 0; i < S; ++i) {
      const Vec qv = Ops::LoadF(q + i * d + c);
      MOELENS_UNROLL for (int u = 0; u < TT; ++u) acc[u][i] = Ops::Fma(qv, kv[u], acc[u][i]);
    }
  }
  MOELENS_UNROLL for (int u = 0; u < TT; ++u)
    MOELENS_UNROLL for (int i = 0; i < S; ++i) score[i][t0 + u] = Ops::Sum(acc[u][i]);
}

// acc[i][c .. c + CC*VL) += sum_t p[i][t] * v_t[c .. c + CC*VL) over the page's tokens.
template <class Ops, class Tag, int S, int CC>
inline void AccumulateValues(float* out, const uint8_t* vb, int d, int64_t elem, int ntok, int c,
                             const float (*p)[kMaxPageSize]) {
  constexpr int VL = Ops::kLanes;
  using Vec = typename Ops::Vec;
  Vec o[CC][S];
  MOELENS_UNROLL for (int w = 0; w < CC; ++w)
    MOELENS_UNROLL for (int i = 0; i < S; ++i) o[w][i] = Ops::LoadF(out + i * d + c + w * VL);
  for (int t = 0; t < ntok; ++t) {
    Vec vv[CC];
    const uint8_t* row = vb + (int64_t(t) * d + c) * elem;
    MOELENS_UNROLL for (int w = 0; w < CC; ++w) vv[w] = Ops::Load(Tag{}, row + int64_t(w) * VL * elem);
    MOELENS_UNROLL for (int i = 0; i < S; ++i) {
      const Vec pv = Ops::Set1(p[i][t]);
      MOELENS_UNROLL for (int w = 0; w < CC; ++w) o[w][i] = Ops::Fma(pv, vv[w], o[w][i]);
    }
  }
  MOELENS_UNROLL for (int w = 0; w < CC; ++w)
    MOELENS_UNROLL for (int i = 0; i < S; ++i) Ops::Store(out + i * d + c + w * VL, o[w][i]);
}

// Online-softmax update of the running state (m, l, acc) with one page's scores; on return
// score[i][t] holds exp(score - m_new), the page's unnormalised softmax weights.
template <class Ops, int S>
inline void UpdateSoftmax(const PageArgs& a, float (*score)[kMaxPageSize]) {
  constexpr int VL = Ops::kLanes;
  using Vec = typename Ops::Vec;
  const int d = a.head_dim;
  const int ntok = a.ntok;
  for (int i = 0; i < S; ++i) {
    Vec mxv = Ops::Set1(-std::numeric_limits<float>::infinity());
    int t = 0;
    for (; t + VL <= ntok; t += VL) mxv = Ops::Max(mxv, Ops::LoadF(&score[i][t]));
    float mx = Ops::MaxAll(mxv);
    for (; t < ntok; ++t) mx = std::max(mx, score[i][t]);
    const float m_old = a.m[i];
    const float m_new = std::max(m_old, mx);
    // exp(-inf) = 0 on the first page; once the running max settles most pages skip the exp.
    const float corr = m_new == m_old ? 1.f : std::exp(m_old - m_new);
    const Vec mv = Ops::Set1(m_new);
    Vec sv = Ops::Zero();
    int u = 0;
    for (; u + VL <= ntok; u += VL) {
      const Vec e = Ops::Exp(Ops::Sub(Ops::LoadF(&score[i][u]), mv));
      Ops::Store(&score[i][u], e);
      sv = Ops::Add(sv, e);
    }
    float sum = Ops::Sum(sv);
    for (; u < ntok; ++u) {
      score[i][u] = std::exp(score[i][u] - m_new);
      sum += score[i][u];
    }
    a.l[i] = a.l[i] * corr + sum;
    a.m[i] = m_new;
    if (corr != 1.f) {
      const Vec cv = Ops::Set1(corr);
      float* row = a.acc + i * d;
      for (int c = 0; c < d; c += VL) Ops::Store(row + c, Ops::Mul(Ops::LoadF(row + c), cv));
    }
  }
}

// acc += p V over the whole page (an 8-bit store's V scales first folded into p: p_t (s_t v_t)
// = (p_t s_t) v_t, after l took the plain p_t); accumulators of CC column blocks stay in
// registers across the page's tokens.
template <class Ops, class Tag, int S>
inline void AccumulatePage(const PageArgs& a, float (*p)[kMaxPageSize]) {
  constexpr int VL = Ops::kLanes;
  constexpr int CC = kTokStep<S>;
  const int d = a.head_dim;
  if (a.v_scale != nullptr) {
    for (int i = 0; i < S; ++i)
      for (int u = 0; u < a.ntok; ++u) p[i][u] *= a.v_scale[u];
  }
  int c = 0;
  for (; c + CC * VL <= d; c += CC * VL)
    AccumulateValues<Ops, Tag, S, CC>(a.acc, a.v, d, a.elem_bytes, a.ntok, c, p);
  for (; c < d; c += VL) {
    AccumulateValues<Ops, Tag, S, 1>(a.acc, a.v, d, a.elem_bytes, a.ntok, c, p);
  }
}

// One page block of one kv head for S query heads: scores, online-softmax update of the running
// state (m, l, acc), and acc += p V. `next` (may be null) is prefetched during the PV pass.
template <class Ops, class Tag, int S>
void ProcessPage(const PageArgs& a) {
  constexpr int TT = kTokStep<S>;
  const int d = a.head_dim;
  const int ntok = a.ntok;
  const int64_t elem = a.elem_bytes;
  const int64_t row_bytes = int64_t(d) * elem;
  alignas(64) float score[S][kMaxPageSize];

  // Scores: each K row is loaded once and dotted with all S query heads. Meanwhile the V rows
  // are prefetched (the PV pass reads them column block by column block, a pattern the
  // hardware prefetcher follows poorly).
  int t = 0;
  for (; t + TT <= ntok; t += TT) {
    for (int u = 0; u < TT; ++u) PrefetchRow<Ops>(a.v + int64_t(t + u) * row_bytes, row_bytes);
    ScoreTokens<Ops, Tag, S, TT>(a.q, a.k, d, elem, t, score);
  }
  for (; t < ntok; ++t) {
    PrefetchRow<Ops>(a.v + int64_t(t) * row_bytes, row_bytes);
    ScoreTokens<Ops, Tag, S, 1>(a.q, a.k, d, elem, t, score);
  }
  if (a.next != nullptr) PrefetchRow<Ops>(a.next, a.next_bytes);
  if (a.k_scale != nullptr) {  // q . (s_t k_t) = s_t (q . k_t)
    for (int i = 0; i < S; ++i)
      for (int u = 0; u < ntok; ++u) score[i][u] *= a.k_scale[u];
  }

  UpdateSoftmax<Ops, S>(a, score);

  AccumulatePage<Ops, Tag, S>(a, score);
}

template <class Ops, class Tag>
PageFn ForGroup(int s) {
  switch (s) {
    case 1: return &ProcessPage<Ops, Tag, 1>;
    case 2: return &ProcessPage<Ops, Tag, 2>;
    case 3: return &ProcessPage<Ops, Tag, 3>;
    case 4: return &ProcessPage<Ops, Tag, 4>;
    case 5: return &ProcessPage<Ops, Tag, 5>;
    case 6: return &ProcessPage<Ops, Tag, 6>;
    case 7: return &ProcessPage<Ops, Tag, 7>;
    case 8: return &ProcessPage<Ops, Tag, 8>;
  }
  return nullptr;
}

template <class Ops>
PageFn Select(KvDtype dtype, int head_dim, int s) {
  if (head_dim % Ops::kLanes != 0 || s < 1 || s > kMaxGroup) return nullptr;
  switch (dtype) {
    case KvDtype::kBf16: return ForGroup<Ops, TagBf16>(s);
    case KvDtype::kF16: return Ops::kHasF16 ? ForGroup<Ops, TagF16>(s) : nullptr;
    case KvDtype::kF32: return ForGroup<Ops, TagF32>(s);
    case KvDtype::kI8: return ForGroup<Ops, TagI8>(s);
    case KvDtype::kF8E4M3: return ForGroup<Ops, TagF8E4M3>(s);
  }
  return nullptr;
}

}  // namespace kernel
}  // namespace moelens
