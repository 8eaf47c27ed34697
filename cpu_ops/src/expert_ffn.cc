#include "expert_ffn.h"

#include <algorithm>
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

// Which GEMM an expert segment takes, by its rows (measured on a 2-core AVX2 machine, both
// threads busy, bench_experts and a C++ harness, cold weights):
// - bf16 weights, <= kSmallRowsBf16 rows: SmallGemm (streams bf16 B once, widening in
//   registers) was 1.2-2.5x faster than widening panels for OpenBLAS at 4-16 rows and beat
//   PackedGemm, which writes the widened panels; float32 weights never take it (under two
//   threads' memory traffic it lost to OpenBLAS at small-mixtral's f = 1792).
// - <= kPackedRows rows: PackedGemm, 1.1-1.3x OpenBLAS's sgemm at 1-16 rows in the harness;
//   end to end at 128 experts (f = 192) 1.2-1.5x at 4 rows per expert, 1.1-1.2x at 16; a tie
//   at 48-64 rows, where OpenBLAS takes over.
constexpr int64_t kSmallRowsBf16 = 16;
constexpr int64_t kPackedRows = 48;

SmallGemmFn GetSmallGemm(Isa isa) {
  if (isa >= Isa::kAvx512) return GetSmallGemmAvx512();
  if (isa >= Isa::kAvx2) return GetSmallGemmAvx2();
  return nullptr;  // the scalar version would lose to OpenBLAS
}

PackedGemmFn GetPackedGemm(Isa isa) {
  if (isa >= Isa::kAvx512) return GetPackedGemmAvx512();
  if (isa >= Isa::kAvx2) return GetPackedGemmAvx2();
  return nullptr;
}

SiluMulFn GetSiluMul(Isa isa) {
  SiluMulFn fn = nullptr;
  if (isa >= Isa::kAvx512) fn = GetSiluMulAvx512();
  if (fn == nullptr && isa >= Isa::kAvx2) fn = GetSiluMulAvx2();
  return fn != nullptr ? fn : GetSiluMulPortable();
}

// Columns [0, nc) of a row-major [rows, ld] matrix as float32: the matrix itself when it is
// float32, else widened into `buf` ([rows, nc]).
const float* Panel(const void* w, WeightDtype dt, int64_t rows, int64_t ld, int64_t nc,
                   std::vector<float>& buf, int64_t* ld_out) {
  if (dt == WeightDtype::kF32) {
    *ld_out = ld;
    return static_cast<const float*>(w);
  }
  buf.resize(size_t(rows * nc));
  const uint16_t* src = static_cast<const uint16_t*>(w);
  for (int64_t r = 0; r < rows; ++r) {
    const uint16_t* s = src + r * ld;
    float* d = buf.data() + r * nc;
    for (int64_t c = 0; c < nc; ++c) d[c] = Bf16ToF32(s[c]);
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

// C[rows, n] = A[rows, k] @ B[k, n] for one expert segment x column panel, B row-major
// (float32 or bf16, `ldb` elements per row): SmallGemm for decode-sized bf16 groups, PackedGemm
// up to a few dozen rows, OpenBLAS (bf16 widened to a float32 panel first) above.
class GroupGemm {
 public:
  GroupGemm(Isa isa, WeightDtype dt)
      : dt_(dt), small_(GetSmallGemm(isa)), packed_(GetPackedGemm(isa)) {
    small_rows_ = small_ != nullptr && dt == WeightDtype::kBf16 ? kSmallRowsBf16 : 0;
    packed_rows_ = packed_ != nullptr ? kPackedRows : 0;
  }

  void operator()(const float* a, int64_t lda, const uint8_t* b, int64_t ldb, float* c,
                  int64_t ldc, int64_t rows, int64_t n, int64_t k) const {
    const bool bf16 = dt_ == WeightDtype::kBf16;
    if (rows <= small_rows_) {
      small_(a, lda, b, ldb, bf16, c, ldc, rows, n, k);
    } else if (rows <= packed_rows_) {
      thread_local std::vector<float> pack;
      pack.resize(size_t(kPackK * PackedCols(n)));
      packed_(a, lda, b, ldb, bf16, c, ldc, rows, n, k, pack.data());
    } else {
      thread_local std::vector<float> wbuf;
      int64_t ld = 0;
      const float* bp = Panel(b, dt_, k, ldb, n, wbuf, &ld);
      Sgemm(rows, n, k, a, lda, bp, ld, 0.f, c, ldc);
    }
  }

 private:
  WeightDtype dt_;
  SmallGemmFn small_;
  PackedGemmFn packed_;
  int64_t small_rows_ = 0, packed_rows_ = 0;
};

}  // namespace

void ExpertFfn(const ExpertFfnArgs& a, Isa isa, ThreadPool& pool) {
  int64_t total = 0;
  Validate(a, &total);
  std::fill(a.y + total * a.ho, a.y + a.m * a.ho, 0.f);
  if (total == 0) return;
  const SiluMulFn silu_mul = GetSiluMul(isa);
  const GroupGemm gemm(isa, a.dtype);
  const bool round_bf16 = a.dtype == WeightDtype::kBf16;
  const int64_t esize = round_bf16 ? 2 : 4;
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
      const Segment& s = segs[size_t(item / p1)];
      const int64_t col0 = (item % p1) * nb1, nc = std::min(nb1, f - col0);
      const float* xs = a.x + s.row0 * h;
      float* g = gbuf + (s.row0 - c0) * f + col0;
      float* u = ubuf + (s.row0 - c0) * f + col0;
      const int64_t off = (s.expert * h * f + col0) * esize;
      gemm(xs, h, static_cast<const uint8_t*>(a.w_gate) + off, f, g, f, s.rows, nc, h);
      gemm(xs, h, static_cast<const uint8_t*>(a.w_up) + off, f, u, f, s.rows, nc, h);
      for (int64_t r = 0; r < s.rows; ++r) silu_mul(g + r * f, u + r * f, g + r * f, nc,
                                                    round_bf16);
    });
    pool.Run(ns * p2, [&](int64_t item) {
      const Segment& s = segs[size_t(item / p2)];
      const int64_t col0 = (item % p2) * nb2, nc = std::min(nb2, ho - col0);
      const int64_t off = (s.expert * f * ho + col0) * esize;
      gemm(gbuf + (s.row0 - c0) * f, f, static_cast<const uint8_t*>(a.w_down) + off, ho,
           a.y + s.row0 * ho + col0, ho, s.rows, nc, f);
    });
  }
}

}  // namespace moelens
