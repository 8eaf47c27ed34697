#include "membench.h"

#include <atomic>
#include <cstring>

namespace moelens {

uint64_t StreamRead(const uint8_t* data, int64_t nbytes, ThreadPool& pool) {
  constexpr int64_t kBlock = int64_t(1) << 20;
  const int64_t words = nbytes / 8;
  const int64_t blocks = (words * 8 + kBlock - 1) / kBlock;
  std::atomic<uint64_t> total{0};
  pool.Run(blocks, [&](int64_t b) {
    const int64_t lo = b * (kBlock / 8);
    const int64_t hi = std::min<int64_t>(words, lo + kBlock / 8);
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t i = lo;
    for (; i + 4 <= hi; i += 4) {
      uint64_t w[4];
      std::memcpy(w, data + i * 8, 32);
      s0 += w[0];
      s1 += w[1];
      s2 += w[2];
      s3 += w[3];
    }
    for (; i < hi; ++i) {
      uint64_t w;
      std::memcpy(&w, data + i * 8, 8);
      s0 += w;
    }
    total.fetch_add(s0 + s1 + s2 + s3, std::memory_order_relaxed);
  });
  return total.load();
}

}  // namespace moelens
