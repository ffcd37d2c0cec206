// esamp/sampling.h -- torch-free entry points of the reweight family (SPEC section 3).
//
// All pointers are host pointers for the *_cpu functions and device pointers for the *_cuda ones.
// Row-major 2-D arrays are given by a base pointer and a row stride in elements (column stride 1).
#pragma once
#include "esamp/common.h"
#include "esamp/gemm.h"

namespace esamp {

// Per-row parameters, each an array of length B (the binding layer broadcasts scalars).
struct RowParams {
  const float* beta = nullptr;         // >= 0
  const float* temperature = nullptr;  // >= 0; 0 => greedy
  const int64_t* top_k = nullptr;      // <= 0 or >= V => off
  const float* top_p = nullptr;        // (0, 1]; 1 => off
  const float* min_p = nullptr;        // [0, 1); 0 => off
  const int64_t* seed = nullptr;       // reweight only
  const int64_t* step = nullptr;       // reweight only
};

struct ReweightProblem {
  int64_t B = 0, V = 0, H = 0;
  const void* logits = nullptr;  DType logits_dtype = DType::kF32;  int64_t logits_stride = 0;  // [B, V]
  const void* pred = nullptr;    DType pred_dtype = DType::kF32;    int64_t pred_stride = 0;    // [B, H]
  const void* weight = nullptr;  DType weight_dtype = DType::kF32;  int64_t weight_stride = 0;  // [V, H]
  const void* bias = nullptr;    DType bias_dtype = DType::kF32;    // [V] contiguous or nullptr
  RowParams p;
};

// Fused filter + candidate dot products + mix + Gumbel-max + logprob.
//   tokens[B] (int64), logprobs[B] (float32).
// `gemm` may be used for a dense path when candidate sets are large (may be {nullptr, nullptr}).
Status reweight_cpu(const ReweightProblem& pr, int64_t* tokens, float* logprobs, CpuGemm gemm);

// Same filter and mix, no sampling: out[B, V] float32 (row stride out_stride) holds m on the
// candidate set and -inf elsewhere.  Greedy rows (T == 0): 0 at argmax l, -inf elsewhere.
Status reweight_logits_cpu(const ReweightProblem& pr, float* out, int64_t out_stride, CpuGemm gemm);

// h_mix = (1 + beta_r) * hidden - beta_r * pred, per row r; out has the hidden dtype.
struct MixHiddenProblem {
  int64_t B = 0, H = 0;
  const void* hidden = nullptr; DType hidden_dtype = DType::kF32; int64_t hidden_stride = 0;
  const void* pred = nullptr;   DType pred_dtype = DType::kF32;   int64_t pred_stride = 0;
  const float* beta = nullptr;  // [B]
  void* out = nullptr;          int64_t out_stride = 0;  // dtype = hidden_dtype
};
Status mix_hidden_cpu(const MixHiddenProblem& pr);

#if defined(ESAMP_WITH_CUDA)
}  // namespace esamp
#include <cuda_runtime.h>
namespace esamp {
// CUDA reweight (csrc/cuda/reweight.cu; plan in esamp/cuda_plan.h).  dense: -1 auto, 0 never (sparse dot
// products only), 1 every beta > 0 sampled row takes the dense GEMM path (tests / measurements).
// dense_gemm: -1 auto, 0 the fused tensor-core kernel, 1 cuBLAS GEMM + streaming pass (needs cublas_handle:
// a cublasHandle_t bound to `stream` with a workspace set, as torch's current handle is; nullptr = fused).
// The workspace size depends on the current device (blocks per row), on the dense settings and on whether
// a handle will be given (have_cublas).
size_t reweight_cuda_workspace_bytes(const ReweightProblem& pr, int dense = -1, bool logits_out = false,
                                     int dense_gemm = -1, bool have_cublas = false);
Status reweight_cuda(const ReweightProblem& pr, int64_t* tokens, float* logprobs, void* workspace,
                     size_t workspace_bytes, int dense, cudaStream_t stream, void* cublas_handle = nullptr,
                     int dense_gemm = -1);
Status reweight_logits_cuda(const ReweightProblem& pr, float* out, int64_t out_stride, void* workspace,
                            size_t workspace_bytes, int dense, cudaStream_t stream, void* cublas_handle = nullptr,
                            int dense_gemm = -1);
Status mix_hidden_cuda(const MixHiddenProblem& pr, cudaStream_t stream);
#endif

}  // namespace esamp

namespace esamp {
// Engine capture point: out[r, :] = hidden[r, :] (+ residual[r, :]) for r < N, fp32 math.
struct CaptureProblem {
  int64_t N = 0, H = 0;
  const void* hidden = nullptr;   DType hidden_dtype = DType::kF32;   int64_t hidden_stride = 0;
  const void* residual = nullptr; DType residual_dtype = DType::kF32; int64_t residual_stride = 0;  // or null
  void* out = nullptr;            DType out_dtype = DType::kF32;      int64_t out_stride = 0;
};
Status capture_cpu(const CaptureProblem& pr);
#if defined(ESAMP_WITH_CUDA)
Status capture_cuda(const CaptureProblem& pr, cudaStream_t stream);
#endif
}  // namespace esamp
