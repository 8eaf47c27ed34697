#include "kv_store.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <cstring>
#include <mutex>
#include <unordered_set>

#include <sys/mman.h>

#include "dtypes.h"

namespace moelens {

const char* KvDtypeName(KvDtype d) {
  switch (d) {
    case KvDtype::kBf16: return "bfloat16";
    case KvDtype::kF16: return "float16";
    case KvDtype::kF32: return "float32";
    case KvDtype::kI8: return "int8";
    case KvDtype::kF8E4M3: return "float8_e4m3fn";
  }
  return "unknown";
}

bool ParseKvDtype(const std::string& name, KvDtype* out) {
  for (KvDtype d : {KvDtype::kBf16, KvDtype::kF16, KvDtype::kF32, KvDtype::kI8,
                    KvDtype::kF8E4M3}) {
    if (name == KvDtypeName(d)) {
      *out = d;
      return true;
    }
  }
  return false;
}

namespace {

std::string Str(int64_t v) { return std::to_string(v); }

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::shared_mutex g_registry_mu;
std::unordered_map<int64_t, KvStore*> g_registry;
int64_t g_next_handle = 1;

}  // namespace

int64_t StoreRegistry::Register(KvStore* s) {
  std::unique_lock lock(g_registry_mu);
  const int64_t id = g_next_handle++;
  g_registry[id] = s;
  return id;
}

void StoreRegistry::Unregister(int64_t id) {
  std::unique_lock lock(g_registry_mu);
  g_registry.erase(id);
}

StoreRegistry::Handle StoreRegistry::Get(int64_t id) {
  std::shared_lock lock(g_registry_mu);
  auto it = g_registry.find(id);
  if (it == g_registry.end()) {
    throw std::out_of_range("unknown KV store handle " + std::to_string(id) +
                            " (store destroyed?)");
  }
  const KvStore* s = it->second;
  return Handle{std::move(lock), s};
}

KvStore::KvStore(const KvGeometry& g, int64_t num_pages) : g_(g), num_pages_(num_pages) {
  if (g.num_layers <= 0 || g.num_kv_heads <= 0 || g.head_dim <= 0 || g.page_size <= 0) {
    throw std::invalid_argument("KvStore: num_layers, num_kv_heads, head_dim and page_size must "
                                "be positive");
  }
  if (num_pages <= 0) {
    throw std::invalid_argument("KvStore: the byte budget holds no page (one page needs " +
                                Str(g.page_bytes()) + " bytes)");
  }
  if (num_pages > INT32_MAX) throw std::invalid_argument("KvStore: too many pages");
  // 2 MiB alignment + MADV_HUGEPAGE: the kernel streams one block per (page, head), so with
  // 4 KiB pages nearly every block would be a TLB miss and restart the hardware prefetcher.
  constexpr int64_t kHuge = int64_t(2) << 20;
  const int64_t bytes = num_pages * g.page_bytes();
  const int64_t align = bytes >= kHuge ? kHuge : 64;
  const int64_t rounded = CeilDiv(bytes, align) * align;
  pool_ = static_cast<uint8_t*>(std::aligned_alloc(size_t(align), size_t(rounded)));
  if (pool_ == nullptr) {
    throw std::bad_alloc();
  }
#ifdef MADV_HUGEPAGE
  if (align == kHuge) madvise(pool_, size_t(rounded), MADV_HUGEPAGE);  // a hint; may be ignored
#endif
  free_list_.reserve(size_t(num_pages));
  for (int64_t p = num_pages - 1; p >= 0; --p) free_list_.push_back(int32_t(p));
  handle_ = StoreRegistry::Register(this);
}

KvStore::~KvStore() {
  StoreRegistry::Unregister(handle_);  // waits for in-flight FFI calls holding a Handle
  std::free(pool_);
}

int64_t KvStore::free_pages() const {
  std::shared_lock lock(mu_);
  return int64_t(free_list_.size());
}

int64_t KvStore::num_sequences() const {
  std::shared_lock lock(mu_);
  return int64_t(seqs_.size());
}

void KvStore::CheckLayer(int layer) const {
  if (layer < 0 || layer >= g_.num_layers) {
    throw std::out_of_range("layer " + Str(layer) + " out of range [0, " + Str(g_.num_layers) +
                            ")");
  }
}

const KvStore::Sequence& KvStore::GetLocked(int64_t seq_id) const {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) {
    throw std::out_of_range("unknown sequence id " + Str(seq_id) +
                            " (never added, or already freed)");
  }
  return it->second;
}

void KvStore::AddSequence(int64_t seq_id) {
  std::unique_lock lock(mu_);
  if (seqs_.count(seq_id)) {
    throw std::invalid_argument("sequence id " + Str(seq_id) + " already exists");
  }
  Sequence s;
  s.lengths.assign(size_t(g_.num_layers), 0);
  seqs_.emplace(seq_id, std::move(s));
}

void KvStore::FreeSequence(int64_t seq_id) {
  std::unique_lock lock(mu_);
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) {
    throw std::out_of_range("unknown sequence id " + Str(seq_id) +
                            " (never added, or already freed)");
  }
  for (auto p = it->second.pages.rbegin(); p != it->second.pages.rend(); ++p) {
    free_list_.push_back(*p);
  }
  seqs_.erase(it);
}

bool KvStore::HasSequence(int64_t seq_id) const {
  std::shared_lock lock(mu_);
  return seqs_.count(seq_id) != 0;
}

int64_t KvStore::Length(int64_t seq_id, int layer) const {
  std::shared_lock lock(mu_);
  CheckLayer(layer);
  return GetLocked(seq_id).lengths[size_t(layer)];
}

std::vector<int32_t> KvStore::PageTable(int64_t seq_id) const {
  std::shared_lock lock(mu_);
  return GetLocked(seq_id).pages;
}

int64_t KvStore::PagesNeeded(const int64_t* seq_ids, const int32_t* counts, int64_t n) const {
  std::shared_lock lock(mu_);
  int64_t need = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (counts[i] < 0) throw std::invalid_argument("negative token count " + Str(counts[i]));
    const Sequence& s = GetLocked(seq_ids[i]);
    const int64_t longest = *std::max_element(s.lengths.begin(), s.lengths.end());
    const int64_t pages = CeilDiv(longest + counts[i], g_.page_size);
    need += std::max<int64_t>(0, pages - int64_t(s.pages.size()));
  }
  return need;
}

KvStore::SeqView KvStore::ViewLocked(int64_t seq_id, int layer) const {
  CheckLayer(layer);
  const Sequence& s = GetLocked(seq_id);
  return SeqView{s.pages.data(), s.lengths[size_t(layer)]};
}

namespace {

// Quantises a float32 row of `n` values into `dst` (int8 or float8 e4m3fn codes) and its
// scale (amax / code max; a row with a non-finite value gets a NaN scale, so its attention
// output is NaN as with a float store).
void QuantiseRow(const float* s, KvDtype dtype, uint8_t* dst, float* scale, int n) {
  bool finite = true;
  const float amax = AbsMax(s, n, &finite);
  const float top = dtype == KvDtype::kI8 ? 127.f : kF8E4M3Max;
  const float sc = finite ? amax / top : std::numeric_limits<float>::quiet_NaN();
  std::memcpy(scale, &sc, 4);
  const float inv = (finite && amax > 0.f) ? top / amax : 0.f;
  for (int i = 0; i < n; ++i) {
    const float x = s[i] * inv;
    dst[i] = dtype == KvDtype::kI8 ? uint8_t(F32ToI8(x)) : F32ToF8E4M3(x);
  }
}

// Writes `n` elements of row `src` (in src dtype) into `dst` (storage dtype; a quantised
// store's row scale into `scale`).
void ConvertRow(const uint8_t* src, KvDtype src_dtype, uint8_t* dst, KvDtype dst_dtype, int n,
                float* scale) {
  if (KvDtypeQuantised(dst_dtype)) {
    QuantiseRow(reinterpret_cast<const float*>(src), dst_dtype, dst, scale, n);
    return;
  }
  if (src_dtype == dst_dtype) {
    std::memcpy(dst, src, size_t(n) * KvDtypeSize(dst_dtype));
    return;
  }
  // src_dtype is float32 here (checked by Append).
  const float* s = reinterpret_cast<const float*>(src);
  if (dst_dtype == KvDtype::kBf16) {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = F32ToBf16(s[i]);
  } else {
    uint16_t* d = reinterpret_cast<uint16_t*>(dst);
    for (int i = 0; i < n; ++i) d[i] = F32ToF16(s[i]);
  }
}

}  // namespace

void KvStore::Append(const int64_t* seq_ids, const int32_t* counts, int64_t n, int layer,
                     const void* k, const void* v, KvDtype src_dtype, int64_t rows) {
  if (src_dtype != KvDtype::kF32 && KvDtypeQuantised(g_.dtype)) {
    throw std::invalid_argument(std::string("k/v must be float32 for a ") +
                                KvDtypeName(g_.dtype) + " store (it quantises each row)");
  }
  if (src_dtype != KvDtype::kF32 && src_dtype != g_.dtype) {
    throw std::invalid_argument(std::string("k/v must be float32 or the store dtype (") +
                                KvDtypeName(g_.dtype) + "), got " + KvDtypeName(src_dtype));
  }
  std::unique_lock lock(mu_);
  CheckLayer(layer);
  // Validate everything before mutating anything.
  int64_t total = 0, need = 0;
  std::vector<Sequence*> seqs(static_cast<size_t>(n));
  std::unordered_set<int64_t> seen;  // duplicate ids in O(n), not O(n^2), under the lock
  seen.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    if (counts[i] < 0) throw std::invalid_argument("negative token count " + Str(counts[i]));
    auto it = seqs_.find(seq_ids[i]);
    if (it == seqs_.end()) {
      throw std::out_of_range("unknown sequence id " + Str(seq_ids[i]) +
                              " (never added, or already freed)");
    }
    if (!seen.insert(seq_ids[i]).second) {
      throw std::invalid_argument("sequence id " + Str(seq_ids[i]) +
                                  " appears twice in one append");
    }
    seqs[size_t(i)] = &it->second;
    total += counts[i];
    const int64_t pages = CeilDiv(it->second.lengths[size_t(layer)] + counts[i], g_.page_size);
    need += std::max<int64_t>(0, pages - int64_t(it->second.pages.size()));
  }
  if (total != rows) {
    throw std::invalid_argument("k/v have " + Str(rows) + " rows but counts sum to " +
                                Str(total));
  }
  if (need > int64_t(free_list_.size())) {
    throw KvCapacityError("KV cache full: append needs " + Str(need) + " new pages, " +
                          Str(int64_t(free_list_.size())) + " free of " + Str(num_pages_));
  }
  const int64_t src_elem = KvDtypeSize(src_dtype);
  const int64_t row_elems = int64_t(g_.num_kv_heads) * g_.head_dim;
  const uint8_t* kb = static_cast<const uint8_t*>(k);
  const uint8_t* vb = static_cast<const uint8_t*>(v);
  int64_t row = 0;
  for (int64_t i = 0; i < n; ++i) {
    Sequence& s = *seqs[size_t(i)];
    int64_t& len = s.lengths[size_t(layer)];
    for (int32_t t = 0; t < counts[i]; ++t, ++row, ++len) {
      const int64_t page_idx = len / g_.page_size;
      const int slot = int(len % g_.page_size);
      if (page_idx == int64_t(s.pages.size())) {
        s.pages.push_back(free_list_.back());
        free_list_.pop_back();
      }
      const int32_t page = s.pages[size_t(page_idx)];
      for (int h = 0; h < g_.num_kv_heads; ++h) {
        const int64_t src_off = (row * row_elems + int64_t(h) * g_.head_dim) * src_elem;
        const int64_t dst_off = int64_t(slot) * g_.head_dim * g_.elem_bytes();
        for (int kind = 0; kind < 2; ++kind) {
          uint8_t* block = MutableBlock(page, layer, kind, h);
          float* scale = reinterpret_cast<float*>(block + g_.scale_offset()) + slot;
          ConvertRow((kind == 0 ? kb : vb) + src_off, src_dtype, block + dst_off, g_.dtype,
                     g_.head_dim, scale);
        }
      }
    }
  }
}

void KvStore::Read(int64_t seq_id, int layer, float* k_out, float* v_out) const {
  std::shared_lock lock(mu_);
  SeqView view = ViewLocked(seq_id, layer);
  const int d = g_.head_dim;
  for (int64_t t = 0; t < view.length; ++t) {
    const int32_t page = view.pages[t / g_.page_size];
    const int slot = int(t % g_.page_size);
    for (int h = 0; h < g_.num_kv_heads; ++h) {
      for (int kind = 0; kind < 2; ++kind) {
        const uint8_t* src = BlockPtr(page, layer, kind, h) + int64_t(slot) * d * g_.elem_bytes();
        float* dst = (kind == 0 ? k_out : v_out) + (t * g_.num_kv_heads + h) * d;
        const float* scale = ScalePtr(page, layer, kind, h);
        for (int i = 0; i < d; ++i) {
          if (g_.dtype == KvDtype::kF32) {
            dst[i] = reinterpret_cast<const float*>(src)[i];
          } else if (g_.dtype == KvDtype::kI8) {
            dst[i] = float(int8_t(src[i])) * scale[slot];
          } else if (g_.dtype == KvDtype::kF8E4M3) {
            dst[i] = F8E4M3ToF32(src[i]) * scale[slot];
          } else {
            const uint16_t bits = reinterpret_cast<const uint16_t*>(src)[i];
            dst[i] = g_.dtype == KvDtype::kBf16 ? Bf16ToF32(bits) : F16ToF32(bits);
          }
        }
      }
    }
  }
}

}  // namespace moelens
