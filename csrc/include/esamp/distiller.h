// esamp/distiller.h -- torch-free distiller bank (SPEC section 2).
//
// Parameter layout of one slot (float32, P = L*(3*H*R + R) + H elements), block j = 0..L-1:
//   W1_j [H, 2R]   row i = (A_j[i, 0..R), G_j[i, 0..R))     -- one GEMM gives both projections
//   c_j  [R]
//   B_j  [R, H]
// followed by gamma [H].  A bank of S slots is a contiguous [S, P] array; Adam's exp_avg and
// exp_avg_sq have the same layout; step is int64 [S].
#pragma once
#include "esamp/common.h"
#include "esamp/gemm.h"

namespace esamp {

struct DistillerShape {
  int64_t H = 0, R = 0, L = 0;
  float norm_eps = 1e-6f;
  ESAMP_HD int64_t block_size() const { return 3 * H * R + R; }
  ESAMP_HD int64_t params_per_slot() const { return L * block_size() + H; }
  ESAMP_HD int64_t off_W1(int64_t j) const { return j * block_size(); }
  ESAMP_HD int64_t off_c(int64_t j) const { return j * block_size() + 2 * H * R; }
  ESAMP_HD int64_t off_B(int64_t j) const { return j * block_size() + 2 * H * R + R; }
  ESAMP_HD int64_t off_gamma() const { return L * block_size(); }
};

struct AdamConfig {
  float lr = 4e-4f, beta1 = 0.9f, beta2 = 0.999f, eps = 1e-4f, clip = 0.5f;  // clip <= 0 => no clipping
};

// Initialisation constants (documented in docs/semantics.md).
constexpr float kInitStd = 0.02f;   // A, G ~ N(0, kInitStd^2)
constexpr float kInitGateBias = 1.0f;  // c = 1
// B = 0, gamma = 1 (or the given gamma_init, e.g. the host model's final-norm weight).

// Counters (float64[4]) accumulated by every train step.
enum StatIndex : int { kStatRowsTrained = 0, kStatRowsSkipped = 1, kStatLossSum = 2, kStatSteps = 3, kNumStats = 4 };

struct DistillerBank {
  int64_t S = 0;
  float* params = nullptr;      // [S, P]
  float* exp_avg = nullptr;     // [S, P]
  float* exp_avg_sq = nullptr;  // [S, P]
  int64_t* step = nullptr;      // [S]
};

struct RowsIn {
  int64_t N = 0;
  const void* x = nullptr; DType x_dtype = DType::kF32; int64_t x_stride = 0;  // [N, H]
  const void* t = nullptr; DType t_dtype = DType::kF32; int64_t t_stride = 0;  // [N, H] (train only)
  const int64_t* slot_ids = nullptr;                                           // [N], in [0, S)
};

// y[N, H] (dtype out_dtype, row stride out_stride) = f_{slot}(x) for each row.
Status distiller_forward_cpu(const DistillerShape& sh, const float* params, int64_t S, const RowsIn& rows,
                             void* out, DType out_dtype, int64_t out_stride, CpuGemm gemm);

// One optimizer step of every slot that has >= 1 valid row.  Rows with a non-finite x or t are
// skipped and counted.  losses[S]: mean over the slot's rows of ||y - t||^2 / H, NaN for idle slots.
// stats[4] (float64) accumulate (rows trained, rows skipped, loss sum over slots, steps).
Status distiller_train_step_cpu(const DistillerShape& sh, const AdamConfig& cfg, DistillerBank bank,
                                const RowsIn& rows, float* losses, double* stats, CpuGemm gemm);

// Re-initialise parameters and optimizer state of the listed slots (slots[n], each in [0, S)).
Status distiller_reset_cpu(const DistillerShape& sh, DistillerBank bank, const int64_t* slots, int64_t n,
                           uint64_t seed, const float* gamma_init /* [H] or nullptr */);

#if defined(ESAMP_WITH_CUDA)
}  // namespace esamp
#include <cuda_runtime.h>
namespace esamp {
// CUDA distiller (csrc/cuda/distiller.cu; engines and sizing in esamp/cuda_plan.h).
//   cublas_handle: a cublasHandle_t already bound to `stream` with a workspace set (cublasSetStream +
//                  cublasSetWorkspace, as torch's current handle is), or nullptr (SIMT engine only).
//   engine: -1 auto, 0 SIMT, 1 cuBLAS row products (see plan_distiller).
// The workspace size depends on the current device (its SM count) and on the engine request.
size_t distiller_cuda_workspace_bytes(const DistillerShape& sh, int64_t S, int64_t N, int engine = -1,
                                      bool have_cublas = true);
Status distiller_forward_cuda(const DistillerShape& sh, const float* params, int64_t S, const RowsIn& rows,
                              void* out, DType out_dtype, int64_t out_stride, void* workspace,
                              size_t workspace_bytes, void* cublas_handle, cudaStream_t stream, int engine = -1);
Status distiller_train_step_cuda(const DistillerShape& sh, const AdamConfig& cfg, DistillerBank bank,
                                 const RowsIn& rows, float* losses, double* stats, void* workspace,
                                 size_t workspace_bytes, void* cublas_handle, cudaStream_t stream, int engine = -1);
Status distiller_reset_cuda(const DistillerShape& sh, DistillerBank bank, const int64_t* slots, int64_t n,
                            uint64_t seed, const float* gamma_init, cudaStream_t stream);

// A host-readable copy of the float64[kNumStats] counters in mapped pinned memory, written by a kernel on
// the stream after each update (a sequence lock: seq_begin, values, seq_end, each store made visible to
// the host in that order), so that the host reads a consistent snapshot without any synchronisation.
struct StatsMirror {
  volatile unsigned long long seq_begin;
  volatile double v[kNumStats];
  volatile unsigned long long seq_end;
};
// mirror: the device pointer of a StatsMirror in mapped pinned memory; seq: the update number written.
Status stats_mirror_cuda(const double* stats, StatsMirror* mirror, unsigned long long seq, cudaStream_t stream);
#endif

}  // namespace esamp
