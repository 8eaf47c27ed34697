// The expert FFN's own kernels, written once over the ISA `Ops` trait of attention_impl.h and
// compiled per ISA (attention_{portable,avx2,avx512}.cc instantiate them; the two GEMMs only
// for AVX2 and AVX-512, where they beat OpenBLAS on small groups):
// - the elementwise stage a[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i],
//   optionally rounded to bfloat16 (round to nearest even) and widened back, so a bf16
//   model's down projection sees exactly the bf16 activations XLA would feed it;
// - SmallGemm (decode-sized groups, no packing) and PackedGemm (up to a few dozen rows).
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

// C[M, N] = A[M, K] @ B[K, N] for an expert group of up to a few dozen rows: B (row-major,
// float32 or bfloat16) is read row by row, kc = min(kPackK, rows left) rows at a time, into
// column panels of two vectors (NR = 2 lanes: [ceil(N / NR)][kc][NR] float32, the last panel
// zero-padded; bf16 widened here), and a register block of up to 6 rows x 2 vectors runs down
// each panel from L1/L2 (the first block of rows writes C, later ones add to it). Reading B in
// rows streams it from memory at full bandwidth; the panels make the inner loop two
// contiguous loads per step. `pack` holds kPackK x PackedCols(N) floats; k > 0. Leading
// dimensions in elements.
constexpr int64_t kPackK = 256;
inline int64_t PackedCols(int64_t n) { return (n + 31) / 32 * 32; }  // covers 8 and 16 lanes
using PackedGemmFn = void (*)(const float* a, int64_t lda, const void* b, int64_t ldb,
                              bool bf16, float* c, int64_t ldc, int64_t m, int64_t n,
                              int64_t k, float* pack);
PackedGemmFn GetPackedGemmAvx2();
PackedGemmFn GetPackedGemmAvx512();

namespace kernel {

inline float RoundToBf16(float x) { return Bf16ToF32(F32ToBf16(x)); }

// One weight as float32 from `elem` bytes at p (2: bfloat16, 4: float32); the GEMMs' tails.
inline float LoadWeight(const uint8_t* p, int64_t elem) {
  if (elem == 2) {
    uint16_t bits;
    std::memcpy(&bits, p, 2);
    return Bf16ToF32(bits);
  }
  float v;
  std::memcpy(&v, p, 4);
  return v;
}

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
        sum += a[r * lda + kk] * LoadWeight(b + (kk * ldb + col) * elem, elem);
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

// Panels of B[0, kc) x [0, n) (row-major, `ldb_bytes` per row) -> pack[n / NR][kc][NR].
template <class Ops, class Tag>
void PackPanels(const uint8_t* b, int64_t ldb_bytes, int64_t elem, int64_t kc, int64_t n,
                float* pack) {
  constexpr int VL = Ops::kLanes, NR = 2 * VL;
  const int64_t full = n / NR, panels = (n + NR - 1) / NR;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const uint8_t* row = b + kk * ldb_bytes;
    for (int64_t j = 0; j < full; ++j) {
      float* d = pack + (j * kc + kk) * NR;
      Ops::Store(d, Ops::Load(Tag{}, row + j * NR * elem));
      Ops::Store(d + VL, Ops::Load(Tag{}, row + (j * NR + VL) * elem));
    }
    if (full < panels) {  // tail columns, zero-padded to the panel width
      float* d = pack + (full * kc + kk) * NR;
      for (int64_t c = 0; c < NR; ++c) {
        const int64_t col = full * NR + c;
        d[c] = col < n ? LoadWeight(row + col * elem, elem) : 0.f;
      }
    }
  }
}

// C[0, RB) x [0, nc) (+)= A[0, RB) x [0, kc) @ one packed panel [kc][2 lanes]; nc <= 2 lanes.
template <class Ops, int RB>
inline void PanelBlock(const float* a, int64_t lda, const float* panel, int64_t kc, float* c,
                       int64_t ldc, int64_t nc, bool accumulate) {
  constexpr int VL = Ops::kLanes, NR = 2 * VL;
  typename Ops::Vec acc[RB][2];
  MOELENS_UNROLL for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = Ops::Zero();
  for (int64_t kk = 0; kk < kc; ++kk) {
    const auto b0 = Ops::LoadF(panel + kk * NR), b1 = Ops::LoadF(panel + kk * NR + VL);
    MOELENS_UNROLL for (int r = 0; r < RB; ++r) {
      const auto av = Ops::Set1(a[r * lda + kk]);
      acc[r][0] = Ops::Fma(av, b0, acc[r][0]);
      acc[r][1] = Ops::Fma(av, b1, acc[r][1]);
    }
  }
  if (nc == NR) {
    MOELENS_UNROLL for (int r = 0; r < RB; ++r) {
      float* cr = c + r * ldc;
      if (accumulate) {
        acc[r][0] = Ops::Add(acc[r][0], Ops::LoadF(cr));
        acc[r][1] = Ops::Add(acc[r][1], Ops::LoadF(cr + VL));
      }
      Ops::Store(cr, acc[r][0]);
      Ops::Store(cr + VL, acc[r][1]);
    }
    return;
  }
  float t[NR];
  MOELENS_UNROLL for (int r = 0; r < RB; ++r) {
    Ops::Store(t, acc[r][0]);
    Ops::Store(t + VL, acc[r][1]);
    float* cr = c + r * ldc;
    for (int64_t j = 0; j < nc; ++j) cr[j] = accumulate ? cr[j] + t[j] : t[j];
  }
}

template <class Ops, class Tag>
void PackedGemmTyped(const float* a, int64_t lda, const uint8_t* b, int64_t ldb, float* c,
                     int64_t ldc, int64_t m, int64_t n, int64_t k, float* pack) {
  constexpr int NR = 2 * Ops::kLanes;
  static_assert(32 % NR == 0, "PackedCols must round to a multiple of the panel width");
  const int64_t elem = std::is_same<Tag, TagBf16>::value ? 2 : 4;
  const int64_t panels = (n + NR - 1) / NR;
  for (int64_t k0 = 0; k0 < k; k0 += kPackK) {
    const int64_t kc = std::min(kPackK, k - k0);
    PackPanels<Ops, Tag>(b + k0 * ldb * elem, ldb * elem, elem, kc, n, pack);
    const float* a0 = a + k0;
    for (int64_t j = 0; j < panels; ++j) {
      const float* panel = pack + j * kc * NR;
      const int64_t nc = std::min<int64_t>(NR, n - j * NR);
      float* cj = c + j * NR;
      const bool acc = k0 > 0;
      int64_t r = 0;
      for (; r + 6 <= m; r += 6) {
        PanelBlock<Ops, 6>(a0 + r * lda, lda, panel, kc, cj + r * ldc, ldc, nc, acc);
      }
      const float* ar = a0 + r * lda;
      float* cr = cj + r * ldc;
      switch (m - r) {
        case 5: PanelBlock<Ops, 5>(ar, lda, panel, kc, cr, ldc, nc, acc); break;
        case 4: PanelBlock<Ops, 4>(ar, lda, panel, kc, cr, ldc, nc, acc); break;
        case 3: PanelBlock<Ops, 3>(ar, lda, panel, kc, cr, ldc, nc, acc); break;
        case 2: PanelBlock<Ops, 2>(ar, lda, panel, kc, cr, ldc, nc, acc); break;
        case 1: PanelBlock<Ops, 1>(ar, lda, panel, kc, cr, ldc, nc, acc); break;
        default: break;
      }
    }
  }
}

template <class Ops>
void PackedGemm(const float* a, int64_t lda, const void* b, int64_t ldb, bool bf16, float* c,
                int64_t ldc, int64_t m, int64_t n, int64_t k, float* pack) {
  const auto* bb = static_cast<const uint8_t*>(b);
  if (bf16) {
    PackedGemmTyped<Ops, TagBf16>(a, lda, bb, ldb, c, ldc, m, n, k, pack);
  } else {
    PackedGemmTyped<Ops, TagF32>(a, lda, bb, ldb, c, ldc, m, n, k, pack);
  }
}

}  // namespace kernel
}  // namespace moelens
