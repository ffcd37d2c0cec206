// Portable blocked SGEMM used when no BLAS-backed CpuGemm is supplied (C++ benchmark binaries,
// sanitizer builds).  Row-major; correctness over speed, but cache-blocked so it is not absurd.
#include <algorithm>
#include <vector>

#include "esamp/gemm.h"

namespace esamp {

void sgemm_reference(void*, bool ta, bool tb, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
                     int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  for (int64_t i = 0; i < M; ++i) {
    float* c = C + i * ldc;
    if (beta == 0.f) {
      std::fill(c, c + N, 0.f);
    } else if (beta != 1.f) {
      for (int64_t j = 0; j < N; ++j) c[j] *= beta;
    }
  }
  if (K == 0 || alpha == 0.f) return;
  // Pack op(B) as [K, N] row-major when it is transposed so the inner loop is unit stride.
  std::vector<float> bpack;
  const float* Bp = B;
  int64_t ldbp = ldb;
  if (tb) {
    bpack.resize(static_cast<size_t>(K * N));
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < K; ++k) bpack[k * N + n] = B[n * ldb + k];
    Bp = bpack.data();
    ldbp = N;
  }
  constexpr int64_t KB = 256, NB = 512;
  for (int64_t k0 = 0; k0 < K; k0 += KB) {
    const int64_t k1 = std::min(K, k0 + KB);
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
      const int64_t n1 = std::min(N, n0 + NB);
      for (int64_t i = 0; i < M; ++i) {
        float* c = C + i * ldc;
        for (int64_t k = k0; k < k1; ++k) {
          const float a = alpha * (ta ? A[k * lda + i] : A[i * lda + k]);
          if (a == 0.f) continue;
          const float* b = Bp + k * ldbp;
          for (int64_t n = n0; n < n1; ++n) c[n] += a * b[n];
        }
      }
    }
  }
}

}  // namespace esamp
