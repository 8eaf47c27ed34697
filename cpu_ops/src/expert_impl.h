// The expert FFN's elementwise stage, written once over the ISA `Ops` trait of
// attention_impl.h and compiled per ISA (attention_{portable,avx2,avx512}.cc instantiate it):
//   a[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i]
// optionally rounded to bfloat16 (round to nearest even) and widened back, so a bf16 model's
// down projection sees exactly the bf16 activations XLA would feed it.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attention_impl.h"
#include "dtypes.h"

namespace moelens {

// a[0, n) = silu(g) * u; g/u/a may alias (a == g is the engine's in-place use).
using SiluMulFn = void (*)(const float* g, const float* u, float* a, int64_t n, bool round_bf16);

SiluMulFn GetSiluMulPortable();
SiluMulFn GetSiluMulAvx2();
SiluMulFn GetSiluMulAvx512();

// C[M, N] = A[M, K] @ B[K, N] for the few rows of a decode-sized expert group, streaming B
// (float32 or bfloat16, widened in registers) once with no packing: blocks of up to 4 rows x
// 2 vectors of columns held in registers, B rows prefetched ahead. Leading dimensions in
// elements. Null where the ISA has no such kernel.
using SmallGemmFn = void (*)(const float* a, int64_t lda, const void* b, int64_t ldb, bool bf16,
                             float* c, int64_t ldc, int64_t m, int64_t n, int64_t k);
SmallGemmFn GetSmallGemmPortable();
SmallGemmFn GetSmallGemmAvx2();
SmallGemmFn GetSmallGemmAvx512();

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

// Rows [0, RB) x columns [c, c + CB * VL) of C.
template <class Ops, class Tag, int RB, int CB>
inline void SmallGemmBlock(const float* a, int64_t lda, const uint8_t* b, int64_t ldb_bytes,
                           int64_t elem, float* c, int64_t ldc, int64_t col, int64_t k) {
  constexpr int VL = Ops::kLanes;
  constexpr int64_t kAhead = 16;  // B rows prefetched ahead (strided rows defeat the prefetcher)
  typename Ops::Vec acc[RB][CB];
  MOELENS_UNROLL for (int r = 0; r < RB; ++r)
    MOELENS_UNROLL for (int j = 0; j < CB; ++j) acc[r][j] = Ops::Zero();
  const uint8_t* bp = b + col * elem;
  for (int64_t kk = 0; kk < k; ++kk, bp += ldb_bytes) {
    if (kk + kAhead < k) Ops::Prefetch(bp + kAhead * ldb_bytes);
    typename Ops::Vec bv[CB];
    MOELENS_UNROLL for (int j = 0; j < CB; ++j) bv[j] = Ops::Load(Tag{}, bp + int64_t(j) * VL * elem);
    MOELENS_UNROLL for (int r = 0; r < RB; ++r) {
      const auto av = Ops::Set1(a[r * lda + kk]);
      MOELENS_UNROLL for (int j = 0; j < CB; ++j) acc[r][j] = Ops::Fma(av, bv[j], acc[r][j]);
    }
  }
  MOELENS_UNROLL for (int r = 0; r < RB; ++r)
    MOELENS_UNROLL for (int j = 0; j < CB; ++j) Ops::Store(c + r * ldc + col + j * VL, acc[r][j]);
}

template <class Ops, class Tag, int RB>
inline void SmallGemmRows(const float* a, int64_t lda, const uint8_t* b, int64_t ldb, float* c,
                          int64_t ldc, int64_t n, int64_t k) {
  constexpr int VL = Ops::kLanes;
  const int64_t elem = std::is_same<Tag, TagBf16>::value ? 2 : 4;
  const int64_t ldb_bytes = ldb * elem;
  int64_t col = 0;
  for (; col + 2 * VL <= n; col += 2 * VL)
    SmallGemmBlock<Ops, Tag, RB, 2>(a, lda, b, ldb_bytes, elem, c, ldc, col, k);
  for (; col + VL <= n; col += VL)
    SmallGemmBlock<Ops, Tag, RB, 1>(a, lda, b, ldb_bytes, elem, c, ldc, col, k);
  for (; col < n; ++col) {  // tail columns
    for (int r = 0; r < RB; ++r) {
      float sum = 0.f;
      for (int64_t kk = 0; kk < k; ++kk) {
        const uint8_t* p = b + (kk * ldb + col) * elem;
        float bvf;
        if (elem == 2) {
          uint16_t hbits;
          std::memcpy(&hbits, p, 2);
          bvf = Bf16ToF32(hbits);
        } else {
          std::memcpy(&bvf, p, 4);
        }
        sum += a[r * lda + kk] * bvf;
      }
      c[r * ldc + col] = sum;
    }
  }
}

template <class Ops, class Tag>
void SmallGemmTyped(const float* a, int64_t lda, const uint8_t* b, int64_t ldb, float* c,
                    int64_t ldc, int64_t m, int64_t n, int64_t k) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) SmallGemmRows<Ops, Tag, 4>(a + r * lda, lda, b, ldb, c + r * ldc,
                                                          ldc, n, k);
  switch (m - r) {
    case 3: SmallGemmRows<Ops, Tag, 3>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, n, k); break;
    case 2: SmallGemmRows<Ops, Tag, 2>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, n, k); break;
    case 1: SmallGemmRows<Ops, Tag, 1>(a + r * lda, lda, b, ldb, c + r * ldc, ldc, n, k); break;
    default: break;
  }
}

template <class Ops>
void SmallGemm(const float* a, int64_t lda, const void* b, int64_t ldb, bool bf16, float* c,
               int64_t ldc, int64_t m, int64_t n, int64_t k) {
  const auto* bb = static_cast<const uint8_t*>(b);
  if (bf16) {
    SmallGemmTyped<Ops, TagBf16>(a, lda, bb, ldb, c, ldc, m, n, k);
  } else {
    SmallGemmTyped<Ops, TagF32>(a, lda, bb, ldb, c, ldc, m, n, k);
  }
}

}  // namespace kernel
}  // namespace moelens
