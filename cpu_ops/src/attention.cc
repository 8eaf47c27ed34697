#include "attention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <vector>

namespace moelens {
namespace {

ChunkFn GetChunkFn(Isa isa, KvDtype dtype, int head_dim, int s) {
  switch (isa) {
    case Isa::kAvx512Bf16:
    case Isa::kAvx512: return GetChunkFnAvx512(dtype, head_dim, s);
    case Isa::kAvx2: return GetChunkFnAvx2(dtype, head_dim, s);
    case Isa::kPortable: return GetChunkFnPortable(dtype, head_dim, s);
  }
  return nullptr;
}

struct Item {
  int64_t b;
  int kv_head;
  int head_lo;  // first query head of the block within the group
  int s;        // heads in the block
  int64_t first_token;
  int64_t num_tokens;
  int64_t partial;  // index of this item's partial slot
};

}  // namespace

Isa EffectiveIsa(Isa requested, KvDtype dtype, int head_dim) {
  for (int level = int(requested); level > 0; --level) {
    if (GetChunkFn(Isa(level), dtype, head_dim, 1) != nullptr) return Isa(level);
  }
  return Isa::kPortable;
}

void DecodeAttention(const KvStore& store, const float* q, const int64_t* seq_ids, int64_t n,
                     int num_q_heads, int layer, const AttentionOptions& opt, ThreadPool& pool,
                     float* out) {
  const KvGeometry& g = store.geometry();
  const int d = g.head_dim;
  if (num_q_heads <= 0 || num_q_heads % g.num_kv_heads != 0) {
    throw std::invalid_argument("query heads (" + std::to_string(num_q_heads) +
                                ") must be a positive multiple of the store's kv heads (" +
                                std::to_string(g.num_kv_heads) + ")");
  }
  if (g.page_size > kMaxPageSize) {
    throw std::invalid_argument("page_size > " + std::to_string(kMaxPageSize) +
                                " is not supported by the attention kernel");
  }
  const int s = num_q_heads / g.num_kv_heads;
  const float scale = opt.scale > 0.f ? opt.scale : 1.f / std::sqrt(float(d));
  const Isa isa = EffectiveIsa(opt.isa, g.dtype, d);
  const int64_t chunk = std::max<int64_t>(
      g.page_size, (std::max<int64_t>(opt.chunk_tokens, 1) + g.page_size - 1) / g.page_size *
                       g.page_size);

  std::shared_lock<std::shared_mutex> lock(store.mutex());
  // Validate every sequence and build the work list before computing anything.
  std::vector<KvStore::SeqView> views(static_cast<size_t>(n));
  std::vector<Item> items;
  std::vector<int64_t> merge_begin;  // per (b, kv_head, head block): first item index
  int64_t partials = 0;
  for (int64_t b = 0; b < n; ++b) {
    for (int64_t j = 0; j < b; ++j) {
      if (seq_ids[j] == seq_ids[b]) {
        throw std::invalid_argument("sequence id " + std::to_string(seq_ids[b]) +
                                    " appears twice in one attention batch");
      }
    }
    views[size_t(b)] = store.ViewLocked(seq_ids[b], layer);
    const int64_t len = views[size_t(b)].length;
    if (len <= 0) {
      throw std::invalid_argument("sequence " + std::to_string(seq_ids[b]) +
                                  " has no cached tokens at layer " + std::to_string(layer) +
                                  " (append its K/V before attending)");
    }
    for (int kh = 0; kh < g.num_kv_heads; ++kh) {
      for (int lo = 0; lo < s; lo += kMaxGroup) {
        merge_begin.push_back(int64_t(items.size()));
        for (int64_t t = 0; t < len; t += chunk) {
          items.push_back(Item{b, kh, lo, std::min(kMaxGroup, s - lo), t,
                               std::min(chunk, len - t), partials++});
        }
      }
    }
  }
  merge_begin.push_back(int64_t(items.size()));

  // Scaled queries, and per-item partial results (m, l: kMaxGroup each; acc: kMaxGroup * d).
  std::vector<float> qs(size_t(n) * num_q_heads * d);
  for (size_t i = 0; i < qs.size(); ++i) qs[i] = q[i] * scale;
  const int64_t slot = 2 * kMaxGroup + int64_t(kMaxGroup) * d;
  std::vector<float> part(size_t(partials * slot));

  pool.Run(int64_t(items.size()), [&](int64_t i) {
    const Item& it = items[size_t(i)];
    ChunkFn fn = GetChunkFn(isa, g.dtype, d, it.s);
    float* p = part.data() + it.partial * slot;
    ChunkArgs a{&store, views[size_t(it.b)].pages, it.first_token, it.num_tokens, layer,
                it.kv_head, it.s,
                qs.data() + (it.b * num_q_heads + int64_t(it.kv_head) * s + it.head_lo) * d,
                p, p + kMaxGroup, p + 2 * kMaxGroup};
    fn(a);
  });

  // Merge chunk partials by log-sum-exp.
  const int64_t groups = int64_t(merge_begin.size()) - 1;
  pool.Run(groups, [&](int64_t gi) {
    const int64_t lo_item = merge_begin[size_t(gi)], hi_item = merge_begin[size_t(gi) + 1];
    const Item& first = items[size_t(lo_item)];
    for (int i = 0; i < first.s; ++i) {
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t k = lo_item; k < hi_item; ++k) mx = std::max(mx, part[size_t(k * slot + i)]);
      float denom = 0.f;
      float* o = out + (first.b * num_q_heads + int64_t(first.kv_head) * s + first.head_lo + i) * d;
      for (int c = 0; c < d; ++c) o[c] = 0.f;
      for (int64_t k = lo_item; k < hi_item; ++k) {
        const float* p = part.data() + k * slot;
        const float w = std::exp(p[i] - mx);
        denom += w * p[kMaxGroup + i];
        const float* acc = p + 2 * kMaxGroup + int64_t(i) * d;
        for (int c = 0; c < d; ++c) o[c] += w * acc[c];
      }
      const float inv = 1.f / denom;
      for (int c = 0; c < d; ++c) o[c] *= inv;
    }
  });
}

}  // namespace moelens
