// The expert FFN's own kernels, written once over the ISA `Ops` trait of attention_impl.h and
// compiled per ISA (attention_{portable,avx2,avx512}.cc instantiate them; the two GEMMs only
// for AVX2 and AVX-512, where they beat OpenBLAS on small groups):
// - the elementwise stage a[i] = silu(g[i]) * u[i] = g[i] / (1 + exp(-g[i])) * u[i],
//   optionally rounded to bfloat16 (round to nearest even) and widened back, so a bf16
//   model's down projection sees exactly the bf16 activations XLA would feed it;
// - SmallGemm (decode-sized bf16, int8 and int4 groups, no packing; codes dequantised in
//   registers) and PackedGemm (up to a few dozen rows; every `WeightDtype`: int8 / int4 codes
//   are dequantised while the panels are packed).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "attention_impl.h"
#include "dtypes.h"
#include "expert_ffn.h"

namespace moelens {

// A column block of one expert matrix B[k, n] (x @ B) as the GEMMs read it.
struct WeightView {
  const uint8_t* b = nullptr;  // the block's element (0, 0) (int4: its byte row 0)
  int64_t ld = 0;              // elements per stored row (int8 / int4: bytes)
  WeightDtype fmt = WeightDtype::kF32;
  const float* scale = nullptr;  // quantised: scale row 0 at the block's first column
  int64_t group = 1;             // quantised: input rows per scale row (int8: >= k)
  bool quantised() const { return fmt == WeightDtype::kInt8 || fmt == WeightDtype::kInt4; }
};

// a[0, n) = silu(g) * u; g/u/a may alias (a == g is the engine's in-place use).
using SiluMulFn = void (*)(const float* g, const float* u, float* a, int64_t n, bool round_bf16);

SiluMulFn GetSiluMulPortable();
SiluMulFn GetSiluMulAvx2();
SiluMulFn GetSiluMulAvx512();

// C[M, N] = A[M, K] @ B[K, N] for the few rows of a decode-sized expert group, streaming B
// (any `WeightDtype`: bf16 widened, int8 / int4 dequantised in registers) once with no
// packing: blocks of up to 4 rows x 2 vectors of columns held in registers, B rows prefetched
// ahead. Leading dimensions in elements. Null where the ISA has no such kernel.
using SmallGemmFn = void (*)(const float* a, int64_t lda, const WeightView& w, float* c,
                             int64_t ldc, int64_t m, int64_t n, int64_t k);
SmallGemmFn GetSmallGemmAvx2();
SmallGemmFn GetSmallGemmAvx512();

// C[M, N] = A[M, K] @ B[K, N] for an expert group of up to a few dozen rows: B (row-major,
// any `WeightDtype`) is read row by row, kc = min(kPackK, rows left) rows at a time, into
// column panels of two vectors (NR = 2 lanes: [ceil(N / NR)][kc][NR] float32, the last panel
// zero-padded; bf16 widened and int8 / int4 dequantised here), and a register block of up to
// 6 rows x 2 vectors runs down each panel from L1/L2 (the first block of rows writes C, later
// ones add to it). Reading B in
// rows streams it from memory at full bandwidth; the panels make the inner loop two
// contiguous loads per step. `pack` holds kPackK x PackedCols(N) floats; k > 0. Leading
// dimensions in elements.
constexpr int64_t kPackK = 256;
inline int64_t PackedCols(int64_t n) { return (n + 31) / 32 * 32; }  // covers 8 and 16 lanes
using PackedGemmFn = void (*)(const float* a, int64_t lda, const WeightView& w, float* c,
                              int64_t ldc, int64_t m, int64_t n, int64_t k, float* pack);
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

// The int4 code of row 2j (`high` false: the low nibble) or 2j + 1 (high) in byte j,
// sign-extended (`weights.quantise`'s packing; Ops::LoadI4 is the vector form).
inline int32_t Int4Code(uint8_t byte, bool high) {
  return int32_t(uint32_t(byte) << (high ? 24 : 28)) >> 28;
}

// Element (r, c) of a quantised block: code x scale in float32 (what `weights.dequantise`
// gives before it rounds to the model dtype).
inline float QuantWeight(const WeightView& w, int64_t r, int64_t c) {
  const int32_t code = w.fmt == WeightDtype::kInt4 ? Int4Code(w.b[(r >> 1) * w.ld + c], r & 1)
                                                   : int32_t(int8_t(w.b[r * w.ld + c]));
  return float(code) * w.scale[(r / w.group) * w.ld + c];
}

// Element (r, c) of a block in any format, as float32.
inline float WeightAt(const WeightView& w, int64_t r, int64_t c) {
  if (w.quantised()) return QuantWeight(w, r, c);
  const int64_t elem = w.fmt == WeightDtype::kBf16 ? 2 : 4;
  return LoadWeight(w.b + (r * w.ld + c) * elem, elem);
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

// Rows [0, RB) x columns [col, col + CB * VL) of C, B streamed row by row from `w` in its
// stored format `Fmt`: bf16 widened; int4 codes times their scale row; int8 codes summed as
// they are and the column scales applied once at the end (C = (A @ codes) x scale).
template <class Ops, WeightDtype Fmt, int RB, int CB>
inline void SmallGemmBlock(const float* a, int64_t lda, const WeightView& w, float* c,
                           int64_t ldc, int64_t col, int64_t k) {
  constexpr int VL = Ops::kLanes;
  constexpr int64_t kAhead = 16;  // B rows prefetched ahead (strided rows defeat the prefetcher)
  constexpr bool kInt4 = Fmt == WeightDtype::kInt4;
  constexpr bool kQuant = kInt4 || Fmt == WeightDtype::kInt8;
  constexpr int64_t elem = Fmt == WeightDtype::kF32 ? 4 : (Fmt == WeightDtype::kBf16 ? 2 : 1);
  typename Ops::Vec acc[RB][CB], sv[CB];  // sv: the current scale row (quantised)
  MOELENS_UNROLL for (int r = 0; r < RB; ++r)
    MOELENS_UNROLL for (int j = 0; j < CB; ++j) acc[r][j] = Ops::Zero();
  const float* srow = nullptr;  // quantised: the current scale row at column `col`
  int64_t group_left = w.group;  // rows left in the current scale row (int8: all of them)
  if constexpr (kQuant) {
    srow = w.scale + col;
    MOELENS_UNROLL for (int j = 0; j < CB; ++j) sv[j] = Ops::LoadF(srow + j * VL);
  }
  const int64_t ld_bytes = w.ld * elem;
  for (int64_t kk = 0; kk < k; ++kk) {
    const int64_t brow = kInt4 ? kk >> 1 : kk;  // int4: rows 2j and 2j + 1 share byte row j
    const uint8_t* bp = w.b + brow * ld_bytes + col * elem;
    if (kk + kAhead < k) Ops::Prefetch(bp + (kInt4 ? kAhead / 2 : kAhead) * ld_bytes);
    if constexpr (kInt4) {
      if (group_left == 0) {
        srow += w.ld;
        group_left = w.group;
        MOELENS_UNROLL for (int j = 0; j < CB; ++j) sv[j] = Ops::LoadF(srow + j * VL);
      }
      --group_left;
    }
    typename Ops::Vec bv[CB];
    MOELENS_UNROLL for (int j = 0; j < CB; ++j) {
      const uint8_t* p = bp + int64_t(j) * VL * elem;
      if constexpr (Fmt == WeightDtype::kF32) {
        bv[j] = Ops::Load(TagF32{}, p);
      } else if constexpr (Fmt == WeightDtype::kBf16) {
        bv[j] = Ops::Load(TagBf16{}, p);
      } else if constexpr (kInt4) {
        bv[j] = Ops::Mul(Ops::LoadI4(p, int(kk & 1)), sv[j]);
      } else {
        bv[j] = Ops::Load(TagI8{}, p);
      }
    }
    MOELENS_UNROLL for (int r = 0; r < RB; ++r) {
      const auto av = Ops::Set1(a[r * lda + kk]);
      MOELENS_UNROLL for (int j = 0; j < CB; ++j) acc[r][j] = Ops::Fma(av, bv[j], acc[r][j]);
    }
  }
  if constexpr (Fmt == WeightDtype::kInt8) {
    MOELENS_UNROLL for (int r = 0; r < RB; ++r)
      MOELENS_UNROLL for (int j = 0; j < CB; ++j) acc[r][j] = Ops::Mul(acc[r][j], sv[j]);
  }
  MOELENS_UNROLL for (int r = 0; r < RB; ++r)
    MOELENS_UNROLL for (int j = 0; j < CB; ++j) Ops::Store(c + r * ldc + col + j * VL, acc[r][j]);
}

template <class Ops, WeightDtype Fmt, int RB>
inline void SmallGemmRows(const float* a, int64_t lda, const WeightView& w, float* c,
                          int64_t ldc, int64_t n, int64_t k) {
  constexpr int VL = Ops::kLanes;
  int64_t col = 0;
  for (; col + 2 * VL <= n; col += 2 * VL)
    SmallGemmBlock<Ops, Fmt, RB, 2>(a, lda, w, c, ldc, col, k);
  for (; col + VL <= n; col += VL) SmallGemmBlock<Ops, Fmt, RB, 1>(a, lda, w, c, ldc, col, k);
  for (; col < n; ++col) {  // tail columns
    for (int r = 0; r < RB; ++r) {
      float sum = 0.f;
      for (int64_t kk = 0; kk < k; ++kk) sum += a[r * lda + kk] * WeightAt(w, kk, col);
      c[r * ldc + col] = sum;
    }
  }
}

template <class Ops, WeightDtype Fmt>
void SmallGemmTyped(const float* a, int64_t lda, const WeightView& w, float* c, int64_t ldc,
                    int64_t m, int64_t n, int64_t k) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) SmallGemmRows<Ops, Fmt, 4>(a + r * lda, lda, w, c + r * ldc, ldc,
                                                         n, k);
  switch (m - r) {
    case 3: SmallGemmRows<Ops, Fmt, 3>(a + r * lda, lda, w, c + r * ldc, ldc, n, k); break;
    case 2: SmallGemmRows<Ops, Fmt, 2>(a + r * lda, lda, w, c + r * ldc, ldc, n, k); break;
    case 1: SmallGemmRows<Ops, Fmt, 1>(a + r * lda, lda, w, c + r * ldc, ldc, n, k); break;
    default: break;
  }
}

template <class Ops>
void SmallGemm(const float* a, int64_t lda, const WeightView& w, float* c, int64_t ldc,
               int64_t m, int64_t n, int64_t k) {
  switch (w.fmt) {
    case WeightDtype::kF32: SmallGemmTyped<Ops, WeightDtype::kF32>(a, lda, w, c, ldc, m, n, k);
      break;
    case WeightDtype::kBf16: SmallGemmTyped<Ops, WeightDtype::kBf16>(a, lda, w, c, ldc, m, n, k);
      break;
    case WeightDtype::kInt8: SmallGemmTyped<Ops, WeightDtype::kInt8>(a, lda, w, c, ldc, m, n, k);
      break;
    case WeightDtype::kInt4: SmallGemmTyped<Ops, WeightDtype::kInt4>(a, lda, w, c, ldc, m, n, k);
      break;
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

// Panels of rows [k0, k0 + kc) x [0, n) of a quantised block -> pack[n / NR][kc][NR],
// dequantised (Ops::LoadI4 / Load(TagI8) x the row's scales: QuantWeight's values).
template <class Ops, bool kInt4>
void PackPanelsQuant(const WeightView& w, int64_t k0, int64_t kc, int64_t n, float* pack) {
  constexpr int VL = Ops::kLanes, NR = 2 * VL;
  const int64_t full = n / NR, panels = (n + NR - 1) / NR;
  for (int64_t kk = 0; kk < kc; ++kk) {
    const int64_t r = k0 + kk;
    const uint8_t* row = w.b + (kInt4 ? r >> 1 : r) * w.ld;
    const float* srow = w.scale + (r / w.group) * w.ld;
    for (int64_t j = 0; j < full; ++j) {
      float* d = pack + (j * kc + kk) * NR;
      MOELENS_UNROLL for (int half = 0; half < 2; ++half) {
        const int64_t col = j * NR + half * VL;
        const auto v = kInt4 ? Ops::LoadI4(row + col, int(r & 1)) : Ops::Load(TagI8{}, row + col);
        Ops::Store(d + half * VL, Ops::Mul(v, Ops::LoadF(srow + col)));
      }
    }
    if (full < panels) {  // tail columns, zero-padded to the panel width
      float* d = pack + (full * kc + kk) * NR;
      for (int64_t c = 0; c < NR; ++c) {
        const int64_t col = full * NR + c;
        d[c] = col < n ? QuantWeight(w, r, col) : 0.f;
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

// `pack_rows(k0, kc, pack)` fills the panels of B's rows [k0, k0 + kc).
template <class Ops, class PackRows>
void PackedGemmImpl(const float* a, int64_t lda, PackRows pack_rows, float* c, int64_t ldc,
                    int64_t m, int64_t n, int64_t k, float* pack) {
  constexpr int NR = 2 * Ops::kLanes;
  static_assert(32 % NR == 0, "PackedCols must round to a multiple of the panel width");
  const int64_t panels = (n + NR - 1) / NR;
  for (int64_t k0 = 0; k0 < k; k0 += kPackK) {
    const int64_t kc = std::min(kPackK, k - k0);
    pack_rows(k0, kc, pack);
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
void PackedGemm(const float* a, int64_t lda, const WeightView& w, float* c, int64_t ldc,
                int64_t m, int64_t n, int64_t k, float* pack) {
  switch (w.fmt) {
    case WeightDtype::kF32:
      PackedGemmImpl<Ops>(a, lda, [&](int64_t k0, int64_t kc, float* p) {
        PackPanels<Ops, TagF32>(w.b + k0 * w.ld * 4, w.ld * 4, 4, kc, n, p);
      }, c, ldc, m, n, k, pack);
      break;
    case WeightDtype::kBf16:
      PackedGemmImpl<Ops>(a, lda, [&](int64_t k0, int64_t kc, float* p) {
        PackPanels<Ops, TagBf16>(w.b + k0 * w.ld * 2, w.ld * 2, 2, kc, n, p);
      }, c, ldc, m, n, k, pack);
      break;
    case WeightDtype::kInt8:
      PackedGemmImpl<Ops>(a, lda, [&](int64_t k0, int64_t kc, float* p) {
        PackPanelsQuant<Ops, false>(w, k0, kc, n, p);
      }, c, ldc, m, n, k, pack);
      break;
    case WeightDtype::kInt4:
      PackedGemmImpl<Ops>(a, lda, [&](int64_t k0, int64_t kc, float* p) {
        PackPanelsQuant<Ops, true>(w, k0, kc, n, p);
      }, c, ldc, m, n, k, pack);
      break;
  }
}

}  // namespace kernel
}  // namespace moelens
