// The GEMM library behind the CPU expert FFN: OpenBLAS from the `scipy-openblas32` wheel (the
// build numpy/scipy link against), opened at run time with dlopen. The extension therefore does
// not link against it (no rpath into a build environment); Python passes the library path once
// (moelens_jax.ops.experts) and every kernel call checks it was loaded.
#pragma once

#include <cstdint>
#include <string>

namespace moelens {

// Loads the library at `path` and resolves its symbols; the library's own threading is set to
// one thread (our pool parallelises over work items). Throws std::runtime_error on failure.
// Idempotent for the same path.
void LoadBlas(const std::string& path);
bool BlasLoaded();
std::string BlasInfo();  // the library's build configuration string, "" if not loaded

// Row-major single-precision GEMM: C[M,N] = A[M,K] @ B[K,N] (+ beta C), leading dimensions in
// elements. Precondition: BlasLoaded().
void Sgemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B,
           int64_t ldb, float beta, float* C, int64_t ldc);

}  // namespace moelens
