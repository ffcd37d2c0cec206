// cublas_gemm.cuh -- the one row-major cuBLAS GEMM call shared by the distiller (distiller.cu) and the dense
// reweight variant (reweight_dense.cu), torch-free.
#pragma once
#include <cublas_v2.h>

#include <cstdint>

namespace esamp {
namespace cuda_detail {

// Row-major C[M, N] = op(A)[M, K] . op(B)[K, N] + beta C, fp32 accumulate and output. cuBLAS is column-major, so
// this computes C^T = op(B)^T . op(A)^T. A and B are of types at / bt; ct picks the compute mode
// (CUBLAS_COMPUTE_32F_PEDANTIC: no TF32 / reduced-precision shortcuts).
inline cublasStatus_t gemm_rm(cublasHandle_t h, bool ta, bool tb, int64_t M, int64_t N, int64_t K, const void* A,
                              cudaDataType_t at, int64_t lda, const void* B, cudaDataType_t bt, int64_t ldb,
                              float beta, float* C, int64_t ldc, cublasComputeType_t ct) {
  const float alpha = 1.0f;
  return cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(N),
                      static_cast<int>(M), static_cast<int>(K), &alpha, B, bt, static_cast<int>(ldb), A, at,
                      static_cast<int>(lda), &beta, C, CUDA_R_32F, static_cast<int>(ldc), ct, CUBLAS_GEMM_DEFAULT);
}

}  // namespace cuda_detail
}  // namespace esamp
