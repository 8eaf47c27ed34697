// CPU decode attention over the paged KV store.
//
// For each sequence b (one query token, n_q = s * n_kv heads) and its cached tokens at `layer`:
//   out[b, h] = softmax(scale * q[b, h] . K[b, h / s]^T) V[b, h / s]
// float32 accumulation (an int8 store on AVX2: exact int32 dot products of queries and softmax
// weights rounded to 16 bits, see attention_avx2.cc), online (max-subtracted) softmax.
// GQA-packed: a work item covers all s query heads of one kv head (in blocks of <= kMaxGroup
// heads), so each K/V element is loaded once per block and used s times. Work items are
// (sequence, KV chunk) and walk the chunk's pages in memory order, every kv head of a page
// before the next page, so each thread streams contiguous memory; chunk partials (max, sum,
// unnormalised output per head) are merged by log-sum-exp, so one long sequence among many
// short ones still spreads over every thread.
#pragma once

#include <cstdint>
#include <optional>

#include "cpu_features.h"
#include "kv_store.h"
#include "thread_pool.h"

namespace moelens {

constexpr int kMaxGroup = 8;       // query heads per work item (larger groups are split)
constexpr int kMaxPageSize = 256;  // scores of one page live on the stack

// One page block of one kv head for `s` query heads (s <= kMaxGroup). The running state
// (m, l, acc) is read and updated in place; it starts as m = -inf, l = 0, acc = 0.
struct PageArgs {
  const float* q;       // [s][head_dim], already multiplied by the softmax scale
  const uint8_t* k;     // [ntok][head_dim] in the storage dtype
  const uint8_t* v;     // [ntok][head_dim]
  const float* k_scale;  // [ntok] per-token scales of an 8-bit store, else nullptr
  const float* v_scale;
  int ntok;
  int head_dim;
  int64_t elem_bytes;
  float* m;             // [s] running max
  float* l;             // [s] sum of exp(score - m)
  float* acc;           // [s][head_dim] sum of exp(score - m) * v
  const uint8_t* next;  // next K block to prefetch (nullable)
  int64_t next_bytes;
  // An int8 store's queries rounded to 16-bit integers: q ~= q16_scale[i] * q16[i][:] (the
  // kernels with integer dot products read these; the others read q). Else nullptr.
  const int16_t* q16 = nullptr;  // [s][head_dim]
  const float* q16_scale = nullptr;  // [s]
};

using PageFn = void (*)(const PageArgs&);

// Rounds each of `rows` rows of `d` floats to 16-bit integers with a per-row scale
// (max |x| / 32767; 0 for an all-zero row; NaN for a row holding a NaN or an infinity, so the
// result stays NaN as in float arithmetic).
void QuantiseRowsI16(const float* x, int64_t rows, int d, int16_t* out, float* scale);

// Per-ISA kernels (nullptr when the ISA's kernel cannot serve this dtype/head_dim/group).
PageFn GetPageFnPortable(KvDtype dtype, int head_dim, int s);
PageFn GetPageFnAvx2(KvDtype dtype, int head_dim, int s);
PageFn GetPageFnAvx512(KvDtype dtype, int head_dim, int s);

struct AttentionOptions {
  Isa isa = Isa::kPortable;
  std::optional<float> scale;  // softmax scale, finite and > 0; unset: 1 / sqrt(head_dim)
  int64_t chunk_tokens = 512;  // rounded up to a multiple of page_size
};

// q: [n, n_q, head_dim] float32; out: same shape. n_q must be a multiple of num_kv_heads.
// Throws (before computing anything) on unknown sequences, bad layer, empty sequences, and a
// scale that is set but not a finite positive number (std::invalid_argument).
void DecodeAttention(const KvStore& store, const float* q, const int64_t* seq_ids, int64_t n,
                     int num_q_heads, int layer, const AttentionOptions& opt, ThreadPool& pool,
                     float* out);

// Causal attention of packed prefill sequences (the CPU backend's prefill attention):
//   out[r, h] = softmax_j(scale * q[r, h] . k[j, h / s]) v[j, h / s]
// over the rows j of r's own segment with pos[j] <= pos[r]; rows with seg[r] < 0 get zeros.
// q: [n, n_q, head_dim], k/v: [n, n_kv, head_dim] float32, seg/pos: [n]. Each segment must be
// one contiguous run of rows with consecutive positions (how the engine lays out a prefill).
// The same page kernel as decode (float32 K/V), one work item per (block of rows of a segment,
// kv head); K/V are first copied head-major so every kernel call streams contiguous rows.
// Throws std::invalid_argument (before computing anything) on a bad layout or scale.
void PrefillAttention(const float* q, const float* k, const float* v, const int32_t* seg,
                      const int32_t* pos, int64_t n, int num_q_heads, int num_kv_heads,
                      int head_dim, const AttentionOptions& opt, ThreadPool& pool, float* out);

// The ISA level actually used for this dtype / head_dim when `requested` is asked for.
Isa EffectiveIsa(Isa requested, KvDtype dtype, int head_dim);

}  // namespace moelens
