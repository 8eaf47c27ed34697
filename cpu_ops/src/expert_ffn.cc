#include "expert_ffn.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "blas.h"
#include "dtypes.h"
#include "expert_impl.h"
#include "scratch.h"

namespace moelens {
namespace {

constexpr int64_t kPanel = 256;                 // target columns per work item
constexpr int64_t kScratchBytes = int64_t(64) << 20;  // gate + up activations of one chunk

// Expert groups of at most this many rows use SmallGemm when the weights are bf16: measured on
// a 2-core AVX2 machine (small-mixtral shapes) 1.2-2.5x faster than widening panels for
// OpenBLAS at 4-16 rows, a tie at 24. With float32 weights OpenBLAS was as fast or faster at
// every row count, so float32 always takes it.
constexpr int64_t kSmallRowsBf16 = 16;

SmallGemmFn GetSmallGemm(Isa isa) {
  if (isa >= Isa::kAvx512) return GetSmallGemmAvx512();
  if (isa >= Isa::kAvx2) return GetSmallGemmAvx2();
  return nullptr;  // the scalar version would lose to OpenBLAS
}

SiluMulFn GetSiluMul(Isa isa) {
  SiluMulFn fn = nullptr;
  if (isa >= Isa::kAvx512) fn = GetSiluMulAvx512();
  if (fn == nullptr && isa >= Isa::kAvx2) fn = GetSiluMulAvx2();
  return fn != nullptr ? fn : GetSiluMulPortable();
}

// Columns [c0, c0 + nc) of a row-major [rows, ld] matrix as float32: the matrix itself when it
// is float32, else widened into `buf` ([rows, nc]).
const float* Panel(const void* w, WeightDtype dt, int64_t rows, int64_t ld, int64_t c0,
                   int64_t nc, std::vector<float>& buf, int64_t* ld_out) {
  if (dt == WeightDtype::kF32) {
    *ld_out = ld;
    return static_cast<const float*>(w) + c0;
  }
  buf.resize(size_t(rows * nc));
  const uint16_t* src = static_cast<const uint16_t*>(w) + c0;
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = src + r * ld;
    float* d = buf.data() + r * nc;
    for (int64_t c = 0; c < nc; ++c) {
      const uint32_t u = uint32_t(s[c]) << 16;
      std::memcpy(d + c, &u, 4);
    }
  }
  *ld_out = nc;
  return buf.data();
}

struct Segment {
  int64_t expert, row0, rows;
};

int64_t PanelWidth(int64_t cols) {
  const int64_t panels = std::max<int64_t>(1, (cols + kPanel - 1) / kPanel);
  const int64_t w = (cols + panels - 1) / panels;
  return std::min(cols, (w + 15) / 16 * 16);
}

void Validate(const ExpertFfnArgs& a, int64_t* total) {
  if (a.m < 0 || a.h <= 0 || a.f <= 0 || a.ho <= 0 || a.num_experts <= 0) {
    throw std::invalid_argument("expert_ffn: sizes must be positive (m >= 0)");
  }
  constexpr int64_t kIntMax = 2147483647;
  if (a.m > kIntMax || a.h > kIntMax || a.f > kIntMax || a.ho > kIntMax) {
    throw std::invalid_argument("expert_ffn: a dimension exceeds the BLAS int range");
  }
  int64_t sum = 0;
  for (int64_t e = 0; e < a.num_experts; ++e) {
    const int64_t g = a.group_sizes[e];
    if (g < 0) {
      throw std::invalid_argument("expert_ffn: group size of expert " + std::to_string(e) +
                                  " is negative (" + std::to_string(g) + ")");
    }
    sum += g;
  }
  if (sum > a.m) {
    throw std::invalid_argument("expert_ffn: group sizes sum to " + std::to_string(sum) +
                                " rows but x has " + std::to_string(a.m));
  }
  if (!BlasLoaded()) {
    throw std::runtime_error("expert_ffn: the BLAS library is not loaded "
                             "(import moelens_jax.ops.experts first)");
  }
  *total = sum;
}

}  // namespace

void ExpertFfn(const ExpertFfnArgs& a, Isa isa, ThreadPool& pool) {
  int64_t total = 0;
  Validate(a, &total);
  std::fill(a.y + total * a.ho, a.y + a.m * a.ho, 0.f);
  if (total == 0) return;
  const SiluMulFn silu_mul = GetSiluMul(isa);
  const SmallGemmFn small_gemm = GetSmallGemm(isa);
  const bool round_bf16 = a.dtype == WeightDtype::kBf16;
  const int64_t small_rows = small_gemm && round_bf16 ? kSmallRowsBf16 : 0;
  const int64_t esize = a.dtype == WeightDtype::kBf16 ? 2 : 4;
  const int64_t h = a.h, f = a.f, ho = a.ho;
  const int64_t chunk = std::max<int64_t>(64, kScratchBytes / (2 * 4 * f));
  const int64_t nb1 = PanelWidth(f), p1 = (f + nb1 - 1) / nb1;
  const int64_t nb2 = PanelWidth(ho), p2 = (ho + nb2 - 1) / nb2;

  ScratchPool::Lease lease;
  float* gbuf = lease.Get(size_t(2 * std::min(chunk, total) * f));  // [chunk, f] gate, then act.
  float* ubuf = gbuf + std::min(chunk, total) * f;      // [chunk, f] up

  std::vector<int64_t> starts(size_t(a.num_experts) + 1, 0);
  for (int64_t e = 0; e < a.num_experts; ++e) starts[e + 1] = starts[e] + a.group_sizes[e];

  std::vector<Segment> segs;
  for (int64_t c0 = 0; c0 < total; c0 += chunk) {
    const int64_t c1 = std::min(total, c0 + chunk);
    segs.clear();
    for (int64_t e = 0; e < a.num_experts; ++e) {
      const int64_t r0 = std::max(starts[e], c0), r1 = std::min(starts[e + 1], c1);
      if (r1 > r0) segs.push_back({e, r0, r1 - r0});
    }
    const int64_t ns = int64_t(segs.size());
    pool.Run(ns * p1, [&](int64_t item) {
      thread_local std::vector<float> wbuf;
      const Segment& s = segs[size_t(item / p1)];
      const int64_t col0 = (item % p1) * nb1, nc = std::min(nb1, f - col0);
      const float* xs = a.x + s.row0 * h;
      float* g = gbuf + (s.row0 - c0) * f + col0;
      float* u = ubuf + (s.row0 - c0) * f + col0;
      int64_t ldb = 0;
      const auto* wg = static_cast<const uint8_t*>(a.w_gate) + s.expert * h * f * esize;
      const auto* wu = static_cast<const uint8_t*>(a.w_up) + s.expert * h * f * esize;
      if (s.rows <= small_rows) {  // decode-sized group: stream the weights once, no packing
        small_gemm(xs, h, wg + col0 * esize, f, round_bf16, g, f, s.rows, nc, h);
        small_gemm(xs, h, wu + col0 * esize, f, round_bf16, u, f, s.rows, nc, h);
        for (int64_t r = 0; r < s.rows; ++r) silu_mul(g + r * f, u + r * f, g + r * f, nc,
                                                      round_bf16);
        return;
      }
      const float* b = Panel(wg, a.dtype, h, f, col0, nc, wbuf, &ldb);
      Sgemm(s.rows, nc, h, xs, h, b, ldb, 0.f, g, f);
      b = Panel(wu, a.dtype, h, f, col0, nc, wbuf, &ldb);
      Sgemm(s.rows, nc, h, xs, h, b, ldb, 0.f, u, f);
      for (int64_t r = 0; r < s.rows; ++r) silu_mul(g + r * f, u + r * f, g + r * f, nc,
                                                    round_bf16);
    });
    pool.Run(ns * p2, [&](int64_t item) {
      thread_local std::vector<float> wbuf;
      const Segment& s = segs[size_t(item / p2)];
      const int64_t col0 = (item % p2) * nb2, nc = std::min(nb2, ho - col0);
      int64_t ldb = 0;
      const auto* wd = static_cast<const uint8_t*>(a.w_down) + s.expert * f * ho * esize;
      if (s.rows <= small_rows) {
        small_gemm(gbuf + (s.row0 - c0) * f, f, wd + col0 * esize, ho, round_bf16,
                   a.y + s.row0 * ho + col0, ho, s.rows, nc, f);
        return;
      }
      const float* b = Panel(wd, a.dtype, f, ho, col0, nc, wbuf, &ldb);
      Sgemm(s.rows, nc, f, gbuf + (s.row0 - c0) * f, f, b, ldb, 0.f, a.y + s.row0 * ho + col0,
            ho);
    });
  }
}

}  // namespace moelens
