// A small persistent thread pool: Run(n, fn) calls fn(i) for i in [0, n) on all threads
// (the caller included) with dynamic (atomic-counter) scheduling and returns when all are done.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
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

}  // namespace moelens
