#include "blas.h"

#include <dlfcn.h>

#include <atomic>
#include <mutex>
#include <stdexcept>

namespace moelens {
namespace {

// CBLAS enums (cblas.h): CblasRowMajor = 101, CblasNoTrans = 111.
using SgemmFn = void (*)(int order, int ta, int tb, int M, int N, int K, float alpha,
                         const float* A, int lda, const float* B, int ldb, float beta, float* C,
                         int ldc);
using SetThreadsFn = void (*)(int);
using ConfigFn = char* (*)();

std::mutex g_mu;
std::string g_path;
std::atomic<SgemmFn> g_sgemm{nullptr};
ConfigFn g_config = nullptr;

void* Sym(void* lib, const char* name) {
  void* p = dlsym(lib, name);
  if (p == nullptr) {
    throw std::runtime_error(std::string("BLAS library lacks symbol ") + name);
  }
  return p;
}

}  // namespace

void LoadBlas(const std::string& path) {
  std::lock_guard<std::mutex> lock(g_mu);
  if (g_sgemm.load() != nullptr) {
    if (path == g_path) return;
    throw std::runtime_error("a different BLAS library is already loaded: " + g_path);
  }
  void* lib = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* err = dlerror();
    throw std::runtime_error("cannot open BLAS library " + path + ": " + (err ? err : "?"));
  }
  auto sgemm = reinterpret_cast<SgemmFn>(Sym(lib, "scipy_cblas_sgemm"));
  auto set_threads = reinterpret_cast<SetThreadsFn>(Sym(lib, "scipy_openblas_set_num_threads"));
  g_config = reinterpret_cast<ConfigFn>(dlsym(lib, "scipy_openblas_get_config"));
  set_threads(1);  // our thread pool splits the work; one BLAS thread per work item
  g_path = path;
  g_sgemm.store(sgemm);  // the library stays open for the life of the process
}

bool BlasLoaded() { return g_sgemm.load() != nullptr; }

std::string BlasInfo() {
  std::lock_guard<std::mutex> lock(g_mu);
  return g_config && BlasLoaded() ? std::string(g_config()) : std::string();
}

void Sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
           int64_t ldb, float beta, float* C, int64_t ldc) {
  g_sgemm.load(std::memory_order_relaxed)(101, 111, 111, int(M), int(N), int(K), 1.f, A,
                                          int(lda), B, int(ldb), beta, C, int(ldc));
}

}  // namespace moelens
