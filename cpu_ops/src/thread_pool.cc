#include "thread_pool.h"

#include <sched.h>

#include <stdexcept>
#include <string>

namespace moelens {

namespace {

struct Shared {
  std::mutex mu;
  std::shared_ptr<ThreadPool> pool;  // guarded by mu
};

// Never destroyed: an XLA FFI call may still ask for the pool while the process exits.
Shared& SharedState() {
  static Shared* state = new Shared();
  return *state;
}

}  // namespace

std::shared_ptr<ThreadPool> SharedPool() {
  Shared& s = SharedState();
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.pool) s.pool = std::make_shared<ThreadPool>(AvailableCpus());
  return s.pool;
}

void SetSharedPoolThreads(int n) {
  if (n < 1) throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(n));
  auto fresh = std::make_shared<ThreadPool>(n);  // threads started outside the lock
  Shared& s = SharedState();
  {
    std::lock_guard<std::mutex> lock(s.mu);
    s.pool.swap(fresh);
  }
  // `fresh` (now the old pool) is released here, outside the lock: if no call holds it any
  // more its workers are joined now, otherwise when the last call running on it returns.
}

int AvailableCpus() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n > 0) return n;
  }
  const unsigned hw = std::thread::hardware_concurrency();
  return hw > 0 ? int(hw) : 1;
}

ThreadPool::ThreadPool(int num_threads) : num_threads_(num_threads < 1 ? 1 : num_threads) {
  for (int i = 1; i < num_threads_; ++i) workers_.emplace_back([this] { Worker(); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

void ThreadPool::Drain() {
  for (;;) {
    const int64_t i = next_.fetch_add(1, std::memory_order_relaxed);
    if (i >= n_) return;
    try {
      (*fn_)(i);
    } catch (...) {
      std::lock_guard<std::mutex> lock(mu_);
      if (!error_) error_ = std::current_exception();
      next_.store(n_, std::memory_order_relaxed);  // skip the rest
    }
  }
}

void ThreadPool::Worker() {
  uint64_t seen = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      start_cv_.wait(lock, [&] { return stop_ || generation_ != seen; });
      if (stop_) return;
      seen = generation_;
    }
    Drain();
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (--active_ == 0) done_cv_.notify_all();
    }
  }
}

void ThreadPool::Run(int64_t n, const std::function<void(int64_t)>& fn) {
  if (n <= 0) return;
  std::lock_guard<std::mutex> run_lock(run_mu_);
  if (workers_.empty() || n == 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    fn_ = &fn;
    n_ = n;
    next_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    active_ = int(workers_.size());
    ++generation_;
  }
  start_cv_.notify_all();
  Drain();
  std::exception_ptr err;
  {
    std::unique_lock<std::mutex> lock(mu_);
    done_cv_.wait(lock, [&] { return active_ == 0; });
    err = error_;
    fn_ = nullptr;
  }
  if (err) std::rethrow_exception(err);
}

}  // namespace moelens
