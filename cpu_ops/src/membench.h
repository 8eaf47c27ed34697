// A streaming-read kernel to measure the memory read bandwidth the attention threads can get:
// sums a buffer as 64-bit words, split into 1 MiB blocks over the thread pool.
#pragma once

#include <cstdint>

#include "thread_pool.h"

namespace moelens {

uint64_t StreamRead(const uint8_t* data, int64_t nbytes, ThreadPool& pool);

}  // namespace moelens
