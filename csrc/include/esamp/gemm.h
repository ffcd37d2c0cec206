// esamp/gemm.h -- the GEMM interface the CPU kernels use (row-major, float32).
//
// The torch binding layer passes an implementation backed by ATen/BLAS; the C++ benchmark binaries
// (no libtorch) use sgemm_reference() below.
#pragma once
#include "esamp/common.h"

namespace esamp {

// C[M,N] = alpha * op(A) * op(B) + beta * C, row-major; op(X) = X or X^T.
// A is [M,K] (or [K,M] if transA), B is [K,N] (or [N,K] if transB).
using SgemmFn = void (*)(void* ctx, bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
                         const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                         int64_t ldc);

struct CpuGemm {
  SgemmFn fn = nullptr;
  void* ctx = nullptr;
  void operator()(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
                  const float* B, int64_t ldb, float beta, float* C, int64_t ldc) const;
};

// Portable cache-blocked GEMM (single thread); used when no BLAS-backed CpuGemm is given.
void sgemm_reference(void* ctx, bool transA, bool transB, int64_t M, int64_t N, int64_t K, float alpha,
                     const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc);

inline void CpuGemm::operator()(bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                                int64_t lda, const float* B, int64_t ldb, float beta, float* C,
                                int64_t ldc) const {
  (fn ? fn : sgemm_reference)(ctx, ta, tb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace esamp
