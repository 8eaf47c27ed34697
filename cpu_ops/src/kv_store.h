// Paged host KV store: one 64-byte-aligned pool of pages, per-sequence page tables.
//
// A page holds `page_size` consecutive tokens of ONE sequence for ALL layers, K and V:
//
//   page [layer][kind (0 = K, 1 = V)][kv_head][page_size][head_dim]      (storage dtype)
//
// The 8-bit formats (int8, float8 e4m3fn) quantise each (token, kv head) row of head_dim
// values with its own float32 scale (amax / 127, amax / 448): a block is then the page_size
// rows of codes followed by their page_size scales, so a row's error is bounded by its own
// range (a per-page scale would let one outlier token coarsen the whole page).
//
// so a sequence has one page table shared by every layer, allocation is per token block (never
// reserved for prompt + generation up front), and the (layer, kind, kv_head) block of a page is
// one contiguous run of page_size * head_dim elements that the attention kernel streams.
// Each layer keeps its own token count per sequence (layer l appends before layer l+1 does
// within an iteration); pages are allocated by whichever layer first needs the room.
//
// Thread safety: metadata is guarded by a shared mutex; attention holds it shared for the whole
// call, mutations (add/append/free) hold it exclusive. Every public entry point validates its
// arguments and throws std::invalid_argument / std::out_of_range / KvCapacityError before
// touching any state, so a failed call changes nothing.
#pragma once

#include <cstddef>
#include <cstdint>
#include <shared_mutex>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace moelens {

enum class KvDtype : int { kBf16 = 0, kF16 = 1, kF32 = 2, kI8 = 3, kF8E4M3 = 4 };

const char* KvDtypeName(KvDtype d);
bool ParseKvDtype(const std::string& name, KvDtype* out);
// Whether the format stores codes with a float32 scale per (token, kv head).
inline bool KvDtypeQuantised(KvDtype d) { return d == KvDtype::kI8 || d == KvDtype::kF8E4M3; }
// Bytes per stored element (inline: the attention driver computes block addresses per page).
inline int KvDtypeSize(KvDtype d) {
  return d == KvDtype::kF32 ? 4 : (KvDtypeQuantised(d) ? 1 : 2);
}

class KvCapacityError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct KvGeometry {
  int num_layers = 0;
  int num_kv_heads = 0;
  int head_dim = 0;
  int page_size = 0;
  KvDtype dtype = KvDtype::kBf16;

  int64_t elem_bytes() const { return KvDtypeSize(dtype); }
  // Offset of a block's float32 scales (quantised formats), 4-byte aligned.
  int64_t scale_offset() const { return (int64_t(page_size) * head_dim * elem_bytes() + 3) / 4 * 4; }
  // Bytes of one (layer, kind, kv_head) block inside a page (codes, then scales if any).
  int64_t block_bytes() const {
    return KvDtypeQuantised(dtype) ? scale_offset() + 4 * int64_t(page_size)
                                   : int64_t(page_size) * head_dim * elem_bytes();
  }
  int64_t layer_bytes() const { return 2 * num_kv_heads * block_bytes(); }
  int64_t page_bytes() const { return num_layers * layer_bytes(); }
};

class KvStore;

// Live stores by integer handle, so an FFI call names a store by a plain integer attribute and
// a stale handle is an error rather than a dangling pointer. A Handle keeps the registry
// shared-locked (the store cannot be destroyed while it is in use).
class StoreRegistry {
 public:
  struct Handle {
    std::shared_lock<std::shared_mutex> lock;
    const KvStore* store;
  };
  static int64_t Register(KvStore* s);
  static void Unregister(int64_t id);
  // Throws std::out_of_range for an unknown id.
  static Handle Get(int64_t id);
};

class KvStore {
 public:
  KvStore(const KvGeometry& geometry, int64_t num_pages);
  ~KvStore();
  KvStore(const KvStore&) = delete;
  KvStore& operator=(const KvStore&) = delete;

  const KvGeometry& geometry() const { return g_; }
  int64_t handle() const { return handle_; }
  int64_t num_pages() const { return num_pages_; }
  int64_t free_pages() const;
  int64_t num_sequences() const;

  void AddSequence(int64_t seq_id);
  // Frees the sequence's pages at once. Unknown ids are an error.
  void FreeSequence(int64_t seq_id);
  bool HasSequence(int64_t seq_id) const;
  // Tokens cached for `seq_id` at `layer`.
  int64_t Length(int64_t seq_id, int layer) const;
  std::vector<int32_t> PageTable(int64_t seq_id) const;

  // Pages that must be newly allocated so that every sequence i can hold counts[i] more tokens
  // (at the layer with the most tokens cached).
  int64_t PagesNeeded(const int64_t* seq_ids, const int32_t* counts, int64_t n) const;

  // Appends counts[i] tokens for seq_ids[i] at `layer`. `k` and `v` are
  // [sum(counts), num_kv_heads, head_dim] in `src_dtype` (float32, or the storage dtype as raw
  // 16-bit; a quantised store takes float32 only and quantises each row), rows of sequence i
  // consecutive and in request order. All-or-nothing.
  void Append(const int64_t* seq_ids, const int32_t* counts, int64_t n, int layer,
              const void* k, const void* v, KvDtype src_dtype, int64_t rows);

  // Copies the cached K and V of one sequence at `layer` out as float32 [len, kv_heads, d].
  void Read(int64_t seq_id, int layer, float* k_out, float* v_out) const;

  // Internal access for the attention kernel (caller holds a shared lock).
  std::shared_mutex& mutex() const { return mu_; }
  struct SeqView {
    const int32_t* pages;
    int64_t length;
  };
  // Throws on unknown id / bad layer. Caller must hold the lock.
  SeqView ViewLocked(int64_t seq_id, int layer) const;
  const uint8_t* PagePtr(int32_t page) const { return pool_ + int64_t(page) * g_.page_bytes(); }
  const uint8_t* BlockPtr(int32_t page, int layer, int kind, int head) const {
    return PagePtr(page) + layer * g_.layer_bytes() +
           (int64_t(kind) * g_.num_kv_heads + head) * g_.block_bytes();
  }
  // The block's per-token scales (quantised formats), else nullptr.
  const float* ScalePtr(int32_t page, int layer, int kind, int head) const {
    if (!KvDtypeQuantised(g_.dtype)) return nullptr;
    return reinterpret_cast<const float*>(BlockPtr(page, layer, kind, head) + g_.scale_offset());
  }

 private:
  struct Sequence {
    std::vector<int32_t> pages;
    std::vector<int64_t> lengths;  // per layer
  };
  const Sequence& GetLocked(int64_t seq_id) const;
  void CheckLayer(int layer) const;
  uint8_t* MutableBlock(int32_t page, int layer, int kind, int head) {
    return const_cast<uint8_t*>(BlockPtr(page, layer, kind, head));
  }

  KvGeometry g_;
  int64_t num_pages_;
  uint8_t* pool_ = nullptr;
  std::vector<int32_t> free_list_;
  std::unordered_map<int64_t, Sequence> seqs_;
  mutable std::shared_mutex mu_;
  int64_t handle_ = 0;
};

}  // namespace moelens
