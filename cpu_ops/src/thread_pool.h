// A small persistent thread pool: Run(n, fn) calls fn(i) for i in [0, n) on all threads
// (the caller included) with dynamic (atomic-counter) scheduling and returns when all are done.
//
// The kernels share one process-wide pool, SharedPool(). A caller holds the returned shared_ptr
// for its whole call, so SetSharedPoolThreads (Python's set_num_threads) swapping in a new pool
// never frees one that a call on another thread is still running on: the old pool is destroyed
// (its workers joined) when its last holder lets go.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

namespace moelens {

class ThreadPool {
 public:
  explicit ThreadPool(int num_threads);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return num_threads_; }
  // Rethrows the first exception thrown by `fn` (after all items finished or were skipped).
  void Run(int64_t n, const std::function<void(int64_t)>& fn);

 private:
  void Worker();
  void Drain();

  int num_threads_;
  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // one Run at a time
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  uint64_t generation_ = 0;
  int active_ = 0;
  bool stop_ = false;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::exception_ptr error_;
};

// Default thread count: the CPUs this process may run on.
int AvailableCpus();

// The current process-wide pool (created on first use with AvailableCpus() threads). Hold the
// result for the duration of the call that runs on it.
std::shared_ptr<ThreadPool> SharedPool();

// Replaces the process-wide pool by one of n >= 1 threads (std::invalid_argument otherwise).
// Calls already holding the old pool finish on it; later SharedPool() calls get the new one.
void SetSharedPoolThreads(int n);

}  // namespace moelens
