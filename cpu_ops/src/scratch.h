// Reusable float32 scratch buffers for kernel calls: fresh allocations page-fault on every call
// (~0.4 ms per MiB), so buffers are kept and handed out again. Thread-safe; a Lease returns its
// buffer on every exit path.
#pragma once

#include <memory>
#include <mutex>
#include <vector>

namespace moelens {

class ScratchPool {
 public:
  std::unique_ptr<std::vector<float>> Take() {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) return std::make_unique<std::vector<float>>();
    auto b = std::move(free_.back());
    free_.pop_back();
    return b;
  }
  void Give(std::unique_ptr<std::vector<float>> b) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(std::move(b));
  }

  // The process-wide pool (never destroyed: XLA may call kernels while the process exits).
  static ScratchPool& Global() {
    static ScratchPool* pool = new ScratchPool();
    return *pool;
  }

  struct Lease {
    std::unique_ptr<std::vector<float>> buf = Global().Take();
    ~Lease() { Global().Give(std::move(buf)); }
    float* Get(size_t n) {
      if (buf->size() < n) buf->resize(n);
      return buf->data();
    }
  };

 private:
  std::mutex mu_;
  std::vector<std::unique_ptr<std::vector<float>>> free_;
};

}  // namespace moelens
