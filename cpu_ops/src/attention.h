// CPU decode attention over the paged KV store.
//
// For each sequence b (one query token, n_q = s * n_kv heads) and its cached tokens at `layer`:
//   out[b, h] = softmax(scale * q[b, h] . K[b, h / s]^T) V[b, h / s]
// float32 accumulation, online (max-subtracted) softmax. GQA-packed: a work item covers all s
// query heads of one kv head (in blocks of <= kMaxGroup heads), so each K/V element is loaded
// once per block and used s times. Work items are (sequence, kv head, head block, KV chunk);
// chunk partials (max, sum, unnormalised output) are merged by log-sum-exp, so one long sequence
// among many short ones still spreads over every thread.
#pragma once

#include <cstdint>

#include "cpu_features.h"
#include "kv_store.h"
#include "thread_pool.h"

namespace moelens {

constexpr int kMaxGroup = 8;       // query heads per work item (larger groups are split)
constexpr int kMaxPageSize = 256;  // scores of one page live on the stack

// One work item: tokens [first_token, first_token + num_tokens) of one sequence (first_token a
// multiple of page_size), one kv head, `s` query heads (s <= kMaxGroup).
struct ChunkArgs {
  const KvStore* store;
  const int32_t* pages;  // the sequence's page table
  int64_t first_token;
  int64_t num_tokens;
  int layer;
  int kv_head;
  int s;
  const float* q;  // [s][d], already multiplied by the softmax scale
  float* m;        // out [s]: running max
  float* l;        // out [s]: sum of exp(score - m)
  float* acc;      // out [s][d]: sum of exp(score - m) * v
};

using ChunkFn = void (*)(const ChunkArgs&);

// Per-ISA kernels (nullptr when the ISA's kernel cannot serve this dtype/head_dim).
ChunkFn GetChunkFnPortable(KvDtype dtype, int head_dim, int s);
ChunkFn GetChunkFnAvx2(KvDtype dtype, int head_dim, int s);
ChunkFn GetChunkFnAvx512(KvDtype dtype, int head_dim, int s);

struct AttentionOptions {
  Isa isa = Isa::kPortable;
  float scale = 0.f;         // <= 0: 1 / sqrt(head_dim)
  int64_t chunk_tokens = 512;  // rounded up to a multiple of page_size
};

// q: [n, n_q, head_dim] float32; out: same shape. n_q must be a multiple of num_kv_heads.
// Throws (before computing anything) on unknown sequences, bad layer, empty sequences.
void DecodeAttention(const KvStore& store, const float* q, const int64_t* seq_ids, int64_t n,
                     int num_q_heads, int layer, const AttentionOptions& opt, ThreadPool& pool,
                     float* out);

// The ISA level actually used for this dtype / head_dim when `requested` is asked for.
Isa EffectiveIsa(Isa requested, KvDtype dtype, int head_dim);

}  // namespace moelens
