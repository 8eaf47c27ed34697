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
// - bf16 weights, <= kSmallRows rows: SmallGemm (streams bf16 B once, widening in
//   registers) was 1.2-2.5x faster than widening panels for OpenBLAS at 4-16 rows and beat
//   PackedGemm, which writes the widened panels; float32 weights never take it (under two
//   threads' memory traffic it lost to OpenBLAS at small-mixtral's f = 1792). int8 / int4
//   codes take it too, dequantised in registers: with PackedGemm instead (dequantising while
//   packing) int8 ran 0.64-0.86x the bf16 kernel at 64-512 routed rows; with SmallGemm
//   0.93-1.34x (bench_experts --dtype bfloat16 --weight_dtype int8).
// - <= kPackedRows rows: PackedGemm, 1.1-1.3x OpenBLAS's sgemm at 1-16 rows in the harness;
//   end to end at 128 experts (f = 192) 1.2-1.5x at 4 rows per expert, 1.1-1.2x at 16; a tie
//   at 48-64 rows, where OpenBLAS takes over.
constexpr int64_t kSmallRows = 16;
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

// Columns [0, nc) of a [rows, ld] block as float32 for OpenBLAS: the matrix itself when it
// is float32, else widened (bf16) or dequantised (int8 / int4) into `buf` ([rows, nc]).
const float* Panel(const WeightView& w, int64_t rows, int64_t nc, std::vector<float>& buf,
                   int64_t* ld_out) {
  if (w.fmt == WeightDtype::kF32) {
    *ld_out = w.ld;
    return reinterpret_cast<const float*>(w.b);
  }
  buf.resize(size_t(rows * nc));
  for (int64_t r = 0; r < rows; ++r) {
    float* d = buf.data() + r * nc;
    if (w.fmt == WeightDtype::kBf16) {
      const uint16_t* s = reinterpret_cast<const uint16_t*>(w.b) + r * w.ld;
      for (int64_t c = 0; c < nc; ++c) d[c] = Bf16ToF32(s[c]);
      continue;
    }
    // Quantised: QuantWeight's values, with the row's codes and scales located once.
    const float* sc = w.scale + (r / w.group) * w.ld;
    if (w.fmt == WeightDtype::kInt8) {
      const int8_t* s = reinterpret_cast<const int8_t*>(w.b) + r * w.ld;
      for (int64_t c = 0; c < nc; ++c) d[c] = float(s[c]) * sc[c];
    } else {
      const uint8_t* s = w.b + (r >> 1) * w.ld;
      const bool high = r & 1;
      for (int64_t c = 0; c < nc; ++c) d[c] = float(kernel::Int4Code(s[c], high)) * sc[c];
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
  const bool quantised = a.dtype == WeightDtype::kInt8 || a.dtype == WeightDtype::kInt4;
  if (quantised && (a.s_gate == nullptr || a.s_up == nullptr || a.s_down == nullptr)) {
    throw std::invalid_argument("expert_ffn: quantised weights need their scales");
  }
  if (a.dtype == WeightDtype::kInt4) {
    const bool ok = a.h % 2 == 0 && a.f % 2 == 0 && a.gate_group > 0 && a.down_group > 0 &&
                    a.gate_group % 2 == 0 && a.down_group % 2 == 0 && a.h % a.gate_group == 0 &&
                    a.f % a.down_group == 0;
    if (!ok) {
      throw std::invalid_argument("expert_ffn: int4 needs even h and f, each a multiple of an "
                                  "even scale group");
    }
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

// C[rows, n] = A[rows, k] @ B[k, n] for one expert segment x column panel (`WeightView`):
// SmallGemm for decode-sized bf16 / int8 / int4 groups, PackedGemm up to a few dozen rows
// (every format; int8 / int4 dequantised while packing), OpenBLAS (on a float32 panel of the
// column block, widened or dequantised by `Panel`) above.
class GroupGemm {
 public:
  GroupGemm(Isa isa, WeightDtype dt) : small_(GetSmallGemm(isa)), packed_(GetPackedGemm(isa)) {
    small_rows_ = small_ != nullptr && dt != WeightDtype::kF32 ? kSmallRows : 0;
    packed_rows_ = packed_ != nullptr ? kPackedRows : 0;
  }

  void operator()(const float* a, int64_t lda, const WeightView& w, float* c, int64_t ldc,
                  int64_t rows, int64_t n, int64_t k) const {
    if (rows <= small_rows_) {
      small_(a, lda, w, c, ldc, rows, n, k);
    } else if (rows <= packed_rows_) {
      thread_local std::vector<float> pack;
      pack.resize(size_t(kPackK * PackedCols(n)));
      packed_(a, lda, w, c, ldc, rows, n, k, pack.data());
    } else {
      thread_local std::vector<float> wbuf;
      int64_t ld = 0;
      const float* bp = Panel(w, k, n, wbuf, &ld);
      Sgemm(rows, n, k, a, lda, bp, ld, 0.f, c, ldc);
    }
  }

 private:
  SmallGemmFn small_;
  PackedGemmFn packed_;
  int64_t small_rows_ = 0, packed_rows_ = 0;
};

// Columns [col0, ...) of expert e's matrix `w` ([E, k, ld] codes; int4 [E, k / 2, ld]) with
// its scales `s` ([E, ld] for int8, [E, k / group, ld] for int4).
WeightView ExpertView(const ExpertFfnArgs& a, const void* w, const float* s, int64_t e,
                      int64_t k, int64_t ld, int64_t col0, int64_t group) {
  WeightView v;
  v.fmt = a.dtype;
  v.ld = ld;
  const auto* base = static_cast<const uint8_t*>(w);
  switch (a.dtype) {
    case WeightDtype::kF32: v.b = base + (e * k * ld + col0) * 4; break;
    case WeightDtype::kBf16: v.b = base + (e * k * ld + col0) * 2; break;
    case WeightDtype::kInt8:
      v.b = base + e * k * ld + col0;
      v.scale = s + e * ld + col0;
      v.group = k;
      break;
    case WeightDtype::kInt4:
      v.b = base + e * (k / 2) * ld + col0;
      v.scale = s + e * (k / group) * ld + col0;
      v.group = group;
      break;
  }
  return v;
}

}  // namespace

void ExpertFfn(const ExpertFfnArgs& a, Isa isa, ThreadPool& pool) {
  int64_t total = 0;
  Validate(a, &total);
  std::fill(a.y + total * a.ho, a.y + a.m * a.ho, 0.f);
  if (total == 0) return;
  const SiluMulFn silu_mul = GetSiluMul(isa);
  const GroupGemm gemm(isa, a.dtype);
  const bool round_bf16 = a.dtype == WeightDtype::kBf16 || a.round_bf16;
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
      gemm(xs, h, ExpertView(a, a.w_gate, a.s_gate, s.expert, h, f, col0, a.gate_group), g, f,
           s.rows, nc, h);
      gemm(xs, h, ExpertView(a, a.w_up, a.s_up, s.expert, h, f, col0, a.gate_group), u, f,
           s.rows, nc, h);
      for (int64_t r = 0; r < s.rows; ++r) silu_mul(g + r * f, u + r * f, g + r * f, nc,
                                                    round_bf16);
    });
    pool.Run(ns * p2, [&](int64_t item) {
      const Segment& s = segs[size_t(item / p2)];
      const int64_t col0 = (item % p2) * nb2, nc = std::min(nb2, ho - col0);
      gemm(gbuf + (s.row0 - c0) * f, f,
           ExpertView(a, a.w_down, a.s_down, s.expert, f, ho, col0, a.down_group),
           a.y + s.row0 * ho + col0, ho, s.rows, nc, f);
    });
  }
}

}  // namespace moelens
