// A CpuGemm backed by ATen (and so by the BLAS torch was built with).
#pragma once
#include <ATen/ATen.h>
#include "esamp/gemm.h"

namespace esamp_torch {

inline void aten_sgemm(void*, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                       int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M == 0 || N == 0) return;
  auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (K == 0) {
    if (beta == 0.f) c.zero_(); else c.mul_(beta);
    return;
  }
  at::Tensor a = ta ? at::from_blob(const_cast<float*>(A), {K, M}, {lda, 1}, opts).t()
                    : at::from_blob(const_cast<float*>(A), {M, K}, {lda, 1}, opts);
  at::Tensor b = tb ? at::from_blob(const_cast<float*>(B), {N, K}, {ldb, 1}, opts).t()
                    : at::from_blob(const_cast<float*>(B), {K, N}, {ldb, 1}, opts);
  at::addmm_out(c, c, a, b, beta, alpha);
}

inline esamp::CpuGemm aten_gemm() {
  esamp::CpuGemm g;
  g.fn = &aten_sgemm;
  g.ctx = nullptr;
  return g;
}

}  // namespace esamp_torch
