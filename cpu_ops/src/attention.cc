#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "dtypes.h"
#include "scratch.h"

namespace moelens {
namespace {

PageFn GetPageFn(Isa isa, KvDtype dtype, int head_dim, int s) {
  switch (isa) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: return GetPageFnAvx512(dtype, head_dim, s);
    case Isa::kAvx2: return GetPageFnAvx2(dtype, head_dim, s);
    case Isa::kPortable: return GetPageFnPortable(dtype, head_dim, s);
  }
  return nullptr;
}

struct Item {
  int64_t b;
  int64_t first_token;
  int64_t num_tokens;
};

}  // namespace

void QuantiseRowsI16(const float* x, int64_t rows, int d, int16_t* out, float* scale) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    int16_t* o = out + r * d;
    bool finite = true;
    const float amax = AbsMax(xr, d, &finite);
    const float inv = 32767.f / amax;  // inf for a zero row (or one under ~1e-34: as zero)
    if (!finite || !(inv <= std::numeric_limits<float>::max())) {
      std::fill(o, o + d, int16_t(0));
      scale[r] = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
      continue;
    }
    // |x * inv| <= 32767 (to within a rounding), so adding and subtracting 1.5 * 2^23 rounds it
    // to the nearest integer, ties to even, in plain float arithmetic the compiler vectorises.
    constexpr float kRound = 12582912.f;
    for (int c = 0; c < d; ++c) {
      const float rounded = (xr[c] * inv + kRound) - kRound;
      o[c] = int16_t(std::clamp(rounded, -32767.f, 32767.f));
    }
    scale[r] = amax / 32767.f;
  }
}

Isa EffectiveIsa(Isa requested, KvDtype dtype, int head_dim) {
  for (int level = int(requested); level > 0; --level) {
    if (GetPageFn(Isa(level), dtype, head_dim, 1) != nullptr) return Isa(level);
  }
  return Isa::kPortable;
}

void DecodeAttention(const KvStore& store, const float* q, const int64_t* seq_ids, int64_t n,
                     int num_q_heads, int layer, const AttentionOptions& opt, ThreadPool& pool,
                     float* out) {
  const KvGeometry& g = store.geometry();
  const int d = g.head_dim;
  const int H = g.num_kv_heads;
  if (num_q_heads <= 0 || num_q_heads % H != 0) {
    throw std::invalid_argument("query heads (" + std::to_string(num_q_heads) +
                                ") must be a positive multiple of the store's kv heads (" +
                                std::to_string(H) + ")");
  }
  if (g.page_size > kMaxPageSize) {
    throw std::invalid_argument("page_size > " + std::to_string(kMaxPageSize) +
                                " is not supported by the attention kernel");
  }
  if (opt.scale && !(std::isfinite(*opt.scale) && *opt.scale > 0.f)) {
    throw std::invalid_argument("attention scale must be a finite positive number (or unset "
                                "for 1/sqrt(head_dim)), got " + std::to_string(*opt.scale));
  }
  const int ps = g.page_size;
  const int s = num_q_heads / H;
  const float scale = opt.scale ? *opt.scale : 1.f / std::sqrt(float(d));
  const Isa isa = EffectiveIsa(opt.isa, g.dtype, d);
  const int64_t chunk =
      std::max<int64_t>(ps, (std::max<int64_t>(opt.chunk_tokens, 1) + ps - 1) / ps * ps);
  // Head blocks of <= kMaxGroup query heads per kv head, and their kernels.
  const int nblk = (s + kMaxGroup - 1) / kMaxGroup;
  std::vector<PageFn> fns(static_cast<size_t>(nblk));
  for (int k = 0; k < nblk; ++k) {
    fns[size_t(k)] = GetPageFn(isa, g.dtype, d, std::min(kMaxGroup, s - k * kMaxGroup));
  }

  std::shared_lock<std::shared_mutex> lock(store.mutex());
  // Validate every sequence and build the work list before computing anything.
  std::vector<KvStore::SeqView> views(static_cast<size_t>(n));
  std::vector<Item> items;
  std::vector<int64_t> first_item(static_cast<size_t>(n) + 1);
  for (int64_t b = 0; b < n; ++b) {
    views[size_t(b)] = store.ViewLocked(seq_ids[b], layer);
    const int64_t len = views[size_t(b)].length;
    if (len <= 0) {
      throw std::invalid_argument("sequence " + std::to_string(seq_ids[b]) +
                                  " has no cached tokens at layer " + std::to_string(layer) +
                                  " (append its K/V before attending)");
    }
    first_item[size_t(b)] = int64_t(items.size());
    for (int64_t t = 0; t < len; t += chunk) items.push_back(Item{b, t, std::min(chunk, len - t)});
  }
  first_item[size_t(n)] = int64_t(items.size());

  // Scaled queries; per-item partial state for every query head: m, l [n_q] and acc [n_q][d].
  std::vector<float> qs(size_t(n) * num_q_heads * d);
  for (size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;
  std::vector<int16_t> q16;  // an int8 store's kernels may dot integers (attention.h)
  std::vector<float> q16_scale;
  if (g.dtype == KvDtype::kI8) {
    q16.resize(qs.size());
    q16_scale.resize(size_t(n) * num_q_heads);
    QuantiseRowsI16(qs.data(), n * num_q_heads, d, q16.data(), q16_scale.data());
  }
  const int64_t slot = int64_t(num_q_heads) * (2 + d);
  std::vector<float> part(size_t(int64_t(items.size()) * slot));
  const int64_t elem = g.elem_bytes();
  const bool quantised = KvDtypeQuantised(g.dtype);  // prefetch a block's scales with its codes

  pool.Run(int64_t(items.size()), [&](int64_t i) {
    const Item& it = items[size_t(i)];
    float* m = part.data() + i * slot;
    float* l = m + num_q_heads;
    float* acc = l + num_q_heads;
    std::fill(m, m + num_q_heads, -std::numeric_limits<float>::infinity());
    std::fill(l, acc + int64_t(num_q_heads) * d, 0.f);
    const int32_t* pages = views[size_t(it.b)].pages;
    const float* qb = qs.data() + it.b * num_q_heads * d;
    const int64_t end = it.first_token + it.num_tokens;
    for (int64_t p = it.first_token / ps; p * ps < end; ++p) {
      const int ntok = int(std::min<int64_t>(ps, end - p * ps));
      const bool last_page = (p + 1) * ps >= end;
      for (int h = 0; h < H; ++h) {
        // Prefetch the next K block in memory order: next head, or the next page's first head.
        const uint8_t* next = nullptr;
        int64_t next_bytes = 0;
        if (h + 1 < H) {
          next = store.BlockPtr(pages[p], layer, 0, h + 1);
          next_bytes = quantised ? g.block_bytes() : int64_t(ntok) * d * elem;
        } else if (!last_page) {
          next = store.BlockPtr(pages[p + 1], layer, 0, 0);
          next_bytes = quantised ? g.block_bytes()
                                 : std::min<int64_t>(ps, end - (p + 1) * ps) * d * elem;
        }
        for (int k = 0; k < nblk; ++k) {
          const int q0 = h * s + k * kMaxGroup;
          PageArgs a{qb + int64_t(q0) * d, store.BlockPtr(pages[p], layer, 0, h),
                     store.BlockPtr(pages[p], layer, 1, h), store.ScalePtr(pages[p], layer, 0, h),
                     store.ScalePtr(pages[p], layer, 1, h), ntok, d, elem, m + q0, l + q0,
                     acc + int64_t(q0) * d, k == 0 ? next : nullptr, next_bytes};
          if (!q16.empty()) {
            a.q16 = q16.data() + (it.b * num_q_heads + q0) * d;
            a.q16_scale = q16_scale.data() + it.b * num_q_heads + q0;
          }
          fns[size_t(k)](a);
        }
      }
    }
  });

  // Merge chunk partials by log-sum-exp: one task per (sequence, query head).
  pool.Run(n * num_q_heads, [&](int64_t task) {
    const int64_t b = task / num_q_heads;
    const int hq = int(task % num_q_heads);
    const int64_t lo = first_item[size_t(b)], hi = first_item[size_t(b) + 1];
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t k = lo; k < hi; ++k) mx = std::max(mx, part[size_t(k * slot + hq)]);
    float* o = out + (b * num_q_heads + hq) * d;
    std::fill(o, o + d, 0.f);
    float denom = 0.f;
    for (int64_t k = lo; k < hi; ++k) {
      const float* p = part.data() + k * slot;
      const float w = std::exp(p[hq] - mx);
      denom += w * p[num_q_heads + hq];
      const float* acc = p + 2 * int64_t(num_q_heads) + int64_t(hq) * d;
      for (int c = 0; c < d; ++c) o[c] += w * acc[c];
    }
    const float inv = 1.f / denom;
    for (int c = 0; c < d; ++c) o[c] *= inv;
  });
}

namespace {

// First row of the segment each prefill row belongs to (-1 for rows with seg < 0), after
// checking that every segment is one contiguous run with consecutive positions.
std::vector<int64_t> SegmentStarts(const int32_t* seg, const int32_t* pos, int64_t n) {
  std::vector<int64_t> start(size_t(n), -1);
  std::vector<int32_t> closed;  // segment ids whose run has ended
  for (int64_t r = 0; r < n; ++r) {
    if (seg[r] < 0) continue;
    const bool continues = r > 0 && seg[r - 1] == seg[r];
    if (continues) {
      if (pos[r] != pos[r - 1] + 1) {
        throw std::invalid_argument("prefill attention: positions of segment " +
                                    std::to_string(seg[r]) + " are not consecutive at row " +
                                    std::to_string(r));
      }
      start[size_t(r)] = start[size_t(r - 1)];
    } else {
      closed.push_back(seg[r]);
      start[size_t(r)] = r;
    }
  }
  std::sort(closed.begin(), closed.end());
  if (std::adjacent_find(closed.begin(), closed.end()) != closed.end()) {
    throw std::invalid_argument("prefill attention: a segment's rows are not contiguous");
  }
  return start;
}

}  // namespace

void PrefillAttention(const float* q, const float* k, const float* v, const int32_t* seg,
                      const int32_t* pos, int64_t n, int num_q_heads, int num_kv_heads,
                      int head_dim, const AttentionOptions& opt, ThreadPool& pool, float* out) {
  const int H = num_kv_heads, d = head_dim;
  if (H <= 0 || num_q_heads <= 0 || num_q_heads % H != 0 || d <= 0) {
    throw std::invalid_argument("prefill attention: query heads (" +
                                std::to_string(num_q_heads) + ") must be a positive multiple "
                                "of kv heads (" + std::to_string(H) + ")");
  }
  if (opt.scale && !(std::isfinite(*opt.scale) && *opt.scale > 0.f)) {
    throw std::invalid_argument("attention scale must be a finite positive number (or unset "
                                "for 1/sqrt(head_dim)), got " + std::to_string(*opt.scale));
  }
  const std::vector<int64_t> start = SegmentStarts(seg, pos, n);
  const int s = num_q_heads / H;
  const float scale = opt.scale ? *opt.scale : 1.f / std::sqrt(float(d));
  const Isa isa = EffectiveIsa(opt.isa, KvDtype::kF32, d);
  const int nblk = (s + kMaxGroup - 1) / kMaxGroup;
  std::vector<PageFn> fns(static_cast<size_t>(nblk));
  for (int b = 0; b < nblk; ++b) {
    fns[size_t(b)] = GetPageFn(isa, KvDtype::kF32, d, std::min(kMaxGroup, s - b * kMaxGroup));
  }
  // Work items: blocks of <= kRows rows within one segment, per kv head.
  constexpr int64_t kRows = 16;
  std::vector<std::pair<int64_t, int64_t>> blocks;  // (first row, rows)
  for (int64_t r = 0; r < n;) {
    if (start[size_t(r)] < 0) {
      std::fill(out + r * num_q_heads * d, out + (r + 1) * num_q_heads * d, 0.f);
      ++r;
      continue;
    }
    int64_t e = r + 1;
    while (e < n && e - r < kRows && start[size_t(e)] == start[size_t(r)]) ++e;
    blocks.emplace_back(r, e - r);
    r = e;
  }
  if (blocks.empty()) return;
  // K and V head-major ([H][n][d]) so a kernel call reads contiguous rows of one head.
  ScratchPool::Lease lease;
  float* kt = lease.Get(size_t(2 * H * n * d));
  float* vt = kt + int64_t(H) * n * d;
  pool.Run(H, [&](int64_t h) {
    for (int64_t r = 0; r < n; ++r) {
      std::copy_n(k + (r * H + h) * d, d, kt + (h * n + r) * d);
      std::copy_n(v + (r * H + h) * d, d, vt + (h * n + r) * d);
    }
  });
  const int64_t elem = 4;
  pool.Run(int64_t(blocks.size()) * H, [&](int64_t item) {
    const auto [r0, rows] = blocks[size_t(item / H)];
    const int h = int(item % H);
    alignas(64) float qs[kMaxGroup * 256];
    std::vector<float> state;  // m, l, acc per query head of the group
    state.resize(size_t(s) * (2 + d));
    float* m = state.data();
    float* l = m + s;
    float* acc = l + s;
    const int64_t seg0 = start[size_t(r0)];
    for (int64_t r = r0; r < r0 + rows; ++r) {
      std::fill(m, m + s, -std::numeric_limits<float>::infinity());
      std::fill(l, acc + int64_t(s) * d, 0.f);
      for (int b = 0; b < nblk; ++b) {
        const int q0 = b * kMaxGroup, sb = std::min(kMaxGroup, s - q0);
        const float* qr = q + (r * num_q_heads + h * s + q0) * d;
        const bool fits = int64_t(sb) * d <= int64_t(sizeof(qs) / sizeof(float));
        std::vector<float> big;
        float* qb = qs;
        if (!fits) {
          big.resize(size_t(sb) * d);
          qb = big.data();
        }
        for (int64_t c = 0; c < int64_t(sb) * d; ++c) qb[c] = qr[c] * scale;
        for (int64_t t0 = seg0; t0 <= r; t0 += kMaxPageSize) {
          const int ntok = int(std::min<int64_t>(kMaxPageSize, r + 1 - t0));
          const int64_t off = (int64_t(h) * n + t0) * d;
          PageArgs a{qb, reinterpret_cast<const uint8_t*>(kt + off),
                     reinterpret_cast<const uint8_t*>(vt + off), nullptr, nullptr, ntok, d, elem,
                     m + q0, l + q0,
                     acc + int64_t(q0) * d, nullptr, 0};
          fns[size_t(b)](a);
        }
      }
      for (int i = 0; i < s; ++i) {
        float* o = out + (r * num_q_heads + h * s + i) * d;
        const float inv = 1.f / l[i];
        for (int c = 0; c < d; ++c) o[c] = acc[int64_t(i) * d + c] * inv;
      }
    }
  });
}

}  // namespace moelens
